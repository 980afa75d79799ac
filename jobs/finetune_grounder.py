"""Fine-tune the phrase grounder (paper §3.2, V^r) on known boxes with Ray Train, tracked in MLflow.

    python -m jobs.finetune_grounder --config configs/finetune_grounder.yaml
    python -m jobs.finetune_grounder --config configs/finetune_grounder.tiny.yaml --optim.epochs 20

Reads one or more phrase tables (``extract_phrases`` outputs: ``<dataset>/{train,valid,test}`` with
``id``, ``phrases``, ``image_uri``) and the benchmark's ``ground_truth.jsonl`` (version 2: object
boxes), and fine-tunes the zero-shot detector (OWL-ViT / OWLv2) that ``ground_phrases`` queries,
queried exactly as there: each image with its sample's phrases; a phrase equal to a mention's text
has that mention's box as its target, other phrases none (:mod:`tmr_core.grounder_training`:
Hungarian matching, L1 + GIoU box losses, sigmoid focal loss per (box, phrase)). Training runs
under a ``TorchTrainer`` (DDP, one checkpoint per epoch, resumable; ``ray.num_workers: 0`` runs
locally); rank 0 scores valid each epoch with the grounding probe (recall of the mentions' objects
at IoU ≥ 0.5 within the top-3 boxes, :func:`tmr_core.grounding.grounding_recall`). The best epoch
on valid is scored on test, beside the detector as it was before training, and saved to
``<output>/model`` (the detector and its processor: ``ground_phrases --detector.model`` and Serve
load it as any hub detector) and, with ``--tracking.register_as tmr-grounder``, to the MLflow Model
Registry (``models:/tmr-grounder@champion``). The ground truth is labels only: never a model input.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

from jobs._common import StorageConfig
from jobs._config import ConfigError, config_to_dict, opt, parse_config, print_config, run_main
from jobs._tracking import TrackingConfig
from jobs._train import DebugConfig, RayTrainConfig

JOB = "finetune_grounder"
MONITOR = "valid_recall"
REGISTRY_NAME = "tmr-grounder"


@dataclass
class DataConfig:
    """The phrase tables, their ground truth and the split roles."""

    datasets: list[str] = opt(
        ["outputs/phrases/ner", "outputs/phrases/re"],
        "Phrase tables (extract_phrases outputs, local or s3://) with <split>.parquet or <split>/: id, phrases, image_uri.",
    )
    ground_truth: str = opt(
        "outputs/benchmark/ground_truth.jsonl", "ground_truth.jsonl with object boxes (synthetic benchmark version 2)."
    )
    dataset_name: str = opt("synthetic", "Name of the data in run names and tags.")
    train_split: str = opt("train", "Split trained on.")
    valid_split: str = opt("valid", "Split that selects the best epoch.")
    test_split: str = opt("test", "Split scored once at the end.")
    max_train_rows: int | None = opt(None, "Use only the first N training examples (image + phrase list); null: all.")
    cache_images: bool = opt(False, "Keep decoded images in each worker's memory across epochs (small images only).")


@dataclass
class ModelConfig:
    """The detector and how the probe reads its boxes."""

    detector: str = opt("google/owlv2-base-patch16-ensemble", "Detector to fine-tune: hub name or folder (model + processor).")
    reset_heads: bool = opt(
        False, "Re-initialise the box and class heads first: for a randomly initialised detector (the tiny one), "
        "never for a pretrained one."
    )
    top_k: int = opt(3, "Boxes per image the probe looks at (ground_phrases keeps 3, as the paper).")
    iou_threshold: float = opt(0.5, "IoU at which a box finds a mention's object.")


@dataclass
class LossConfig:
    """DETR's set loss (tmr_core.grounder_training.GroundingLossConfig); Deformable DETR's weights."""

    class_weight: float = opt(2.0, "Weight of the sigmoid focal loss over (box, phrase) logits.")
    bbox_weight: float = opt(5.0, "Weight of the L1 loss on matched boxes (cx, cy, w, h in [0, 1]).")
    giou_weight: float = opt(2.0, "Weight of the generalized-IoU loss on matched boxes.")
    match_class: float = opt(2.0, "Classification weight in the Hungarian matching cost.")
    match_bbox: float = opt(5.0, "L1 weight in the matching cost.")
    match_giou: float = opt(2.0, "GIoU weight in the matching cost.")
    focal_alpha: float = opt(0.25, "Focal loss α (weight of positives).")
    focal_gamma: float = opt(2.0, "Focal loss γ.")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and linear decay."""

    lr: float = opt(2e-5, "Peak learning rate.")
    weight_decay: float = opt(1e-2, "AdamW weight decay on non-bias, non-norm weights.")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up.")
    batch_size: int = opt(8, "Images per step per worker.")
    epochs: int = opt(10, "Passes over the training examples.")
    grad_clip: float = opt(0.1, "Max global gradient norm (DETR: 0.1); 0 disables clipping.")


