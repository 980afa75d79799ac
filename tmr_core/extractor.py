"""The TMR extractor: encoders → multi-grained attention → divergence fusion → NER/RE head.

One forward pass, paper §3.2–3.5:

1. T^w, T^p from the text encoder; V^s, V^r (and V'^s, V'^r of the back-translation) from the
   image encoder (:mod:`tmr_core.encoders`).
2. G^f, G^c on (t, v) and G'^f, G'^c on (t, v') with the same attention weights (Eq. 1–3,
   :mod:`tmr_core.attention`).
3. G* = α_s·G^f + α_c·G^c and G'* likewise (Eq. 4, :mod:`tmr_core.fusion`), α from the MDE's
   ``divergence`` column (``back_translation_alpha``: G'* takes v's α, as Eq. 4 prints it, or
   the MDE's score of (t, v'), as TMR's code does). G^f and G^c are the image's evidence per
   word, without the text state, so α_w (the zero block's weight) shrinks the image's part only.
4. NER: Multihead(T^w + G*, T^w + G'*) + CRF (Eq. 7–9); RE: T_i ⊕ T_j ⊕ p ⊕ h with
   h = mean(G* + G'*), softmax (Eq. 10–11) (:mod:`tmr_core.heads`).

Ablations (paper Table 2) are config switches that remove one path and keep the rest of the
architecture, so a row differs from ``full`` only in what it names:
``use_back_translation=False`` never encodes v' (NER: Eq. 7 attends T^w + G* over itself;
RE: h = mean G*); ``use_mde=False`` uses ``fixed_alpha`` for every sample (no parameter changes);
``use_fine``/``use_coarse=False`` drop a level (its attention blocks are not built, and the
image encoder skips patches or crops); ``text_only=True`` builds no image encoder and no
cross-modal attention (G* = G'* = 0: Eq. 7 attends T^w over itself, h = 0).
:func:`parameter_counts` shows what each removes
(``tests/test_extractor.py::test_each_ablation_removes_only_what_it_names``).

A checkpoint folder is self-contained: ``config.json`` (this config, backbone configs included),
``model.safetensors``, and the tokenizer and image-processor files.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tmr_core import storage
from tmr_core.attention import MultiGrainedAttention
from tmr_core.encoders import (
    ImageEncoder,
    TextEncoder,
    backbone_config_dict,
    backbone_from_config,
    load_image_encoder,
    load_text_encoder,
)
from tmr_core.fusion import divergence_fusion
from tmr_core.heads import NERHead, REHead, split_bio
from tmr_core.modeling import PretrainedModule
from tmr_core.phrases import PHRASE_LENGTHS
from tmr_core.schema import NER_TAGS

# Paper Table 2's ablations as TMRConfig switches; each removes only what its name says.
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_back_translation": {"use_back_translation": False},
    "no_mde": {"use_mde": False},
    "no_fine": {"use_fine": False},
    "no_coarse": {"use_coarse": False},
    "text_only": {"text_only": True},
}

TASK_DEFAULTS = {
    "ner": {"max_length": 80, "max_phrase_len": PHRASE_LENGTHS["ner"]},
    "re": {"max_length": 128, "max_phrase_len": PHRASE_LENGTHS["re"]},
}


@dataclass
class TMRConfig:
    """Everything that fixes the extractor's architecture and its input encoding.

    ``max_length`` / ``max_phrase_len`` left as None take the paper's values for the task
    (80 / 4 for NER, 128 / 6 for RE). ``text_config`` / ``image_config`` are filled by
    :meth:`TMRExtractor.build` with the backbones' configs, so a saved model rebuilds without
    fetching anything by name.
    """

    task: str = "ner"  # "ner" or "re"
    labels: tuple[str, ...] = ()  # NER: BIO tags (default schema.NER_TAGS); RE: relation labels (required)
    text_encoder: str = "bert-base-uncased"  # name or path for AutoModel/AutoTokenizer
    image_encoder: str = "microsoft/resnet-50"  # name or path for AutoModel/AutoImageProcessor
    text_config: dict = field(default_factory=dict)  # the text backbone's config.to_dict()
    image_config: dict = field(default_factory=dict)  # the image backbone's config.to_dict()
    max_length: int | None = None  # word pieces incl. [CLS]/[SEP] (and RE markers)
    max_phrase_len: int | None = None  # words kept per noun phrase
    max_phrases: int = 8  # noun phrases kept per sample
    num_regions: int = 3  # grounded region crops per image (V^r)
    # An image whose grounding leaves no usable box gets the whole image as its one region, so the
    # coarse level still sees the picture (HVPNeT likewise pairs the global image with its crops).
    whole_image_region: bool = True
    num_patches: int = 49  # patch grid of V^s, a square number
    num_heads: int = 8  # heads of every attention block; must divide the text hidden size
    dropout: float = 0.1
    use_back_translation: bool = True  # G' from (t, v') (Eq. 3)
    use_mde: bool = True  # α from the batch's divergence column (Eq. 4); else fixed_alpha
    use_fine: bool = True  # G^f from (T^w, V^s)
    use_coarse: bool = True  # G^c from (T^p, V^r)
    text_only: bool = False  # no image path at all
    fixed_alpha: tuple[float, float, float] = (0.5, 0.5, 0.0)  # (strengthen, complement, weaken) without MDE
    # α of G'* (Eq. 4): "image" reuses the MDE's score of (t, v) for both views, as Eq. 4 prints
    # it; "back_translation" uses its score of (t, v') (column back_translation_divergence), as
    # TMR's code does.
    back_translation_alpha: str = "image"
    entity_markers: tuple[str, ...] = (
        "[unused0]",
        "[unused1]",
        "[unused2]",
        "[unused3]",
    )  # RE: <h> </h> <t> </t>
    none_label: str = "None"  # RE: the no-relation label

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"task: expected 'ner' or 're', got {self.task!r}")
        self.labels = tuple(self.labels) or (NER_TAGS if self.task == "ner" else ())
        self.fixed_alpha = tuple(float(v) for v in self.fixed_alpha)
        self.entity_markers = tuple(self.entity_markers)
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not self.labels:
            problems.append("labels: the RE relation set is required (e.g. read_rel2id's keys in id order)")
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: duplicates in {list(self.labels)}")
        if self.task == "ner":
            try:
                [split_bio(tag) for tag in self.labels]
            except ValueError as error:
                problems.append(str(error))
        if self.max_length < 3 + (4 if self.task == "re" else 0):
            problems.append(f"max_length: {self.max_length} leaves no room for text")
        if self.max_phrase_len < 1 or self.max_phrases < 1:
            problems.append("max_phrase_len/max_phrases: expected ≥ 1")
        if self.num_regions < (1 if self.use_coarse and not self.text_only else 0):
            problems.append(f"num_regions: {self.num_regions}; the coarse level needs ≥ 1 region slot")
        if int(self.num_patches**0.5) ** 2 != self.num_patches:
            problems.append(f"num_patches: {self.num_patches} is not a square number (49 = 7×7)")
        if not (self.text_only or self.use_fine or self.use_coarse):
            problems.append("use_fine/use_coarse: both off leaves no image path; set text_only=true instead")
        if len(self.fixed_alpha) != 3 or abs(sum(self.fixed_alpha) - 1) > 1e-4 or min(self.fixed_alpha) < 0:
            problems.append(
                f"fixed_alpha: {list(self.fixed_alpha)}; expected 3 non-negative scores summing to 1"
            )
        if self.back_translation_alpha not in ("image", "back_translation"):
            problems.append(
                f"back_translation_alpha: {self.back_translation_alpha!r}; expected 'image' or 'back_translation'"
            )
        if len(self.entity_markers) != 4:
            problems.append(
                f"entity_markers: expected 4 tokens (<h> </h> <t> </t>), got {len(self.entity_markers)}"
            )
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout: {self.dropout} is not in [0, 1)")
        if problems:
            raise ValueError("TMRConfig: " + "; ".join(problems))

    @property
    def uses_images(self) -> bool:
        return not self.text_only



@dataclass
class TMROutput:
    """What :meth:`TMRExtractor.forward` returns.

    loss: scalar, present when the batch has ``labels`` (CRF NLL for NER, cross-entropy for RE).
    logits: NER: CRF emission scores (batch, words, tags); RE: relation logits (batch, relations).
    word_mask: (batch, words) bool, the words the model saw.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    word_mask: torch.Tensor


