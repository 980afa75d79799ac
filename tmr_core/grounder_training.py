"""Fine-tuning the phrase grounder (paper §3.2, V^r) on known boxes, as DETR-family detectors train.

TMR takes its 3 regions per image from a visual-grounding toolkit queried with the sentence's noun
phrases. Where the objects' boxes are known (the synthetic benchmark's ``ground_truth.jsonl``,
version 2), the zero-shot detector (OWL-ViT / OWLv2) is fine-tuned on them, queried exactly as at
inference (:class:`tmr_core.grounding.PhraseGrounder`): one example per (image, phrase list), a
phrase equal to a mention's text has that mention's box as its target, every other phrase has none.

The loss is the set-prediction loss of DETR (Carion et al., 2020) in the sigmoid form OWL-ViT
(Minderer et al., 2022) and Deformable DETR train with, reusing transformers' own parts
(``transformers.loss``): a Hungarian matching of predicted boxes to target boxes
(``DeformableDetrHungarianMatcher``: focal classification cost + L1 + GIoU, solved by scipy's
``linear_sum_assignment``), then on the matched pairs an L1 and a GIoU box loss, and a sigmoid focal
loss on every (box, query) logit — positive for a matched box and its target's query, negative
everywhere else, so unmatched boxes and target-less phrases learn to stay quiet. Each term is
normalised by the number of target boxes, as DETR does (under DDP, the count averaged over the
ranks, so the averaged gradient is that of one batch of every rank's images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmr_core.grounding import shown_boxes

PAD_QUERY_LOGIT = -1e4  # a padded query's logit: sigmoid 0, so it never wins a match


# --------------------------------------------------------------------------- examples


def grounding_examples(rows: Sequence[dict], truth: dict[str, dict]) -> list[dict]:
    """Training/evaluation examples from phrase-table rows and their ground truth.

    Each example is one image queried with one phrase list (the row's ``phrases`` texts, empty
    ones dropped, as :class:`~tmr_core.grounding.PhraseGrounder` drops them). Rows with the same
    image and phrases (an MNRE sentence's two instances) become one example holding the union of
    their boxes. Rows with no phrase or no image are skipped: nothing can be grounded for them.

    Args:
        rows: stage-table rows with ``id``, ``image_uri`` and ``phrases`` (list of ``{"text", ...}``).
        truth: ground-truth rows by id (:func:`tmr_core.grounding.shown_boxes` reads their boxes).

    Returns:
        dicts ``{"id", "task", "image_uri", "queries": [str], "gold_boxes": [[x1, y1, x2, y2]],
        "target_boxes": [[x1, y1, x2, y2]], "target_queries": [int]}``: ``gold_boxes`` are every
        object the image shows for a mention (what recall counts), ``target_boxes`` those whose
        mention text is one of the queries, with that query's index.

    Raises:
        KeyError: a row's id has no ground-truth row.
    """
    examples: dict[tuple, dict] = {}
    for row in rows:
        queries = [p["text"] for p in row.get("phrases") or [] if p.get("text") and p["text"].strip()]
        if not queries or not row.get("image_uri"):
            continue
        if row["id"] not in truth:
            raise KeyError(f"ground truth: no row for sample {row['id']!r}; is it the benchmark these tables came from?")
        key = (row["image_uri"], tuple(queries))
        example = examples.setdefault(key, {
            "id": row["id"], "task": str(row.get("task") or truth[row["id"]].get("task") or ""),
            "image_uri": row["image_uri"], "queries": queries, "gold_boxes": [], "target_boxes": [], "target_queries": [],
        })
        for text, box in shown_boxes(truth[row["id"]]):
            if box not in example["gold_boxes"]:
                example["gold_boxes"].append(box)
            for index in (i for i, query in enumerate(queries) if query == text):
                if (box, index) not in zip(example["target_boxes"], example["target_queries"], strict=True):
                    example["target_boxes"].append(box)
                    example["target_queries"].append(index)
    return list(examples.values())


# --------------------------------------------------------------------------- batches


def pads_to_square(processor: Any) -> bool:
    """Whether the processor pads images to a square before resizing (OWLv2 does, OWL-ViT does not):
    the detector's normalised boxes are then relative to the padded square."""
    return bool(getattr(getattr(processor, "image_processor", processor), "do_pad", False))


def normalise_boxes(boxes: Sequence[Sequence[float]], width: int, height: int, square: bool) -> torch.Tensor:
    """Pixel ``[x1, y1, x2, y2]`` boxes as the detector predicts them: ``(cx, cy, w, h)`` in [0, 1].

    Returns:
        ``(n, 4)`` float tensor.
    """
    boxes_t = torch.tensor([list(b) for b in boxes], dtype=torch.float32).reshape(-1, 4)
    scale = torch.tensor([max(width, height), max(width, height)] * 2 if square else [width, height] * 2,
                         dtype=torch.float32)
    x1, y1, x2, y2 = (boxes_t / scale).unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1).clamp(0.0, 1.0)