@dataclass
class Config:
    """Fine-tune the zero-shot detector that grounds the phrases, on known boxes, with Ray Train."""

    seed: int = opt(0, "Seed for head init and data order.")
    force: bool = opt(False, "Train from scratch as a new run, discarding this config's checkpoints (default: resume).")
    output: str = opt("outputs/grounder", "Folder (or s3://) for model/ (detector + processor), metrics.json, config.yaml.")
    device: str = opt("cpu", "Device of the driver's final evaluation (workers use Ray's device).")
    eval_untrained: bool = opt(True, "Also score the detector as loaded (before training) on valid and test.")
    data: DataConfig = opt(DataConfig, "The phrase tables and their ground truth.")
    model: ModelConfig = opt(ModelConfig, "The detector.")
    loss: LossConfig = opt(LossConfig, "Matching and loss weights.")
    optim: OptimConfig = opt(OptimConfig, "Optimisation.")
    ray: RayTrainConfig = opt(RayTrainConfig, "Ray Train workers, storage and retries.")
    tracking: TrackingConfig = opt(TrackingConfig, "MLflow.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")
    debug: DebugConfig = opt(DebugConfig, "Test knobs.")


def check_config(cfg: Config) -> None:
    problems = []
    if not cfg.data.datasets:
        problems.append("--data.datasets: name at least one phrase table")
    if cfg.optim.batch_size < 1:
        problems.append(f"--optim.batch_size: expected >= 1, got {cfg.optim.batch_size}")
    if cfg.optim.epochs < 1:
        problems.append(f"--optim.epochs: expected >= 1, got {cfg.optim.epochs}")
    if cfg.model.top_k < 1:
        problems.append(f"--model.top_k: expected >= 1, got {cfg.model.top_k}")
    if not 0 < cfg.model.iou_threshold <= 1:
        problems.append(f"--model.iou_threshold: expected in (0, 1], got {cfg.model.iou_threshold}")
    if not cfg.data.ground_truth.startswith("s3://") and not os.path.isfile(cfg.data.ground_truth):
        problems.append(f"--data.ground_truth {cfg.data.ground_truth}: no such file")
    if cfg.tracking.register_as and cfg.tracking.register_as != REGISTRY_NAME:
        problems.append(f"--tracking.register_as {cfg.tracking.register_as}: a grounder registers as {REGISTRY_NAME}")
    try:
        loss_config(cfg)
    except ValueError as error:
        problems.append(f"--loss: {error}")
    if problems:
        raise ConfigError(problems)


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"grounder/{cfg.data.dataset_name}/seed{cfg.seed}"


def loss_config(cfg: Config):
    from tmr_core.grounder_training import GroundingLossConfig

    return GroundingLossConfig(**config_to_dict(cfg.loss))


# --------------------------------------------------------------------------- setup (worker and driver)


def load_detector(name: str, device: str = "cpu"):
    """The detector from a hub name or a folder (a checkpoint's ``model/`` holds no processor)."""
    from transformers import AutoModelForZeroShotObjectDetection

    return AutoModelForZeroShotObjectDetection.from_pretrained(name).to(device)


def load_processor(name: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name)


def image_opener(cfg: Config):
    from tmr_core.images import load_image

    options = cfg.storage.options()
    return lambda uri: load_image(uri, options)


