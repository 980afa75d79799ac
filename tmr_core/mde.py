"""Multimodal Divergence Estimator (MDE), paper §3.4, Eq. 5–6, Fig. 3.

A ViLT single-stream transformer (transformers ``ViltModel``) reads the caption's word pieces and
the linearly projected image patches as one sequence; its pooled output, passed through a small
projection, is z. A 3-way linear head maps z to the confidence scores (α_s, α_c, α_w) over
(strengthen, complement, weaken) with a softmax, so they sum to 1 as Eq. 4 requires.

Three training objectives, for the paper's Table 3 comparison:

- ``"ce"``: cross-entropy on the head.
- ``"ce_negative_sampling"``: cross-entropy on the batch plus extra in-domain *weaken* negatives
  made inside the batch by :func:`same_source_swaps`: each strengthen/complement row's caption is
  paired with the image of another strengthen/complement row *of the same source*. In the
  corpus every source supplies one category (MSCOCO strengthen, LAION complement), so with plain
  CE the style of a source is enough to tell strengthen from complement, and weaken pairs (images
  swapped across sources) carry a style mismatch. Same-source swaps are weaken pairs whose text
  and image share one style, so style alone no longer separates weaken from the rest. A random
  swap can land on an image that shows an object the caption names (on the synthetic corpus about
  half do): where the corpus lists its objects (``objects_named`` / ``objects_shown``), a swap is
  kept as *weaken* only when the new image shows none of them; without the lists it stays the
  paper's random substitution (§3.4).
- ``"supcon"``: supervised contrastive loss (Eq. 6) on z trains the encoder. The head is fitted
  on frozen z: the loss also holds a cross-entropy on ``head(z.detach())``, which trains the head
  alone (the encoder's gradient is the SupCon gradient only, and every parameter takes part, so
  DDP needs no ``find_unused_parameters``); after training, :meth:`fit_head_on_frozen` refits the
  head on the final frozen z (or call :meth:`freeze_encoder` and train with ``"ce"``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmr_core import storage
from tmr_core.losses import supervised_contrastive_loss
from tmr_core.modeling import PretrainedModule
from tmr_core.schema import ALIGNMENT_CATEGORIES

OBJECTIVES = ("ce", "ce_negative_sampling", "supcon")


@dataclass
class MDEConfig:
    """What builds a :class:`MultimodalDivergenceEstimator`; saved as ``config.json`` beside the weights."""

    backbone: str = "dandelin/vilt-b32-mlm"
    """ViLT checkpoint name or local folder that :meth:`MultimodalDivergenceEstimator.from_backbone` loads."""
    backbone_config: dict | None = None
    """The backbone's ``ViltConfig.to_dict()``; filled when the model is built so that
    ``from_pretrained(dir)`` rebuilds the architecture without downloading anything."""
    projection_dim: int = 128
    """Size of z, the projected pooled output that SupCon (Eq. 6) compares."""
    temperature: float = 0.07
    """τ of the supervised contrastive loss (Eq. 6)."""
    objective: str = "supcon"
    """Loss ``forward`` uses when given labels: ce | ce_negative_sampling | supcon."""
    labels: tuple[str, ...] = field(default=ALIGNMENT_CATEGORIES)
    """Output order of the head; fixed to (strengthen, complement, weaken), the order Eq. 4 uses."""

    def __post_init__(self):
        self.labels = tuple(self.labels)
        if self.labels != ALIGNMENT_CATEGORIES:
            raise ValueError(f"MDEConfig.labels: expected {ALIGNMENT_CATEGORIES}, got {self.labels}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"MDEConfig.objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.projection_dim < 1:
            raise ValueError(f"MDEConfig.projection_dim: expected >= 1, got {self.projection_dim}")
        if not self.temperature > 0:
            raise ValueError(f"MDEConfig.temperature: expected > 0, got {self.temperature}")


@dataclass
class MDEOutput:
    """Outputs for the rows the caller passed (extra negatives only enter ``loss``).

    Attributes:
        z: (B, projection_dim) projected pooled representation.
        logits: (B, 3) head scores in (strengthen, complement, weaken) order.
        probs: (B, 3) softmax of ``logits`` = (α_s, α_c, α_w), rows sum to 1.
        loss: scalar when labels were given, else None.
        num_negatives: same-source negatives added to the loss (``ce_negative_sampling``).
    """

    z: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    loss: torch.Tensor | None = None
    num_negatives: int = 0


def same_source_swaps(
    labels: torch.Tensor,
    source_ids: torch.Tensor,
    weaken_label: int,
    generator: torch.Generator | None = None,
    images: torch.Tensor | None = None,
    named_objects: torch.Tensor | None = None,
    shown_objects: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair captions with images of other rows from the same source, as new *weaken* samples.

    Among the aligned rows (label != ``weaken_label``) of each source with at least two of them,
    a random permutation is rotated by one, so each row's caption gets the image of a different
    row of its own source; every eligible row yields exactly one negative. A pair whose two images
    are identical (two captions of one picture) is dropped when ``images`` is given.

    Args:
        labels: (B,) category indices.
        source_ids: (B,) integer id of each row's source dataset (only equality matters).
        weaken_label: index of *weaken* in the label order.
        generator: CPU generator for the permutation (reproducible negatives).
        images: optional (B, ...) pixel tensor used to drop identical-image pairs.
        named_objects, shown_objects: optional (B, K) bool, the objects each caption names and each
            image shows; a pair whose new image shows an object its caption names is dropped (it
            is no *weaken* pair).

    Returns:
        ``(text_rows, image_rows)``: two (K,) long tensors on ``labels.device``; sample k takes the
        text of row ``text_rows[k]`` and the image of row ``image_rows[k]``, and the two rows have
        the same source and different indices.

    Raises:
        ValueError: ``labels`` and ``source_ids`` are not both (B,).
    """
    if labels.dim() != 1 or source_ids.shape != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and source_ids {tuple(source_ids.shape)}: expected both (B,)"
        )
    labels_cpu, sources_cpu = labels.cpu(), source_ids.cpu()
    aligned = labels_cpu != weaken_label
    text_rows, image_rows = [], []
    for source in torch.unique(sources_cpu[aligned]).tolist():
        rows = torch.nonzero(aligned & (sources_cpu == source)).flatten()
        if rows.numel() < 2:
            continue
        order = rows[torch.randperm(rows.numel(), generator=generator)]
        text_rows.append(order)
        image_rows.append(order.roll(1))  # a rotation never maps a row to itself
    if not text_rows:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty
    text_index, image_index = torch.cat(text_rows), torch.cat(image_rows)
    if images is not None:
        flat = images.detach().cpu().flatten(1)
        differs = (flat[text_index] != flat[image_index]).any(dim=1)
        text_index, image_index = text_index[differs], image_index[differs]
    if named_objects is not None and shown_objects is not None:
        named, shown = named_objects.detach().cpu().bool(), shown_objects.detach().cpu().bool()
        unrelated = ~(named[text_index] & shown[image_index]).any(dim=1)
        text_index, image_index = text_index[unrelated], image_index[unrelated]
    return text_index.to(labels.device), image_index.to(labels.device)