class GrounderCollator:
    """Examples → detector inputs + DETR-style targets, tokenised by the detector's own processor.

    The processor pads each image's phrase list to the batch's longest with blank queries, which
    the detector does not mask (its mask tests the first token id, a BOS for CLIP tokenisers), so
    ``query_mask`` marks the real ones and the loss ignores the rest.

    Args:
        processor: the detector's processor (``AutoProcessor``).
        open_image: ``uri -> PIL image`` (e.g. ``tmr_core.images.load_image`` with storage options).
        cache_images: keep decoded images in memory across epochs (small images only).
    """

    def __init__(self, processor: Any, open_image: Callable[[str], Any], cache_images: bool = False):
        self.processor, self.open_image, self.cache_images = processor, open_image, cache_images
        self.square = pads_to_square(processor)
        self._images: dict[str, Any] = {}

    def image(self, uri: str) -> Any:
        if not self.cache_images:
            return self.open_image(uri)
        if uri not in self._images:
            self._images[uri] = self.open_image(uri)
        return self._images[uri]

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        """Returns ``pixel_values (B, 3, H, W)``, ``input_ids``/``attention_mask (B*Q, L)``,
        ``query_mask (B, Q)`` and ``targets``: per image ``{"class_labels": (n,), "boxes": (n, 4)}``."""
        if not examples:
            raise ValueError("examples: empty batch")
        images = [self.image(e["image_uri"]) for e in examples]
        inputs = self.processor(images=images, text=[list(e["queries"]) for e in examples], truncation=True,
                                return_tensors="pt")
        num_queries = inputs["input_ids"].shape[0] // len(examples)
        query_mask = torch.zeros(len(examples), num_queries, dtype=torch.bool)
        targets = []
        for index, (example, image) in enumerate(zip(examples, images, strict=True)):
            query_mask[index, :len(example["queries"])] = True
            targets.append({
                "class_labels": torch.tensor(list(example["target_queries"]), dtype=torch.long),
                "boxes": normalise_boxes(example["target_boxes"], image.width, image.height, self.square),
            })
        return {"pixel_values": inputs["pixel_values"], "input_ids": inputs["input_ids"],
                "attention_mask": inputs["attention_mask"], "query_mask": query_mask, "targets": targets}


# --------------------------------------------------------------------------- loss


@dataclass
class GroundingLossConfig:
    """Weights of the set-prediction loss and of the matching cost (Deformable DETR's defaults)."""

    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    match_class: float = 2.0
    match_bbox: float = 5.0
    match_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        weights = {k: v for k, v in vars(self).items() if k not in ("focal_alpha",)}
        negative = [k for k, v in weights.items() if v < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)}: must be >= 0")
        if self.match_class == self.match_bbox == self.match_giou == 0:
            raise ValueError("match_class, match_bbox, match_giou: at least one must be > 0")