def score_examples(detector, processor, examples: list[dict], open_image, cfg: Config, prefix: str) -> dict:
    """The grounding probe on ``examples``: ``<prefix>_recall``, ``_zero_area_share``, ``_support``,
    and the recall per task (``<prefix>_ner_recall``, ``<prefix>_re_recall``)."""
    from tmr_core.grounding import PhraseGrounder, ground_samples, grounding_recall

    grounder = PhraseGrounder.from_model(detector, processor, top_k=cfg.model.top_k)
    predicted = ground_samples(grounder, examples, open_image)
    scores = grounding_recall(predicted, [e["gold_boxes"] for e in examples], cfg.model.iou_threshold, cfg.model.top_k)
    metrics = {f"{prefix}_{k}": scores[k] for k in ("recall", "zero_area_share", "support")}
    for task in sorted({e["task"] for e in examples if e["task"]}):
        keep = [i for i, e in enumerate(examples) if e["task"] == task]
        part = grounding_recall([predicted[i] for i in keep], [examples[i]["gold_boxes"] for i in keep],
                                cfg.model.iou_threshold, cfg.model.top_k)
        metrics[f"{prefix}_{task}_recall"] = part["recall"]
    return metrics


# --------------------------------------------------------------------------- train loop (every worker)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: DDP on its shard, rank 0 scores valid, logs and checkpoints each epoch."""
    import ray.train
    import ray.train.torch

    from jobs import _tracking, _train
    from tmr_core.grounder_training import GrounderCollator, GrounderWithLoss, reset_detection_heads
    from tmr_core.training import build_optimizer, build_scheduler, set_seed, train_epoch

    cfg: Config = loop["cfg"]
    rank0 = _train.is_rank_zero()
    set_seed(cfg.seed)
    detector, processor = load_detector(cfg.model.detector), load_processor(cfg.model.detector)
    if cfg.model.reset_heads:
        reset_detection_heads(detector)
    collate = GrounderCollator(processor, image_opener(cfg), cfg.data.cache_images)
    # the CLIP towers' own projection and logit scale take no part in detection
    detector = ray.train.torch.prepare_model(detector, parallel_strategy_kwargs={"find_unused_parameters": True})
    model = GrounderWithLoss(detector, loss_config(cfg))
    device = _train.device()
    optimizer = build_optimizer(_train.unwrap(detector), cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, loop["total_steps"], cfg.optim.warmup_ratio)
    state = _train.restore_or_start(detector, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                                    loop["mlflow_run_id"])
    if rank0 and state.attempts > 1:
        print(f"[{JOB}] resumed at epoch {state.epoch}, step {state.global_step} (attempt {state.attempts})", flush=True)
    _train.announce_pid(cfg.debug)
    train_shard = _train.ShardRows(ray.train.get_dataset_shard("train"), cfg.ray.cache_shard_rows)
    valid_examples = loop["valid_examples"] if rank0 else []
    progress = _train.Progress(JOB, cfg.optim.epochs)
    for epoch in range(state.epoch, cfg.optim.epochs):
        progress.epoch_start()
        batches = _train.shard_batches(train_shard, cfg.optim.batch_size, collate, cfg.debug.max_steps_per_epoch,
                                       cfg.debug.step_delay_s, shuffle_seed=cfg.seed + epoch)
        stats = train_epoch(model, batches, optimizer, scheduler, device, cfg.optim.grad_clip,
                            on_step=lambda step, loss, e=epoch: rank0 and progress.step(e, step, state.global_step, loss))
        metrics = {"epoch": epoch + 1, "train_loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
                   **_train.rank_agreement(detector, stats["steps"])}
        if rank0 and not metrics["ranks_agree"]:
            print(f"[{JOB}] warning: the ranks' weights differ after epoch {epoch + 1}; rank 0's are saved", flush=True)
        if rank0:
            metrics |= score_examples(_train.unwrap(detector), processor, valid_examples, collate.image, cfg, "valid")
        state.finish_epoch(metrics.get(MONITOR, 0.0), stats["steps"], metrics)
        metrics["global_step"] = state.global_step
        if rank0:
            progress.epoch_end(epoch + 1, metrics)
            if loop["tracking_uri"] and state.mlflow_run_id:
                _tracking.log_metrics(loop["tracking_uri"], state.mlflow_run_id, metrics, step=epoch + 1)
        _train.report_epoch(metrics, state, detector, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                            cfg.storage.options(), keep=loop["checkpoints_to_keep"])


