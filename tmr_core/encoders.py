"""Text and image encoders (paper §3.2): T^w, T^p from BERT; V^s, V^r from ResNet.

- Text: a BERT-family ``AutoModel``. T^w holds one vector per original token, the hidden state of
  its first word piece; a token with no word piece (U+FE0F, U+200B, …) or cut off by truncation
  gets a zero vector and is masked. T^p is the mean of the hidden states of the word pieces of
  each noun-phrase span.
- Image: a ResNet-family ``AutoModel``. Its last feature map, average-pooled to a √P×√P grid
  (7×7 = 49 by default, adaptive when the map has another size), gives the patch vectors V^s;
  each grounded region crop, run through the same backbone and mean-pooled, gives one vector of
  V^r. Only images that exist are encoded (missing ones never enter BatchNorm statistics); their
  rows stay zero and masked.

Backbones come from transformers by name/path (``load_*``) or, when loading a saved extractor,
from the config dict stored with it (``*_from_config``), so no hub download is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _without_pooler(model: nn.Module) -> nn.Module:
    # BERT's pooler is never used here; an unused parameter breaks DDP (Ray Train).
    pooler = getattr(model, "pooler", None)
    if pooler is not None and any(True for _ in pooler.parameters()):
        model.pooler = None
    return model


def load_text_encoder(name_or_path: str) -> nn.Module:
    """A pretrained BERT-family encoder (``AutoModel.from_pretrained``) without its pooler."""
    from transformers import AutoModel

    return _without_pooler(AutoModel.from_pretrained(name_or_path))


def load_image_encoder(name_or_path: str) -> nn.Module:
    """A pretrained ResNet-family encoder (``AutoModel.from_pretrained``)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(name_or_path)


def backbone_from_config(config_dict: dict, field: str) -> nn.Module:
    """Rebuild a backbone architecture (random weights) from its ``config.to_dict()``.

    Raises:
        ValueError: ``config_dict`` has no ``model_type`` (``field`` names the config field).
    """
    from transformers import AutoConfig, AutoModel

    values = dict(config_dict)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError(
            f"{field}: saved backbone config has no 'model_type'; rebuild the extractor with TMRExtractor.build"
        )
    values.pop("transformers_version", None)
    return _without_pooler(AutoModel.from_config(AutoConfig.for_model(model_type, **values)))


def backbone_config_dict(model: nn.Module) -> dict:
    """The JSON-able config of a transformers backbone, enough for :func:`backbone_from_config`."""
    values = model.config.to_dict()
    values.pop("transformers_version", None)
    values.pop("_name_or_path", None)
    for unused in ("id2label", "label2id"):  # classification-head fields; int keys do not survive JSON
        values.pop(unused, None)
    return values


@dataclass
class VisualFeatures:
    """One image's visual tokens (paper §3.2). Masks are True where a vector is real.

    patches: V^s (batch, num_patches, image_dim) or None when the fine level is off.
    patch_mask: (batch, num_patches) bool.
    regions: V^r (batch, num_regions, image_dim) or None when the coarse level is off.
    region_mask: (batch, num_regions) bool.
    """

    patches: torch.Tensor | None
    patch_mask: torch.Tensor | None
    regions: torch.Tensor | None
    region_mask: torch.Tensor | None


