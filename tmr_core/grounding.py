"""Phrase grounding: the image regions V^r that the coarse-grained stream pairs with phrases T^p.

TMR gets its 3 regions per image from a visual-grounding toolkit queried with the sentence's noun
phrases (Section 3.2, "regions are obtained using the visual grounding method", 3 regions). We use
a zero-shot detector from transformers (OWL-ViT / OWLv2 / Grounding DINO, loaded with
``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``) queried with the phrases, and keep the
top-k boxes by score. The same grounder runs on the real image v and on its back-translation v'.

The detector can be a trained one (``jobs.finetune_grounder``, :mod:`tmr_core.grounder_training`):
its ``save_pretrained`` folder holds the model and its processor, as a hub checkpoint does.
:func:`grounding_recall` is the probe that says whether the regions find the mentions' objects:
recall@IoU ≥ 0.5 within the top-k boxes, and the share of zero-area boxes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Region:
    """A grounded region: ``box`` = [x1, y1, x2, y2] in pixels of the queried image."""

    box: list[float]
    score: float
    phrase: str

    def to_dict(self) -> dict:
        return {"box": [float(v) for v in self.box], "score": float(self.score), "phrase": self.phrase}


class PhraseGrounder:
    """Grounds phrases in an image with a zero-shot object detector.

    Args:
        model: detector name on the hub or a folder (model + processor files).
        revision: hub revision.
        top_k: regions kept per image (3 in the paper).
        threshold: minimum detection score passed to the processor's post-processing.
        text_threshold: Grounding DINO's token threshold (ignored by OWL-ViT/OWLv2).
        device, dtype: where the detector runs.
    """

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        top_k: int = 3,
        threshold: float = 0.0,
        text_threshold: float = 0.25,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if top_k < 1:
            raise ValueError(f"top_k: must be ≥ 1, got {top_k}")
        self.top_k, self.threshold, self.text_threshold = top_k, threshold, text_threshold
        self.device, self.dtype = device, getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
            model, revision=revision, dtype=self.dtype
        ).to(device).eval()
        self._post_process = self._pick_post_process()

    @classmethod
    def from_model(cls, model: Any, processor: Any, top_k: int = 3, threshold: float = 0.0,
                   text_threshold: float = 0.25) -> PhraseGrounder:
        """A grounder around a detector already in memory (a model being trained), on its device
        and dtype; it is put in eval mode, and the caller switches it back to train mode."""
        if top_k < 1:
            raise ValueError(f"top_k: must be ≥ 1, got {top_k}")
        grounder = cls.__new__(cls)
        grounder.top_k, grounder.threshold, grounder.text_threshold = top_k, threshold, text_threshold
        parameter = next(model.parameters())
        grounder.device, grounder.dtype = parameter.device, parameter.dtype
        grounder.processor, grounder.model = processor, model.eval()
        grounder._post_process = grounder._pick_post_process()
        return grounder

    def _pick_post_process(self) -> Any:
        for name in ("post_process_grounded_object_detection", "post_process_object_detection"):
            method = getattr(self.processor, name, None)
            if method is not None:
                return method
        raise TypeError(f"{type(self.processor).__name__} offers no object-detection post-processing")

    def __call__(self, image: Any, phrases: Sequence[str]) -> list[Region]:
        """Top-k regions of one image for its phrases (empty phrases → no regions).

        Args:
            image: a PIL image (H, W).
            phrases: the query texts, e.g. the sample's noun phrases.

        Returns:
            up to ``top_k`` regions sorted by descending score.
        """
        import torch

        phrases = [p for p in phrases if p and p.strip()]
        if not phrases:
            return []
        inputs = self.processor(images=[image], text=[list(phrases)], truncation=True, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        kwargs: dict[str, Any] = {"threshold": self.threshold, "target_sizes": [(image.height, image.width)]}
        parameters = inspect.signature(self._post_process).parameters
        if "text_labels" in parameters:
            kwargs["text_labels"] = [list(phrases)]
        if "input_ids" in parameters:
            kwargs["input_ids"] = inputs["input_ids"]
        if "text_threshold" in parameters:
            kwargs["text_threshold"] = self.text_threshold
        (detections,) = self._post_process(outputs, **kwargs)
        return self._top_regions(detections, phrases, image.width, image.height)

    def _top_regions(self, detections: dict, phrases: Sequence[str], width: int, height: int) -> list[Region]:
        scores = detections["scores"].float().cpu()
        # clamp to the image: untrained or OWL-style heads can predict boxes past its border
        boxes = detections["boxes"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = detections.get("text_labels") or [None] * len(scores)
        indices = detections.get("labels")
        order = scores.argsort(descending=True)[: self.top_k]
        regions = []
        for i in order.tolist():
            phrase = labels[i]
            if not phrase and indices is not None and not isinstance(indices[i], str):
                phrase = phrases[int(indices[i])]
            regions.append(Region(box=boxes[i].tolist(), score=float(scores[i]), phrase=str(phrase or "")))
        return regions


# --------------------------------------------------------------------------- the grounding probe


def shown_boxes(truth: dict) -> list[tuple[str, list[float]]]:
    """``(mention text, box)`` for each mention of a ground-truth row whose object its image shows.

    A synthetic benchmark row (``ground_truth.jsonl``, version 2) gives an NER mention's ``box`` and
    an RE row's ``head_box``/``tail_box``; null means the image does not show that object (a weaken
    item's donor image), and such a mention is left out. Rows without boxes (version 1) give [].
    """
    if truth.get("task") == "re":
        pairs = [(truth.get("head"), truth.get("head_box")), (truth.get("tail"), truth.get("tail_box"))]
    else:
        pairs = [(m.get("text"), m.get("box")) for m in truth.get("mentions") or []]
    return [(str(text), [float(v) for v in box]) for text, box in pairs if box is not None]


def is_zero_area(box: Sequence[float]) -> bool:
    """A box less than one pixel wide or high: the extractor gets no crop from it (images.clamp_box)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return x2 - x1 < 1.0 or y2 - y1 < 1.0