# --------------------------------------------------------------------------- driver


def load_ground_truth(path: str, options) -> dict[str, dict]:
    from tmr_core import storage

    text = storage.read_bytes(path, options).decode("utf-8")
    return {row["id"]: row for row in (json.loads(line) for line in text.splitlines() if line.strip())}


def split_examples(cfg: Config, split: str, truth: dict[str, dict], limit: int | None = None) -> list[dict]:
    """Every dataset's rows of ``split`` as grounding examples (tmr_core.grounder_training)."""
    from jobs import _train
    from tmr_core.grounder_training import grounding_examples

    options = cfg.storage.options()
    rows = [row for uri in cfg.data.datasets for row in _train.read_rows(uri, split, options)]
    examples = grounding_examples(rows, truth)
    return examples[:limit] if limit else examples


def examples_dataset(examples: list[dict]):
    """Training examples as a Ray Dataset with a fixed schema (an image without targets has empty lists)."""
    import pyarrow as pa
    import ray

    schema = pa.schema([
        ("id", pa.string()), ("task", pa.string()), ("image_uri", pa.string()), ("queries", pa.list_(pa.string())),
        ("gold_boxes", pa.list_(pa.list_(pa.float64()))), ("target_boxes", pa.list_(pa.list_(pa.float64()))),
        ("target_queries", pa.list_(pa.int64())),
    ])
    return ray.data.from_arrow(pa.Table.from_pylist(examples, schema=schema))


def check_targets(cfg: Config, examples: list[dict]) -> None:
    """Refuse ground truth without boxes (a version-1 benchmark): there would be nothing to learn."""
    if not any(e["target_boxes"] for e in examples):
        raise ConfigError([
            f"--data.ground_truth {cfg.data.ground_truth}: no {cfg.data.train_split} phrase equals a mention whose "
            "box is known; boxes come with the synthetic benchmark's version 2 (make_synthetic_benchmark --version 2)"
        ])


def run_identity(cfg: Config, options) -> dict:
    """What this run trains (jobs._train.run_identity) with every phrase table as an input."""
    from jobs import _data, _train

    splits = (cfg.data.train_split, cfg.data.valid_split, cfg.data.test_split)
    identity = _train.run_identity(cfg, cfg.data.datasets[0], options, splits)
    for uri in cfg.data.datasets:
        identity["local_files"].pop(uri, None)
    identity["inputs"] = {uri: _data.input_identity(uri, list(splits), options) for uri in cfg.data.datasets}
    return identity