@dataclass
class GroundingLossOutput:
    """``loss`` (what ``train_epoch`` steps on) and its parts, detached, for logging."""

    loss: torch.Tensor
    loss_class: float
    loss_bbox: float
    loss_giou: float
    matched: int


def grounding_loss(logits: torch.Tensor, pred_boxes: torch.Tensor, query_mask: torch.Tensor,
                   targets: Sequence[dict], cfg: GroundingLossConfig, matcher: Any = None,
                   num_targets: float | None = None) -> GroundingLossOutput:
    """DETR's set loss with sigmoid classification over the phrase queries.

    Args:
        logits: ``(B, N, Q)`` per (predicted box, query) logits.
        pred_boxes: ``(B, N, 4)`` predicted ``(cx, cy, w, h)`` in [0, 1].
        query_mask: ``(B, Q)`` True for real queries (padded ones take no part).
        targets: per image ``{"class_labels": (n,) query indices, "boxes": (n, 4) cxcywh}``.
        cfg: loss and matching weights.
        matcher: a transformers Hungarian matcher; None builds one from ``cfg``.
        num_targets: what every term is divided by (at least 1); None: this batch's target boxes.
            Under DDP, the count per rank averaged over the ranks (:func:`mean_target_count`).

    Returns:
        :class:`GroundingLossOutput`.

    Raises:
        ValueError: shapes disagree, or a target names a padded or missing query.
    """
    from transformers.loss.loss_for_object_detection import (
        center_to_corners_format,
        generalized_box_iou,
        sigmoid_focal_loss,
    )

    batch, boxes, queries = logits.shape
    if pred_boxes.shape != (batch, boxes, 4) or query_mask.shape != (batch, queries) or len(targets) != batch:
        raise ValueError(f"logits {tuple(logits.shape)}, pred_boxes {tuple(pred_boxes.shape)}, query_mask "
                         f"{tuple(query_mask.shape)} and {len(targets)} targets do not describe one batch")
    for index, target in enumerate(targets):
        labels = target["class_labels"]
        if len(labels) and not bool(query_mask[index, labels].all()):
            raise ValueError(f"targets[{index}]: class_labels {labels.tolist()} name a padded or missing query")
    matcher = matcher or build_matcher(cfg)
    masked = logits.masked_fill(~query_mask[:, None, :], PAD_QUERY_LOGIT)  # (B, N, Q)
    indices = matcher({"logits": masked.detach(), "pred_boxes": pred_boxes.detach()}, list(targets))
    num_targets = max(1.0, float(sum(len(t["class_labels"]) for t in targets) if num_targets is None else num_targets))

    positives = torch.zeros_like(logits)
    for image, (box_index, target_index) in enumerate(indices):
        positives[image, box_index, targets[image]["class_labels"][target_index]] = 1.0
    real = query_mask[:, None, :].expand_as(logits)  # (B, N, Q)
    # sigmoid_focal_loss averages over dim 1: one column, so every real (box, query) pair counts once
    loss_class = sigmoid_focal_loss(logits[real].unsqueeze(1), positives[real].unsqueeze(1), num_targets,
                                    alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)

    matched_pred = torch.cat([pred_boxes[image, box_index] for image, (box_index, _) in enumerate(indices)])
    matched_gold = torch.cat([targets[image]["boxes"][target_index]
                              for image, (_, target_index) in enumerate(indices)]).to(pred_boxes)
    if len(matched_pred):
        loss_bbox = nn.functional.l1_loss(matched_pred, matched_gold, reduction="sum") / num_targets
        giou = generalized_box_iou(center_to_corners_format(matched_pred), center_to_corners_format(matched_gold))
        loss_giou = (1 - torch.diag(giou)).sum() / num_targets
    else:  # no target in the batch: only the classification term teaches (every box stays quiet)
        loss_bbox = loss_giou = pred_boxes.sum() * 0.0
    loss = cfg.class_weight * loss_class + cfg.bbox_weight * loss_bbox + cfg.giou_weight * loss_giou
    return GroundingLossOutput(loss, float(loss_class.detach()), float(loss_bbox.detach()),
                               float(loss_giou.detach()), len(matched_pred))


