"""Ground each sample's noun phrases in its image and in its back-translation (TMR §3.2, V^r).

    python -m jobs.ground_phrases --config configs/ground_phrases.yaml \\
        --input outputs/back_translations --output outputs/regions --top_k 3

A zero-shot detector from transformers (``AutoModelForZeroShotObjectDetection`` + its processor:
OWL-ViT, OWLv2 or Grounding DINO) is queried with the ``phrases`` column; the top ``top_k`` regions
(3 in the paper) of the real image go to ``regions`` and those of the back-translation to
``back_translation_regions``. ``--detector.model`` is a hub name, a folder (e.g. ``finetune_grounder``'s
``<output>/model``) or an MLflow URI (``models:/tmr-grounder@champion``, ``runs:/…``), which each
actor downloads; the fingerprint covers the folder's files or the registry version, so a retrained
detector reruns the stage. A missing or unreadable image follows ``on_missing_image``: every
valid and test row is kept whatever the policy (empty regions, the reason in ``image_error``;
the extractor reads it as a zero image), so a test set never shrinks; ``skip`` drops training
rows only and says how many.
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

JOB = "ground_phrases"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class DetectorConfig:
    """The zero-shot detector."""

    model: str = opt(
        "google/owlv2-base-patch16-ensemble",
        "Detector: hub name, folder (model + processor) or MLflow URI (models:/tmr-grounder@champion, runs:/…).",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    tracking_uri: str | None = opt(
        None, "MLflow tracking URI for a models:/ or runs:/ detector; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    threshold: float = opt(0.0, "Minimum detection score kept before taking the top_k.")
    text_threshold: float = opt(0.25, "Grounding DINO only: token score threshold.")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "Detector dtype.")
    device: str = opt("cpu", "torch device of each actor: cpu or cuda.")


@dataclass
class Config:
    """Top-k grounded regions for the real image and the back-translation of each sample."""

    input: str = opt("outputs/back_translations", "Dataset folder (local or s3://) with <split>.parquet or <split>/.")
    output: str = opt("outputs/regions", "Dataset folder to write <split>/, config.yaml, _SUCCESS.json.")
    splits: list[str] = opt(["train", "valid", "test"], "Splits to process (those present are read).")
    force: bool = opt(False, "Run even when the output's _SUCCESS.json matches this config and input.")
    top_k: int = opt(3, "Regions kept per image (paper: 3).")
    on_missing_image: Literal["error", "skip", "keep"] = opt(
        "error",
        "A missing or unreadable image: error; keep the row (empty regions, reason in image_error); "
        "or skip it if it is a training row (valid/test rows are always kept).",
    )
    detector: DetectorConfig = opt(DetectorConfig, "The zero-shot detector.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool, batch size and accelerators.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k: must be ≥ 1, got {self.top_k}")


class GroundPhrases:
    """Ray Data callable around :class:`tmr_core.inference.GroundingStep` (one detector per actor):
    rows in, rows plus both region columns out, with the stage's missing-image policy."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.step = build_step(cfg.detector, cfg.top_k, cfg.storage.options())

    def __call__(self, batch: Any) -> Any:
        n = batch.num_rows
        columns = ["id", "image_uri", "back_translation_uri", "phrases"]
        values = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * n for c in columns}
        splits = batch.column("split").to_pylist()
        regions, bt_regions, errors, bt_missing = [], [], [], []
        for i in range(n):
            row = {c: values[c][i] for c in columns}
            real, error, back, back_error = self.step.ground(row)
            if error and row["image_uri"] is not None and self.cfg.on_missing_image == "error":
                raise FileNotFoundError(
                    f"sample {row['id']!r}: image_uri {row['image_uri']!r} is missing or unreadable ({error}); "
                    "set --on_missing_image keep|skip to go on without it"
                )
            regions.append(real)
            bt_regions.append(back)
            errors.append(error)
            bt_missing.append(int(back_error is not None))
        unusable = [error is not None for error in errors]
        return add_columns(batch, JOB, {
            "regions": regions,
            "back_translation_regions": bt_regions,
            "image_error": errors,
            "_stat_missing_images": [int(u) for u in unusable],
            "_stat_missing_back_translations": bt_missing,
            "_stat_regions": [len(r) for r in regions],
            DROP_COLUMN: [u and split == "train" and self.cfg.on_missing_image == "skip"
                          for u, split in zip(unusable, splits, strict=True)],
        })


