"""Score every (text, image) pair with the trained multimodal divergence estimator (TMR §3.4, Eq. 4).

    python -m jobs.score_divergence --config configs/score_divergence.yaml \\
        --input outputs/regions --output outputs/divergence --checkpoint outputs/mde/checkpoint

The MDE (a ViLT-style single-stream transformer, ``tmr_core.mde``) maps the sentence and its real
image to α = (α_s, α_c, α_w): strengthen / complement / weaken, summing to 1, which Eq. 4 uses to
weight the fine- and coarse-grained streams. ``--checkpoint`` is a folder (local or ``s3://``)
written by ``save_pretrained`` or an MLflow model/artifact URI (``runs:/…``, ``models:/…``).
Adds ``divergence`` and, with ``score_back_translations``, ``back_translation_divergence`` (the
MDE's score of (t, v'), which TMR's code uses for G'*; the extractor's ``back_translation_alpha``
picks it). A missing or unreadable image follows ``on_missing_image``; valid and test rows are kept
whatever the policy (a null score, which the extractor reads as α = (0, 0, 1)), and ``skip`` drops
training rows only.

Each row's scores do not depend on which rows Ray Data batched with it: ViLT's random patch order
is seeded per call (``MultimodalDivergenceEstimator.score``) and rows go through the model
``micro_batch_size`` at a time (1 by default: a row alone, so neither its place in the patch draw
nor padding depends on its batch mates; a larger value is faster on a GPU at the cost of
differences around 1e-7 between runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from jobs._common import StorageConfig
from jobs._config import opt, parse_config, print_config, run_main, save_config
from jobs._data import (
    DROP_COLUMN,
    ComputeConfig,
    actor_pool_args,
    add_columns,
    file_infos,
    fingerprint,
    init_ray,
    is_up_to_date,
    present_splits,
    read_splits,
    write_splits,
    write_success_marker,
)

JOB = "score_divergence"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclass
class Config:
    """Divergence scores (strengthen, complement, weaken) for every sample."""

    input: str = opt("outputs/regions", "Dataset folder (local or s3://) with <split>.parquet or <split>/.")
    output: str = opt("outputs/divergence", "Dataset folder to write <split>/, config.yaml, _SUCCESS.json.")
    splits: list[str] = opt(["train", "valid", "test"], "Splits to process (those present are read).")
    force: bool = opt(False, "Run even when the output's _SUCCESS.json matches this config and input.")
    checkpoint: str = opt("outputs/mde/checkpoint", "MDE folder (save_pretrained) or MLflow URI (runs:/…, models:/…).")
    processor: str | None = opt(None, "ViLT processor folder or hub name; null: the checkpoint's, else its backbone's.")
    max_length: int = opt(40, "Word pieces per sentence after truncation (ViLT: 40 text positions).")
    on_missing_image: Literal["error", "skip", "keep"] = opt(
        "error",
        "A missing or unreadable image: error; keep the row with a null divergence; or skip it if it "
        "is a training row (valid/test rows are always kept).",
    )
    score_back_translations: bool = opt(
        False, "Also score (text, back-translation) into back_translation_divergence (TMR's code does)."
    )
    micro_batch_size: int = opt(
        1, "Rows per MDE forward pass; 1 keeps each row's scores independent of batch composition."
    )
    device: str = opt("cpu", "torch device of each actor: cpu or cuda.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool, batch size and accelerators.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be ≥ 1, got {self.micro_batch_size}")


def local_checkpoint(uri: str) -> str:
    """A local folder for an MLflow model/artifact URI; other URIs are returned as they are."""
    if uri.startswith(_MLFLOW_SCHEMES):
        import mlflow

        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    return uri


class ScoreDivergence:
    """Ray Data callable: one MDE per actor; rows in, rows plus ``divergence`` out."""

    def __init__(self, cfg: Config):
        from transformers import AutoProcessor

        from tmr_core.mde import MDECollator, MultimodalDivergenceEstimator

        self.cfg = cfg
        self.options = cfg.storage.options()
        checkpoint = local_checkpoint(cfg.checkpoint)
        self.model = MultimodalDivergenceEstimator.from_pretrained(checkpoint, device=cfg.device, options=self.options)
        self.model.eval()
        self.collator = MDECollator(AutoProcessor.from_pretrained(self._processor_source(checkpoint)),
                                    cfg.max_length, self.options)

    def _processor_source(self, checkpoint: str) -> str:
        """``processor`` if set; else the checkpoint folder when it holds processor files; else
        the ViLT backbone the MDE was built from (``pretrain_mde`` saves only config + weights)."""
        import os

        if self.cfg.processor:
            return local_checkpoint(self.cfg.processor)
        if os.path.isfile(os.path.join(checkpoint, "processor_config.json")) or os.path.isfile(
            os.path.join(checkpoint, "preprocessor_config.json")
        ):
            return checkpoint
        return self.model.config.backbone

    def _image_or_none(self, sample_id: str, uri: str | None, column: str = "image_uri") -> Any:
        """The image at ``uri``; None when there is none or it is unreadable and the policy allows
        it. A back-translation that cannot be read is never an error: its row simply has no α'."""
        from tmr_core.images import load_image

        if uri is None:
            return None
        try:
            return load_image(uri, self.options)
        except (FileNotFoundError, ValueError, OSError) as exc:
            if self.cfg.on_missing_image == "error" and column == "image_uri":
                raise FileNotFoundError(
                    f"sample {sample_id!r}: {column} {uri!r} is missing or unreadable ({exc}); "
                    "set --on_missing_image skip|keep to go on without it"
                ) from exc
            return None

    def _scores(self, ids: list[str], tokens: list, images: list, strict: bool = True) -> list[list[float] | None]:
        """(s, c, w) per row with an image, None without; ``micro_batch_size`` rows per forward.

        A chunk that fails is scored row by row; a row the MDE cannot read (e.g. an image too
        thin for ViLT's resize) follows ``on_missing_image`` like an unreadable file (``strict``;
        back-translations are scored with ``strict=False``: no α' for such a row, never an error).
        """
        scored = [i for i, image in enumerate(images) if image is not None]
        divergence: list[list[float] | None] = [None] * len(ids)
        step = self.cfg.micro_batch_size
        for start in range(0, len(scored), step):
            chunk = scored[start:start + step]
            try:
                values = self._forward(ids, tokens, images, chunk)
            except Exception:  # noqa: BLE001 - retried row by row to find the bad one
                values = [self._score_alone(ids, tokens, images, row, strict) for row in chunk]
            for row, value in zip(chunk, values, strict=True):
                divergence[row] = value
        return divergence

    def _forward(self, ids: list[str], tokens: list, images: list, rows: list[int]) -> list[list[float]]:
        inputs = self.collator([{"id": ids[i], "tokens": tokens[i], "image": images[i]} for i in rows])
        inputs = {k: v.to(self.cfg.device) for k, v in inputs.items()}
        return self.model.score(**inputs).float().cpu().tolist()  # (B, 3): strengthen, complement, weaken

    def _score_alone(self, ids: list[str], tokens: list, images: list, row: int, strict: bool) -> list[float] | None:
        try:
            return self._forward(ids, tokens, images, [row])[0]
        except Exception as exc:  # noqa: BLE001 - the policy decides, naming the sample
            if strict and self.cfg.on_missing_image == "error":
                raise ValueError(f"sample {ids[row]!r}: the MDE cannot score its image ({exc}); "
                                 "set --on_missing_image keep|skip to go on without it") from exc
            return None

    def __call__(self, batch: Any) -> Any:
        n = batch.num_rows
        ids = batch.column("id").to_pylist()
        tokens = batch.column("tokens").to_pylist()
        splits = batch.column("split").to_pylist()
        # ground_phrases already applied the image policy to a row it flagged in image_error
        flagged = batch.column("image_error").to_pylist() if "image_error" in batch.column_names else [None] * n
        images = [None if error else self._image_or_none(i, u)
                  for i, u, error in zip(ids, batch.column("image_uri").to_pylist(), flagged, strict=True)]
        back_divergence: list = [None] * n
        if self.cfg.score_back_translations and "back_translation_uri" in batch.column_names:
            back_uris = batch.column("back_translation_uri").to_pylist()
            back_images = [self._image_or_none(i, u, "back_translation_uri") for i, u in zip(ids, back_uris, strict=True)]
            back_divergence = self._scores(ids, tokens, back_images, strict=False)
        divergence = self._scores(ids, tokens, images)
        missing = [score is None for score in divergence]
        return add_columns(batch, JOB, {
            "divergence": divergence,
            "back_translation_divergence": back_divergence,
            "_stat_scored": [int(not m) for m in missing],
            "_stat_missing_images": [int(m) for m in missing],
            DROP_COLUMN: [m and split == "train" and self.cfg.on_missing_image == "skip"
                          for m, split in zip(missing, splits, strict=True)],
        })


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    options = cfg.storage.options()
    splits = present_splits(cfg.input, cfg.splits, options, output=cfg.output)
    # a retrained checkpoint at the same path must not look up to date
    model_files = [] if cfg.checkpoint.startswith(_MLFLOW_SCHEMES) else file_infos(cfg.checkpoint, options)
    stage_fingerprint = fingerprint(JOB, cfg, cfg.input, splits, options, extra={"checkpoint": model_files})
    if not cfg.force and is_up_to_date(cfg.output, stage_fingerprint, options):
        print(f"[{JOB}] {cfg.output} is up to date (same config and input); nothing to do. --force true reruns it.")
        return 0

    init_ray()
    start = time.perf_counter()
    ds = read_splits(cfg.input, splits, options, rows_per_block=cfg.compute.batch_size).map_batches(
        ScoreDivergence, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.compute, cfg.input, cfg.output, cfg.checkpoint)
    )
    rows, stats = write_splits(ds, cfg.output, splits, options)
    summary = {**stats, "seconds": round(time.perf_counter() - start, 3)}
    save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, rows, stage_fingerprint, summary, options)
    print(
        f"[{JOB}] rows {rows} | scored {stats.get('scored', 0)} | missing images "
        f"{stats.get('missing_images', 0)} ({cfg.on_missing_image}; training rows dropped {stats.get('dropped', 0)}) | "
        f"{summary['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