def build_matcher(cfg: GroundingLossConfig) -> Any:
    """transformers' Hungarian matcher with the focal classification cost (sigmoid scores, as the
    loss uses), L1 and GIoU box costs; scipy's ``linear_sum_assignment`` solves it."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    return DeformableDetrHungarianMatcher(class_cost=cfg.match_class, bbox_cost=cfg.match_bbox,
                                          giou_cost=cfg.match_giou)


def reset_detection_heads(detector: nn.Module, prior_prob: float = 0.01) -> None:
    """Start a randomly initialised OWL-ViT/OWLv2's box and class heads where training can move them.

    A detector built from a config (the tiny one) has heads drawn with unit-variance weights: its
    boxes saturate the sigmoid (97 % have no area) and its logits reach ±100, so neither learns.
    Here every head layer gets PyTorch's default init; the last box layer is zeroed, so each box
    starts as its patch's grid prior (OWL-ViT's ``box_bias``); the logit shift starts at the
    RetinaNet prior (every (box, phrase) pair at ``prior_prob``) and the logit scale at 1.
    Never for a pretrained detector: it would throw its heads away.

    Raises:
        ValueError: the detector has no OWL-ViT-style ``box_head``/``class_head``.
    """
    import math

    box_head, class_head = getattr(detector, "box_head", None), getattr(detector, "class_head", None)
    if box_head is None or class_head is None:
        raise ValueError(f"{type(detector).__name__}: no box_head/class_head to reset (OWL-ViT or OWLv2 only)")
    with torch.no_grad():
        for head in (box_head, class_head, getattr(detector, "objectness_head", None)):
            for layer in (head.modules() if head is not None else ()):
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        box_head.dense2.weight.zero_()
        box_head.dense2.bias.zero_()
        class_head.logit_shift.weight.zero_()
        class_head.logit_shift.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
        class_head.logit_scale.weight.zero_()
        class_head.logit_scale.bias.zero_()  # elu(0) + 1 = 1


def mean_target_count(targets: Sequence[dict], device: torch.device | str) -> float:
    """The batch's target boxes, averaged over the DDP ranks when a process group runs (DETR's
    ``num_boxes``; transformers' own detection losses reduce it the same way).

    DDP averages the ranks' gradients. Divided by its own count, a rank with few boxes (or only
    target-less images, count 1) would weigh each of its terms several times more than a rank with
    many; divided by the mean count, the averaged gradient is the one-process gradient of a batch
    holding every rank's images. A collective: every rank must call it for every batch.
    """
    import torch.distributed as dist

    count = float(sum(len(t["class_labels"]) for t in targets))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.float32, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


class GrounderWithLoss(nn.Module):
    """A detector plus the set loss, so ``tmr_core.training.train_epoch`` can step on it.

    The detector stays a plain transformers model (possibly DDP-wrapped), so its checkpoints are
    its own ``save_pretrained`` folders and ``PhraseGrounder`` loads them as any hub detector.
    """

    def __init__(self, detector: nn.Module, cfg: GroundingLossConfig):
        super().__init__()
        self.detector, self.cfg = detector, cfg
        self.matcher = build_matcher(cfg)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                query_mask: torch.Tensor, targets: Sequence[dict]) -> GroundingLossOutput:
        outputs = self.detector(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        # the ranks' mean count is a collective, so only in training, where every rank steps: a
        # rank-0-only evaluation through this module divides by its own batch's count
        count = mean_target_count(targets, outputs.logits.device) if self.training else None
        return grounding_loss(outputs.logits, outputs.pred_boxes, query_mask, targets, self.cfg, self.matcher,
                              num_targets=count)