def grounding_recall(predicted: Sequence[Sequence[Sequence[float]]], gold: Sequence[Sequence[Sequence[float]]],
                     iou_threshold: float = 0.5, top_k: int = 3) -> dict[str, float]:
    """Recall of the mentions' objects within the top-k grounded boxes, and the zero-area share.

    A gold box is found when any of its sample's first ``top_k`` predicted boxes has IoU ≥
    ``iou_threshold`` with it (the regions TMR's coarse level pairs with phrases, §3.2).

    Args:
        predicted: per sample, its grounded boxes ``[x1, y1, x2, y2]`` (pixels), best first.
        gold: per sample, the boxes of the mentions its image shows (:func:`shown_boxes`).
        iou_threshold, top_k: what counts as found.

    Returns:
        ``recall`` (found / gold boxes; 0 without gold), ``found``, ``support`` (gold boxes),
        ``zero_area_share`` (zero-area boxes / returned boxes; 0 when none was returned),
        ``boxes`` (returned boxes, at most ``top_k`` per sample), ``samples``.

    Raises:
        ValueError: ``predicted`` and ``gold`` differ in length, or a box is not 4 numbers.
    """
    import torch
    from transformers.loss.loss_for_object_detection import box_iou

    if len(predicted) != len(gold):
        raise ValueError(f"predicted: {len(predicted)} samples, gold: {len(gold)}; pass one list per sample to both")
    if top_k < 1:
        raise ValueError(f"top_k: must be ≥ 1, got {top_k}")
    found = support = boxes = zero = 0
    for index, (sample_boxes, sample_gold) in enumerate(zip(predicted, gold, strict=True)):
        top = [list(box) for box in sample_boxes][:top_k]
        for box in (*top, *sample_gold):
            if len(box) != 4:
                raise ValueError(f"sample {index}: box {list(box)} is not [x1, y1, x2, y2]")
        boxes += len(top)
        zero += sum(is_zero_area(box) for box in top)
        support += len(sample_gold)
        if top and sample_gold:
            iou, _ = box_iou(torch.tensor(sample_gold, dtype=torch.float64), torch.tensor(top, dtype=torch.float64))
            found += int((iou.nan_to_num(0.0) >= iou_threshold).any(dim=1).sum())
    return {
        "recall": found / support if support else 0.0, "found": float(found), "support": float(support),
        "zero_area_share": zero / boxes if boxes else 0.0, "boxes": float(boxes), "samples": float(len(gold)),
    }


def ground_samples(grounder: PhraseGrounder, samples: Sequence[dict], open_image: Any) -> list[list[list[float]]]:
    """The grounder's boxes (best first) for each ``{"image_uri", "queries"}`` sample.

    ``open_image(uri)`` returns a PIL image (e.g. :func:`tmr_core.images.load_image` with storage
    options); images are opened as they are needed, one at a time.
    """
    return [[region.box for region in grounder(open_image(s["image_uri"]), s["queries"])] for s in samples]


def regions_recall(rows: Sequence[dict], truth: dict[str, dict], iou_threshold: float = 0.5,
                   top_k: int = 3) -> dict[str, float]:
    """:func:`grounding_recall` of a ``ground_phrases`` table: each row's ``regions`` against the
    boxes its ground-truth row shows. Rows with the same image and phrases (an MNRE sentence's two
    instances) count once, with the union of their boxes; rows without a ground-truth row are skipped.
    """
    samples: dict[tuple, tuple[list, list]] = {}
    for row in rows:
        if row.get("id") not in truth or not row.get("image_uri"):
            continue
        key = (row["image_uri"], tuple(p["text"] for p in row.get("phrases") or []))
        predicted, gold = samples.setdefault(key, ([r["box"] for r in row.get("regions") or []], []))
        gold.extend(box for _, box in shown_boxes(truth[row["id"]]) if box not in gold)
    predicted_boxes = [predicted for predicted, _ in samples.values()]
    return grounding_recall(predicted_boxes, [gold for _, gold in samples.values()], iou_threshold, top_k)