class TMRExtractor(PretrainedModule):
    """TMR for multimodal NER or RE (paper §3, Fig. 2).

    Args:
        config: the architecture and encoding settings.
        text_backbone: a BERT-family ``AutoModel``.
        image_backbone: a ResNet-family ``AutoModel``; None (and unused) with ``text_only``.
        tokenizer: the text backbone's tokenizer (kept for the collator and for checkpoints).
        image_processor: the image backbone's processor (same).
    """

    config_class = TMRConfig

    def __init__(
        self,
        config: TMRConfig,
        text_backbone: nn.Module,
        image_backbone: nn.Module | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
    ):
        super().__init__(config)
        self.text_encoder = TextEncoder(text_backbone)
        hidden = self.text_encoder.hidden_size
        self.image_encoder = self.attention = None
        if config.uses_images:
            if image_backbone is None:
                raise ValueError("image_backbone: required unless config.text_only")
            self.image_encoder = ImageEncoder(image_backbone, config.num_patches)
            self.attention = MultiGrainedAttention(
                hidden,
                self.image_encoder.hidden_size,
                config.num_heads,
                config.dropout,
                use_fine=config.use_fine,
                use_coarse=config.use_coarse,
            )
        if config.task == "ner":
            self.head = NERHead(hidden, config.labels, config.num_heads, config.dropout)
        else:
            self.head = REHead(hidden, len(config.labels), config.dropout)
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    # ----- building and checkpoints -------------------------------------------------------

    @classmethod
    def build(cls, config: TMRConfig) -> TMRExtractor:
        """A fresh extractor with pretrained backbones, tokenizer and processor loaded by name/path.

        The backbones' configs are stored in the returned model's config (``text_config``,
        ``image_config``) so :meth:`from_pretrained` needs nothing but the checkpoint folder.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        text_backbone = load_text_encoder(config.text_encoder)
        tokenizer = AutoTokenizer.from_pretrained(config.text_encoder)
        image_backbone = image_processor = None
        image_config: dict = {}
        if config.uses_images:
            image_backbone = load_image_encoder(config.image_encoder)
            image_processor = AutoImageProcessor.from_pretrained(config.image_encoder)
            image_config = backbone_config_dict(image_backbone)
        config = dataclasses.replace(
            config, text_config=backbone_config_dict(text_backbone), image_config=image_config
        )
        return cls(config, text_backbone, image_backbone, tokenizer, image_processor)

    @classmethod
    def from_saved_config(cls, config: TMRConfig) -> TMRExtractor:
        """The architecture from the stored backbone configs (random weights, no download)."""
        text_backbone = backbone_from_config(config.text_config, "text_config")
        image_backbone = (
            backbone_from_config(config.image_config, "image_config") if config.uses_images else None
        )
        return cls(config, text_backbone, image_backbone)

    def save_pretrained(self, directory: str, options: storage.StorageOptions | None = None) -> None:
        """Write config, safetensors weights, tokenizer and image-processor files to ``directory``."""
        if storage.is_remote(directory):
            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(tmp)
                for name in sorted(os.listdir(tmp)):
                    with open(os.path.join(tmp, name), "rb") as handle:
                        storage.write_bytes_atomic(storage.join(directory, name), handle.read(), options)
            return
        super().save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        device: str | torch.device = "cpu",
        options: storage.StorageOptions | None = None,
    ) -> TMRExtractor:
        """Load a folder written by :meth:`save_pretrained` (local or ``s3://``); never unpickles."""
        if storage.is_remote(directory):
            with tempfile.TemporaryDirectory() as tmp:
                _download_folder(directory, tmp, options)
                return cls.from_pretrained(tmp, device=device)
        from transformers import AutoImageProcessor, AutoTokenizer

        model = super().from_pretrained(directory, device=device)
        model.tokenizer = AutoTokenizer.from_pretrained(directory)
        if model.config.uses_images:
            model.image_processor = AutoImageProcessor.from_pretrained(directory)
        return model

    def collator(self, storage_options: storage.StorageOptions | None = None, pixel_cache_bytes: int = 0):
        """A :class:`tmr_core.collate.TMRCollator` matching this model's tokenizer, processor and config."""
        from tmr_core.collate import TMRCollator

        return TMRCollator(self.tokenizer, self.image_processor, self.config, storage_options=storage_options,
                           pixel_cache_bytes=pixel_cache_bytes)

    # ----- forward ------------------------------------------------------------------------

    def divergence_weights(self, batch: dict[str, torch.Tensor], key: str = "divergence") -> torch.Tensor:
        """α (batch, 3): the batch's ``key`` column with ``use_mde``, else ``fixed_alpha`` per sample.

        Raises:
            ValueError: ``use_mde`` is on and the batch has no such column.
        """
        batch_size, device = batch["input_ids"].shape[0], batch["input_ids"].device
        if not self.config.use_mde:
            return torch.tensor(self.config.fixed_alpha, device=device).expand(batch_size, 3)
        if key not in batch:
            raise ValueError(
                f"batch: no {key!r} column but use_mde=True; run score_divergence first or set use_mde=false"
            )
        return batch[key].float()

    def back_translation_weights(self, batch: dict[str, torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
        """α of G'*: v's (``back_translation_alpha="image"``) or the MDE's score of (t, v')."""
        if self.config.back_translation_alpha == "image" or not self.config.use_mde:
            return alpha
        return self.divergence_weights(batch, "bt_divergence")

    def grounded(
        self,
        words: torch.Tensor,
        phrases: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        alpha: torch.Tensor,
        prefix: str = "",
    ) -> torch.Tensor:
        """G* (``prefix=""``, real image) or G'* (``prefix="bt_"``, back-translation): Eq. 1, 2, 4."""
        config = self.config
        visual = self.image_encoder(
            batch[f"{prefix}pixel_values"],
            batch[f"{prefix}image_mask"],
            batch[f"{prefix}region_pixel_values"] if config.use_coarse else None,
            batch[f"{prefix}region_mask"] if config.use_coarse else None,
            patches=config.use_fine,
        )
        levels = self.attention(words, phrases, batch.get("phrase_mask"), visual)
        return divergence_fusion(levels.fine, levels.coarse, alpha)

    def forward(self, batch: dict[str, torch.Tensor] | None = None, **inputs: torch.Tensor) -> TMROutput:
        """Run the model on a collated batch (:class:`tmr_core.collate.TMRCollator`).

        Called as ``model(batch)`` or ``model(**batch)`` (what ``training.train_epoch`` and DDP do).

        Args:
            batch: tensors from the collator; ``labels`` present → the loss is computed.

        Returns:
            :class:`TMROutput`.
        """
        batch = {**(batch or {}), **inputs}
        config = self.config
        word_mask = batch["word_mask"]
        states = self.text_encoder(batch["input_ids"], batch["attention_mask"])  # (B, L, H)
        words = self.text_encoder.word_features(states, batch["word_starts"], word_mask)  # T^w (B, W, H)
        phrases = None
        if config.task == "re" or (config.uses_images and config.use_coarse):
            phrases = self.text_encoder.phrase_features(
                states, batch["phrase_spans"], batch["phrase_mask"]
            )  # T^p

        g_star = g_back = None  # the image's evidence per word (Eq. 4), None when absent
        if config.uses_images:
            alpha = self.divergence_weights(batch)
            g_star = self.grounded(words, phrases, batch, alpha)
            if config.use_back_translation:
                g_back = self.grounded(words, phrases, batch, self.back_translation_weights(batch, alpha), prefix="bt_")

        labels = batch.get("labels")
        if config.task == "ner":
            queries = words if g_star is None else words + g_star  # T^w + G*
            keys = None if g_back is None else words + g_back  # T^w + G'*; None: self-attention
            logits = self.head(queries, keys, word_mask)
            loss = self.head.loss(logits, labels, word_mask) if labels is not None else None
            return TMROutput(loss, logits, word_mask)

        if g_star is None:  # text only: no image evidence, h = 0
            pair = torch.zeros_like(words[:, 0])
        else:
            evidence = g_star if g_back is None else g_star + g_back  # h = G* + G'*
            weights = word_mask[..., None].to(evidence.dtype)
            pair = (evidence * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over words (B, H)
        phrase_sum = phrases.sum(1)  # p: phrase_features is zero on padding (B, H)
        markers = batch["entity_positions"]  # (B, 2) positions of the head/tail start markers
        rows = torch.arange(states.shape[0], device=states.device)
        logits = self.head(states[rows, markers[:, 0]], states[rows, markers[:, 1]], phrase_sum, pair)
        loss = self.head.loss(logits, labels) if labels is not None else None
        return TMROutput(loss, logits, word_mask)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> list:
        """Predictions in label space.

        Returns:
            NER: one tag list per sample, one tag per original token (``num_tokens``); tokens the
            model did not see (no word piece, truncated) read ``O``. Always valid BIO.
            RE: one ``(relation, {relation: probability})`` per sample.
        """
        output = self.forward({k: v for k, v in batch.items() if k != "labels"})
        labels = self.config.labels
        if self.config.task == "ner":
            paths = self.head.decode(output.logits, output.word_mask)
            lengths = batch["num_tokens"].tolist()
            return [[labels[i] for i in path[:length]] for path, length in zip(paths, lengths, strict=True)]
        probabilities = output.logits.float().softmax(dim=-1).cpu()
        return [
            (
                labels[int(row.argmax())],
                {label: float(p) for label, p in zip(labels, row.tolist(), strict=True)},
            )
            for row in probabilities
        ]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component: the two encoders, each cross-modal attention block, the head."""
    parts = {"text_encoder": model.text_encoder, "image_encoder": model.image_encoder, "head": model.head}
    if model.attention is not None:
        parts |= {f"attention.{name}": block for name, block in model.attention.named_children()}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items() if part is not None}


def _download_folder(uri: str, local: str, options: storage.StorageOptions | None) -> None:
    """Copy every file directly under ``uri`` (an ``s3://`` prefix) into the folder ``local``."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{uri}: no checkpoint files there")
    for info in files:
        with (
            fs.open_input_file(info.path) as source,
            open(os.path.join(local, info.base_name), "wb") as target,
        ):
            target.write(source.read())
