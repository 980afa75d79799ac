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


def processor_source(checkpoint: str, processor: str | None, backbone: str) -> str:
    """``processor`` if set; else the checkpoint folder when it holds processor files; else the
    ViLT backbone the MDE was built from (``pretrain_mde`` saves only config + weights)."""
    import os

    if processor:
        return local_checkpoint(processor)
    if any(os.path.isfile(os.path.join(checkpoint, name)) for name in ("processor_config.json", "preprocessor_config.json")):
        return checkpoint
    return backbone


def build_step(checkpoint_uri: str, processor: str | None, max_length: int, device: str = "cpu",
               micro_batch_size: int = 1, score_back_translations: bool = False, options: Any = None) -> Any:
    """The MDE (folder or MLflow URI) as a :class:`tmr_core.inference.DivergenceStep`: this job's
    and ``jobs.predict``'s."""
    from transformers import AutoProcessor

    from tmr_core.inference import DivergenceStep
    from tmr_core.mde import MDECollator, MultimodalDivergenceEstimator

    checkpoint = local_checkpoint(checkpoint_uri)
    model = MultimodalDivergenceEstimator.from_pretrained(checkpoint, device=device, options=options).eval()
    source = processor_source(checkpoint, processor, model.config.backbone)
    collator = MDECollator(AutoProcessor.from_pretrained(source), max_length, options)
    return DivergenceStep(model, collator, device=device, micro_batch_size=micro_batch_size,
                          score_back_translations=score_back_translations, options=options)


class ScoreDivergence:
    """Ray Data callable around :class:`tmr_core.inference.DivergenceStep` (one MDE per actor):
    rows in, rows plus ``divergence`` out, with the stage's missing-image policy."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.step = build_step(cfg.checkpoint, cfg.processor, cfg.max_length, cfg.device, cfg.micro_batch_size,
                               cfg.score_back_translations, cfg.storage.options())
        self.model = self.step.model

    def _check_policy(self, row: dict, scored: dict) -> None:
        """``on_missing_image: error``: an image that could not be read or scored stops the job,
        naming the sample (ground_phrases already applied the policy to rows it flagged)."""
        if self.cfg.on_missing_image != "error" or row["image_error"] or row["image_uri"] is None:
            return
        error = scored["image_error"]
        from tmr_core.inference import UnscorableImage

        if isinstance(error, UnscorableImage):
            raise ValueError(f"sample {row['id']!r}: {error}; set --on_missing_image keep|skip to go on without it")
        if error:
            raise FileNotFoundError(f"sample {row['id']!r}: image_uri {row['image_uri']!r} is missing or unreadable "
                                    f"({error}); set --on_missing_image skip|keep to go on without it")

    def __call__(self, batch: Any) -> Any:
        n = batch.num_rows
        columns = ["id", "tokens", "image_uri", "back_translation_uri", "image_error"]
        values = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * n for c in columns}
        rows = [{c: values[c][i] for c in columns} for i in range(n)]
        scored = self.step(rows)
        for row, result in zip(rows, scored, strict=True):
            self._check_policy(row, result)
        splits = batch.column("split").to_pylist()
        missing = [result["divergence"] is None for result in scored]
        return add_columns(batch, JOB, {
            "divergence": [result["divergence"] for result in scored],
            "back_translation_divergence": [result["back_translation_divergence"] for result in scored],
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