class SavedDetector:
    """A detector and its processor saved as one folder: what ``<output>/model`` and the registry hold,
    so ``PhraseGrounder`` (``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``) loads it."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def save_pretrained(self, directory: str, options=None) -> None:
        from tmr_core import storage

        if not storage.is_remote(directory):
            self.model.save_pretrained(directory)
            self.processor.save_pretrained(directory)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as handle:
                    storage.write_bytes_atomic(storage.join(directory, name), handle.read(), options)


def finalize(cfg: Config, folder: str, tracking_uri: str | None, run_id: str | None, train_time_s: float,
             truth: dict[str, dict], valid_examples: list[dict], train_examples: int) -> dict:
    """Best epoch → valid and test probe (and the untrained detector's) → save, log, register."""
    from jobs import _tracking, _train
    from jobs._config import save_config
    from tmr_core import storage

    options = cfg.storage.options()
    open_image = image_opener(cfg)
    test_examples = split_examples(cfg, cfg.data.test_split, truth, cfg.debug.max_eval_rows)
    with tempfile.TemporaryDirectory() as tmp:
        best_dir, state = _train.best_model_dir(folder, tmp, options)
        detector = load_detector(best_dir, cfg.device)
    processor = load_processor(cfg.model.detector)
    metrics: dict = {"best_epoch": state.best_epoch, "best_" + MONITOR: state.best_metric,
                     "global_step": state.global_step, "train_time_s": train_time_s, "attempts": state.attempts,
                     "train_examples": train_examples}
    metrics |= score_examples(detector, processor, valid_examples, open_image, cfg, "valid")
    metrics |= score_examples(detector, processor, test_examples, open_image, cfg, "test")
    if cfg.eval_untrained:
        untrained = load_detector(cfg.model.detector, cfg.device)
        for split, examples in (("valid", valid_examples), ("test", test_examples)):
            scores = score_examples(untrained, processor, examples, open_image, cfg, split)
            metrics |= {f"untrained_{k}": v for k, v in scores.items()}
    saved = SavedDetector(detector, processor)
    model_dir = storage.join(cfg.output, "model")
    saved.save_pretrained(model_dir, options)
    storage.write_text_atomic(storage.join(cfg.output, "metrics.json"), json.dumps(metrics, indent=2), options)
    save_config(cfg, cfg.output, options=options)
    if cfg.tracking.enabled and run_id:
        _tracking.log_final_outputs(cfg, tracking_uri, run_id, saved, model_dir, metrics, state.epoch,
                                    tags={"detector": cfg.model.detector}, job=JOB)
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    check_config(cfg)
    print_config(cfg, JOB)
    from jobs import _tracking, _train

    options = cfg.storage.options()
    truth = load_ground_truth(cfg.data.ground_truth, options)
    train_examples = split_examples(cfg, cfg.data.train_split, truth, cfg.data.max_train_rows)
    check_targets(cfg, train_examples)
    # valid is small and scored by rank 0 only: shipped in the loop config, no Ray Data read on restarts
    valid_examples = split_examples(cfg, cfg.data.valid_split, truth, cfg.debug.max_eval_rows)
    _train.init_ray(cfg.ray)
    identity = run_identity(cfg, options)
    name = cfg.ray.name or _train.default_run_name(run_name(cfg), identity)
    folder = _train.run_folder(cfg.ray, name)
    if cfg.force:
        _train.discard_run(folder, options)
    _train.claim_run_folder(folder, identity, options)
    train_ds = examples_dataset(train_examples).materialize()
    tracking_uri = run_id = None
    if cfg.tracking.enabled:
        tracking_uri = _tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {"tmr.task": "grounder", "tmr.dataset": cfg.data.dataset_name, "tmr.seed": str(cfg.seed),
                "tmr.train_examples": str(len(train_examples)), "tmr.ray_run_name": name,
                "mlflow.source.git.commit": _tracking.git_commit() or "unknown"}
        run_id = _tracking.start_or_resume_run(tracking_uri, cfg.tracking.experiment or REGISTRY_NAME, run_name(cfg),
                                               config_to_dict(cfg), tags, folder, options)
        print(f"[{JOB}] MLflow run {run_id} at {tracking_uri}", flush=True)
    workers = max(1, cfg.ray.num_workers)
    per_epoch = -(-len(train_examples) // (cfg.optim.batch_size * workers))
    if cfg.debug.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.debug.max_steps_per_epoch)
    loop = {"cfg": cfg, "total_steps": per_epoch * cfg.optim.epochs, "run_folder": folder,
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "valid_examples": valid_examples}
    print(f"[{JOB}] {len(train_examples)} training images ({sum(len(e['target_boxes']) for e in train_examples)} "
          f"target boxes), {len(valid_examples)} valid; {per_epoch} steps/epoch", flush=True)
    start = time.perf_counter()
    try:
        _train.fit(train_loop_per_worker, loop, cfg.ray, name, {"train": train_ds}, options, MONITOR)
    except Exception:
        if run_id:
            _tracking.finish_run(tracking_uri, run_id, status="FAILED")
        raise
    metrics = finalize(cfg, folder, tracking_uri, run_id, time.perf_counter() - start, truth, valid_examples,
                       len(train_examples))
    shown = {k: round(v, 4) for k, v in metrics.items()
             if k.endswith(("recall", "zero_area_share")) and not k.startswith("best_")}
    print(f"[{JOB}] {shown}; model in {cfg.output}/model", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
