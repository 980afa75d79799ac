"""Phrase grounding: the image regions V^r that the coarse-grained stream pairs with phrases T^p.

TMR gets its 3 regions per image from a visual-grounding toolkit queried with the sentence's noun
phrases (Section 3.2, "regions are obtained using the visual grounding method", 3 regions). We use
a zero-shot detector from transformers (OWL-ViT / OWLv2 / Grounding DINO, loaded with
``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``) queried with the phrases, and keep the
top-k boxes by score. The same grounder runs on the real image v and on its back-translation v'.
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