class MultimodalDivergenceEstimator(PretrainedModule):
    """d(t, v) -> (α_s, α_c, α_w): ViLT encoder, projection to z, 3-way softmax head (§3.4, Fig. 3).

    Build it with :meth:`from_backbone` (a ViLT checkpoint name or folder, e.g. the tiny
    ``.cache/tmr-models/mde-backbone``), with ``MultimodalDivergenceEstimator(config)`` when
    ``config.backbone_config`` holds a ViltConfig dict (random init: tiny tests), or with
    ``from_pretrained(dir)`` for a saved estimator (safetensors only, nothing downloaded).
    """

    config_class = MDEConfig

    def __init__(self, config: MDEConfig, backbone: nn.Module | None = None):
        from transformers import ViltConfig, ViltModel

        if backbone is None:
            if config.backbone_config is None:
                raise ValueError(
                    "MDEConfig.backbone_config is None: build from a checkpoint with "
                    "MultimodalDivergenceEstimator.from_backbone(name_or_path), or pass a ViltConfig dict"
                )
            backbone = ViltModel(ViltConfig.from_dict(config.backbone_config))
        # Stored as its JSON form (e.g. id2label keys become strings) so a reloaded config compares equal.
        config = dataclasses.replace(
            config, backbone_config=json.loads(backbone.config.to_json_string(use_diff=False))
        )
        super().__init__(config)
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        # An MLP projection as in SupCon (Khosla et al., 2020): the contrastive geometry lives in z.
        self.projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, config.projection_dim)
        )
        self.head = nn.Linear(config.projection_dim, len(config.labels))
        self.weaken_label = config.labels.index("weaken")

    @classmethod
    def from_backbone(cls, backbone: str, **config_fields: Any) -> MultimodalDivergenceEstimator:
        """Load a pretrained ViLT by name or local path and put a fresh projection and head on it."""
        from transformers import ViltModel

        return cls(
            MDEConfig(backbone=backbone, **config_fields), backbone=ViltModel.from_pretrained(backbone)
        )

    def freeze_encoder(self, frozen: bool = True) -> MultimodalDivergenceEstimator:
        """Stop (or restart) gradients into the backbone and projection, leaving the head trainable."""
        for module in (self.backbone, self.projection):
            module.requires_grad_(not frozen)
        return self

    def _check_inputs(self, input_ids, attention_mask, pixel_values, pixel_mask, labels, source_ids):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, L), got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        max_length = self.backbone.config.max_position_embeddings
        if length > max_length:
            raise ValueError(
                f"input_ids: {length} tokens but the backbone has {max_length} text positions; "
                f"lower the collator's max_length"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        if pixel_values.dim() != 4 or pixel_values.shape[0] != batch:
            raise ValueError(f"pixel_values: expected ({batch}, C, H, W), got {tuple(pixel_values.shape)}")
        if pixel_mask is not None and pixel_mask.shape != (batch, *pixel_values.shape[2:]):
            raise ValueError(
                f"pixel_mask: expected {(batch, *pixel_values.shape[2:])}, got {tuple(pixel_mask.shape)}"
            )
        if labels is not None:
            if labels.shape != (batch,):
                raise ValueError(f"labels: expected ({batch},), got {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.config.labels)):
                raise ValueError(
                    f"labels: expected indices in [0, {len(self.config.labels)}), got {labels.tolist()}"
                )
        if source_ids is not None and source_ids.shape != (batch,):
            raise ValueError(f"source_ids: expected ({batch},), got {tuple(source_ids.shape)}")

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z (B, projection_dim): the projected pooled output of the single-stream encoder."""
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
        )
        return self.projection(outputs.pooler_output)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        source_ids: torch.Tensor | None = None,
        objective: str | None = None,
        generator: torch.Generator | None = None,
        named_objects: torch.Tensor | None = None,
        shown_objects: torch.Tensor | None = None,
    ) -> MDEOutput:
        """Score text–image pairs and, given labels, compute the training loss (Eq. 6 for supcon).

        Args:
            input_ids, attention_mask, token_type_ids: (B, L) word pieces from the ViltProcessor.
            pixel_values: (B, 3, H, W); pixel_mask: (B, H, W), 1 on real pixels.
            labels: (B,) indices into (strengthen, complement, weaken); no loss without them.
            source_ids: (B,) source dataset of each row; required by ``ce_negative_sampling``.
            objective: ce | ce_negative_sampling | supcon; None uses ``config.objective``.
            generator: CPU generator for the negative-sampling permutation.
            named_objects, shown_objects: (B, K) bool object lists for ``ce_negative_sampling``
                (see :func:`same_source_swaps`); optional.

        Returns:
            :class:`MDEOutput` for the B given rows.

        Raises:
            ValueError: a tensor has the wrong shape, a label is out of range, the text is longer
                than the backbone's positions, the objective is unknown, or negative sampling
                lacks ``source_ids``.
        """
        objective = objective or self.config.objective
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        self._check_inputs(input_ids, attention_mask, pixel_values, pixel_mask, labels, source_ids)
        batch = input_ids.shape[0]

        num_negatives = 0
        if labels is not None and objective == "ce_negative_sampling":
            if source_ids is None:
                raise ValueError(
                    "source_ids: objective 'ce_negative_sampling' needs each row's source "
                    "(the collator adds it from a 'source' column)"
                )
            text_rows, image_rows = same_source_swaps(
                labels, source_ids, self.weaken_label, generator=generator, images=pixel_values,
                named_objects=named_objects, shown_objects=shown_objects,
            )
            num_negatives = int(text_rows.numel())
            if num_negatives:
                input_ids = torch.cat([input_ids, input_ids[text_rows]])
                attention_mask = torch.cat([attention_mask, attention_mask[text_rows]])
                if token_type_ids is not None:
                    token_type_ids = torch.cat([token_type_ids, token_type_ids[text_rows]])
                pixel_values = torch.cat([pixel_values, pixel_values[image_rows]])
                if pixel_mask is not None:
                    pixel_mask = torch.cat([pixel_mask, pixel_mask[image_rows]])
                labels = torch.cat([labels, labels.new_full((num_negatives,), self.weaken_label)])

        z = self.encode(input_ids, attention_mask, pixel_values, pixel_mask, token_type_ids)
        logits = self.head(z)
        loss = None
        if labels is not None:
            if objective == "supcon":
                # The CE term sees z.detach(): it trains the head on frozen features only.
                loss = supervised_contrastive_loss(z, labels, self.config.temperature) + F.cross_entropy(
                    self.head(z.detach()), labels
                )
            else:
                loss = F.cross_entropy(logits, labels)
        logits = logits[:batch]
        return MDEOutput(
            z=z[:batch], logits=logits, probs=logits.softmax(dim=-1), loss=loss, num_negatives=num_negatives
        )

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """(B, 3) divergence scores (α_s, α_c, α_w), rows summing to 1, without gradients.

        ViLT's embedding draws a random order of the image patches on every call, in eval mode
        too (transformers' ``ViltEmbeddings.visual_embed``); the order moves the scores by ~1e-7,
        which a small extractor amplifies. The draw uses ``seed`` on a forked RNG, so scores are a
        function of the input alone and the caller's random state is left untouched.

        Leaves the train/eval mode as it is (``from_pretrained`` returns the model in eval mode).
        """
        devices = [pixel_values.device] if pixel_values.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self(input_ids, attention_mask, pixel_values, pixel_mask, token_type_ids).probs

    def fit_head_on_frozen(
        self,
        batches: Iterable[Mapping[str, torch.Tensor]],
        epochs: int = 20,
        lr: float = 1e-2,
        device: str | torch.device = "cpu",
    ) -> dict[str, float]:
        """Refit the 3-way head by cross-entropy on frozen z (the second stage of SupCon training).

        z is computed once per batch in eval mode without gradients (the batches are read once,
        so a streaming iterator works), then only the head is trained with AdamW for ``epochs``
        passes over the cached z.

        Args:
            batches: collated batches with ``labels`` (the :class:`MDECollator` output).

        Returns:
            ``{"first_loss", "loss", "steps"}``: mean CE of the first and last epoch, head steps taken.

        Raises:
            ValueError: a batch has no labels, ``batches`` is empty, or ``epochs`` < 1.
        """
        from tmr_core.training import move_to_device

        if epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {epochs}")
        was_training = self.training
        self.eval()
        cached: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for index, batch in enumerate(batches):
                batch = move_to_device(dict(batch), device)
                labels = batch.pop("labels", None)
                if labels is None:
                    raise ValueError(f"batches[{index}]: no 'labels'; fitting the head needs labelled rows")
                for key in TRAINING_KEYS:
                    batch.pop(key, None)
                cached.append((self.encode(**batch), labels))
        if not cached:
            raise ValueError("batches: empty; fitting the head needs at least one labelled batch")
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        epoch_losses, steps = [], 0
        self.head.train()
        for _ in range(epochs):
            total = 0.0
            for z, labels in cached:
                loss = F.cross_entropy(self.head(z), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
            epoch_losses.append(total / len(cached))
        self.train(was_training)
        return {"first_loss": epoch_losses[0], "loss": epoch_losses[-1], "steps": steps}


# Batch keys that only the training loss reads (not inputs of :meth:`MultimodalDivergenceEstimator.encode`).
TRAINING_KEYS = ("labels", "source_ids", "named_objects", "shown_objects")


class MDECollator:
    """Turn MDE corpus rows into a batch for :class:`MultimodalDivergenceEstimator` (``model(**batch)``).

    Each row is a mapping with:
        - text: ``caption`` (str) or ``tokens`` (list of words, joined by spaces);
        - image: ``image`` (a PIL image or encoded bytes) or ``image_uri`` (local path or ``s3://``,
          read with :func:`tmr_core.storage.read_bytes`); converted to RGB;
        - optional ``label``: a category name or index in (strengthen, complement, weaken);
        - optional ``source``: the source dataset's name (for ``ce_negative_sampling``).

    Args:
        processor: a ``ViltProcessor`` (tokenizer + image processor).
        max_length: word pieces per caption after truncation (≤ the backbone's 40 text positions
            in ViLT checkpoints).
        storage_options: where ``s3://`` URIs are served.
        pixel_cache_bytes: keep up to this many bytes of processed pixels of rows read by
            ``image_uri``, for the next epoch (:class:`tmr_core.images.PixelCache`); 0: off.

    The batch holds ``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``,
    ``pixel_mask``; ``labels`` when every row has a label; ``source_ids`` when every row has a
    source (ids number the sorted source names of the batch: only equality matters);
    ``named_objects`` / ``shown_objects`` ((B, K) bool over the batch's object names) when every
    row has ``objects_named`` and ``objects_shown``.
    """

    def __init__(
        self, processor: Any, max_length: int = 40, storage_options: storage.StorageOptions | None = None,
        pixel_cache_bytes: int = 0,
    ):
        from tmr_core.images import PixelCache

        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.storage_options = storage_options
        self._pixels = PixelCache(pixel_cache_bytes)

    @staticmethod
    def _where(row: Mapping, index: int) -> str:
        return f"rows[{index}]" + (f" (id={row['id']!r})" if row.get("id") is not None else "")

    def _text(self, row: Mapping, index: int) -> str:
        if row.get("caption") is not None:
            return str(row["caption"])
        if row.get("tokens") is not None:
            return " ".join(row["tokens"])
        raise ValueError(f"{self._where(row, index)}: no 'caption' or 'tokens' to read the text from")

    def _image(self, row: Mapping, index: int):
        from PIL import Image

        image = row.get("image")
        if image is None and row.get("image_uri") is not None:
            image = storage.read_bytes(row["image_uri"], self.storage_options)
        if image is None:
            raise ValueError(f"{self._where(row, index)}: no 'image' or 'image_uri'; the MDE needs an image")
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        return image.convert("RGB")

    def _label(self, row: Mapping, index: int) -> int:
        label = row["label"]
        if isinstance(label, str) and label in ALIGNMENT_CATEGORIES:
            return ALIGNMENT_CATEGORIES.index(label)
        if isinstance(label, int) and 0 <= label < len(ALIGNMENT_CATEGORIES):
            return label
        raise ValueError(f"{self._where(row, index)}: label {label!r} is not one of {ALIGNMENT_CATEGORIES}")

    def _processed(self, images: list) -> list[torch.Tensor]:
        """Each image's own pixel values (3, h, w), unpadded: processed one by one, as the processor
        does before it pads a batch to its largest image."""
        values = self.processor.image_processor(images=images, do_pad=False)["pixel_values"]
        return [torch.as_tensor(value) for value in values]

    def _pixel_batch(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B, 3, H, W) padded bottom-right with zeros to the batch's largest image
        and ``pixel_mask`` (B, H, W) 1 on real pixels, as ViLT's processor pads; rows read by URI
        come from the pixel cache when they were processed before."""
        caching = self._pixels.max_bytes > 0
        keys = [row["image_uri"] if caching and row.get("image") is None and isinstance(row.get("image_uri"), str)
                else None for row in rows]
        found = [self._pixels.get(key) if key is not None else None for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            for i, values in zip(missing, self._processed([self._image(rows[i], i) for i in missing]), strict=True):
                found[i] = (values,)
                if keys[i] is not None:
                    self._pixels.put(keys[i], found[i])  # its own tensor, not a view of a batch
        images = [values for (values,) in found]
        height, width = max(v.shape[-2] for v in images), max(v.shape[-1] for v in images)
        pixel_values = torch.zeros(len(rows), images[0].shape[0], height, width, dtype=images[0].dtype)
        pixel_mask = torch.zeros(len(rows), height, width, dtype=torch.long)
        for i, values in enumerate(images):
            pixel_values[i, :, :values.shape[-2], :values.shape[-1]] = values
            pixel_mask[i, :values.shape[-2], :values.shape[-1]] = 1
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def _all_or_none(self, rows: Sequence[Mapping], key: str) -> bool:
        present = [row.get(key) is not None for row in rows]
        if any(present) and not all(present):
            missing = present.index(False)
            raise ValueError(f"{self._where(rows[missing], missing)}: no '{key}' while other rows have one")
        return all(present)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("rows: expected at least one row")
        encoded = self.processor.tokenizer(
            [self._text(row, i) for i, row in enumerate(rows)],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
        batch |= self._pixel_batch(rows)
        if self._all_or_none(rows, "label"):
            batch["labels"] = torch.tensor(
                [self._label(row, i) for i, row in enumerate(rows)], dtype=torch.long
            )
        if self._all_or_none(rows, "source"):
            names = sorted({str(row["source"]) for row in rows})
            batch["source_ids"] = torch.tensor(
                [names.index(str(row["source"])) for row in rows], dtype=torch.long
            )
        if self._all_or_none(rows, "objects_named") and self._all_or_none(rows, "objects_shown"):
            batch["named_objects"], batch["shown_objects"] = _object_masks(rows)
        return batch


def _object_masks(rows: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot (B, K) masks of the objects each caption names and each image shows."""
    def listed(value: Any) -> list[str]:
        return [str(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]

    named = [listed(row["objects_named"]) for row in rows]
    shown = [listed(row["objects_shown"]) for row in rows]
    vocabulary = {name: i for i, name in enumerate(sorted({n for row in named + shown for n in row}))}
    masks = torch.zeros(2, len(rows), max(1, len(vocabulary)), dtype=torch.bool)
    for which, lists in enumerate((named, shown)):
        for row, objects in enumerate(lists):
            for name in objects:
                masks[which, row, vocabulary[name]] = True
    return masks[0], masks[1]