class TextEncoder(nn.Module):
    """BERT-family text encoder giving T^w (words) and T^p (phrases)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.hidden_size = int(backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Word-piece states (batch, length, hidden) for ``input_ids`` (batch, length)."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @staticmethod
    def word_features(
        states: torch.Tensor, word_starts: torch.Tensor, word_mask: torch.Tensor
    ) -> torch.Tensor:
        """T^w: the state of each original token's first word piece.

        Args:
            states: (batch, length, hidden) word-piece states.
            word_starts: (batch, words) index of each token's first piece (any value where masked).
            word_mask: (batch, words) bool, False for tokens without a piece, cut off, or padding.

        Returns:
            (batch, words, hidden), zero where ``word_mask`` is False.
        """
        index = word_starts.clamp(0, states.shape[1] - 1)
        gathered = states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))  # (B, W, H)
        return gathered * word_mask[..., None].to(states.dtype)

    @staticmethod
    def phrase_features(
        states: torch.Tensor, phrase_spans: torch.Tensor, phrase_mask: torch.Tensor
    ) -> torch.Tensor:
        """T^p: the mean state over each phrase's word pieces.

        Args:
            states: (batch, length, hidden) word-piece states.
            phrase_spans: (batch, phrases, 2) word-piece ``[start, end)`` of each phrase.
            phrase_mask: (batch, phrases) bool, False for padding.

        Returns:
            (batch, phrases, hidden), zero where ``phrase_mask`` is False.
        """
        positions = torch.arange(states.shape[1], device=states.device)
        inside = (positions >= phrase_spans[..., :1]) & (positions < phrase_spans[..., 1:])  # (B, P, L)
        inside = inside & phrase_mask[..., None]
        weights = inside.to(states.dtype)
        summed = torch.bmm(weights, states)  # (B, P, L) @ (B, L, H) -> (B, P, H)
        return summed / weights.sum(-1, keepdim=True).clamp(min=1.0)


class ImageEncoder(nn.Module):
    """ResNet-family image encoder giving V^s (patch grid) and V^r (region crops)."""

    def __init__(self, backbone: nn.Module, num_patches: int = 49):
        super().__init__()
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"num_patches: expected a square number (49 = 7×7), got {num_patches}")
        self.backbone = backbone
        self.grid = side
        sizes = getattr(backbone.config, "hidden_sizes", None)
        self.hidden_size = int(sizes[-1] if sizes else backbone.config.hidden_size)

    def feature_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last feature map (n, channels, h, w) of (n, 3, H, W) images."""
        return self.backbone(pixel_values=pixel_values).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor,
        region_pixel_values: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        patches: bool = True,
    ) -> VisualFeatures:
        """Encode the images that exist and their region crops in one backbone call.

        Args:
            pixel_values: (batch, 3, H, W) processed images (anything where masked).
            image_mask: (batch,) bool, False where the sample has no image.
            region_pixel_values: (batch, regions, 3, H, W) crops, or None for no coarse level.
            region_mask: (batch, regions) bool, False for padding.
            patches: compute V^s (False when the fine level is off).

        Returns:
            :class:`VisualFeatures` with zero vectors wherever a mask is False.
        """
        batch = pixel_values.shape[0]
        parts = []
        if patches:
            parts.append(pixel_values[image_mask])  # (n_images, 3, H, W)
        if region_pixel_values is not None:
            parts.append(region_pixel_values[region_mask])  # (n_regions, 3, H, W)
        pixels = torch.cat(parts) if parts else pixel_values[:0]
        maps = self.feature_maps(pixels) if pixels.shape[0] else None
        dtype = maps.dtype if maps is not None else pixel_values.dtype  # autocast may change it
        offset = 0

        patch_features = patch_mask = None
        if patches:
            patch_features = pixel_values.new_zeros(
                batch, self.grid * self.grid, self.hidden_size, dtype=dtype
            )
            count = int(image_mask.sum())
            if count:
                grid = F.adaptive_avg_pool2d(maps[:count], self.grid)  # (n, C, 7, 7)
                patch_features = patch_features.index_put((image_mask,), grid.flatten(2).transpose(1, 2))
            patch_mask = image_mask[:, None].expand(-1, self.grid * self.grid)
            offset = count

        region_features = None
        if region_pixel_values is not None:
            region_features = pixel_values.new_zeros(
                batch, region_mask.shape[1], self.hidden_size, dtype=dtype
            )
            if int(region_mask.sum()):
                pooled = maps[offset:].mean(dim=(2, 3))  # (n_regions, C)
                region_features = region_features.index_put((region_mask,), pooled)
        return VisualFeatures(patch_features, patch_mask, region_features, region_mask)