def build_step(detector: DetectorConfig, top_k: int, options: Any = None) -> Any:
    """The detector (hub name, folder or MLflow URI) as a :class:`tmr_core.inference.GroundingStep`:
    this job's and ``jobs.predict``'s."""
    from tmr_core.grounding import PhraseGrounder
    from tmr_core.inference import GroundingStep

    d = detector
    grounder = PhraseGrounder(
        local_detector(d.model, d.tracking_uri), revision=d.revision, top_k=top_k, threshold=d.threshold,
        text_threshold=d.text_threshold, device=d.device, dtype=d.dtype,
    )
    return GroundingStep(grounder, options)


def local_detector(model: str, tracking_uri: str | None) -> str:
    """A folder for an MLflow URI (downloaded, as jobs._tracking resolves models:/ for every job);
    a hub name or a folder is returned as it is."""
    if not model.startswith(MLFLOW_SCHEMES):
        return model
    import mlflow

    from jobs._tracking import resolve_model_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # download_artifacts looks models:/ up with the global registry URI, not its argument; an actor owns its process
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return resolve_model_uri(model, tracking_uri=uri)


def detector_identity(cfg: Config, options: Any) -> Any:
    """What identifies the detector's weights in the stage fingerprint: a folder's files, or the
    version a registry alias points at now (a hub name and its revision are in the config already)."""
    model = cfg.detector.model
    if model.startswith("models:/") and "@" in model:
        from mlflow import MlflowClient

        from jobs._tracking import resolve_tracking_uri

        name, alias = model[len("models:/"):].split("@", 1)
        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.detector.tracking_uri))
        return {"registered": model, "version": str(client.get_model_version_by_alias(name, alias).version)}
    if model.startswith(MLFLOW_SCHEMES):
        return {"uri": model}  # a run's artifacts and a numbered version do not change
    return file_infos(model, options)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    options = cfg.storage.options()
    if cfg.detector.model.startswith(MLFLOW_SCHEMES):
        from jobs._tracking import resolve_tracking_uri

        # actors run in another working directory: a relative sqlite path must reach them absolute
        cfg.detector.tracking_uri = resolve_tracking_uri(cfg.detector.tracking_uri)
    splits = present_splits(cfg.input, cfg.splits, options, output=cfg.output)
    # a retrained detector at the same folder, or a newly registered champion, must not look up to date
    stage_fingerprint = fingerprint(JOB, cfg, cfg.input, splits, options,
                                    extra={"detector": detector_identity(cfg, options)})
    if not cfg.force and is_up_to_date(cfg.output, stage_fingerprint, options):
        print(f"[{JOB}] {cfg.output} is up to date (same config and input); nothing to do. --force true reruns it.")
        return 0

    init_ray()
    start = time.perf_counter()
    ds = read_splits(cfg.input, splits, options, rows_per_block=cfg.compute.batch_size).map_batches(
        GroundPhrases, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.compute, cfg.input, cfg.output)
    )
    rows, stats = write_splits(ds, cfg.output, splits, options)
    summary = {**stats, "seconds": round(time.perf_counter() - start, 3)}
    save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, rows, stage_fingerprint, summary, options)
    print(
        f"[{JOB}] rows {rows} | regions {stats.get('regions', 0)} | missing images "
        f"{stats.get('missing_images', 0)} ({cfg.on_missing_image}; training rows dropped {stats.get('dropped', 0)}) | "
        f"missing back-translations {stats.get('missing_back_translations', 0)} | {summary['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
