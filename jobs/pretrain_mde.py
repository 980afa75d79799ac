"""Pretrain the multimodal divergence estimator (MDE, paper §3.4) with Ray Train, tracked in MLflow.

    python -m jobs.pretrain_mde --config configs/pretrain_mde.yaml
    python -m jobs.pretrain_mde --config configs/pretrain_mde.tiny.yaml --loss ce --ray.num_workers 2

Reads the caption corpus (``<data.corpus>/{train,valid,test_in_domain,test_out_of_domain}``
Parquet tables with ``caption``, ``image_uri``, ``label``, ``source``) with Ray Data, trains the
ViLT-style estimator with one of the Table 3 objectives (``--loss supcon|ce|ce_negative_sampling``)
under a ``TorchTrainer`` (DDP, one checkpoint per epoch, resumable), picks the best epoch on
valid macro F1, (for SupCon) refits the 3-way head on the frozen z, and reports accuracy and macro
F1 on the in-domain and the out-of-domain test sets (paper Table 3). The final estimator goes to
``<output>/model`` and, with ``--tracking.register_as tmr-mde``, to the MLflow Model Registry.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from jobs._common import StorageConfig
from jobs._config import ConfigError, config_to_dict, opt, parse_config, print_config, run_main
from jobs._tracking import TrackingConfig
from jobs._train import DebugConfig, RayTrainConfig

MONITOR = "valid_macro_f1"


@dataclass
class DataConfig:
    """Where the MDE corpus lives and which splits play which role."""

    corpus: str = opt("outputs/benchmark/mde", "Folder (or s3://) with <split>.parquet or <split>/ tables.")
    dataset_name: str = opt("synthetic", "Name of the corpus in run names and tags.")
    train_split: str = opt("train", "Split trained on.")
    valid_split: str = opt("valid", "Split that selects the best epoch.")
    test_splits: list[str] = opt(
        ["test_in_domain", "test_out_of_domain"], "Splits scored at the end (Table 3: in domain, out of domain)."
    )
    max_train_rows: int | None = opt(None, "Use only the first N training rows; null: all.")
    pixel_cache_mb: int = opt(
        512, "Per worker: processed image pixels kept for the next epoch (LRU); 0: process every epoch."
    )


@dataclass
class ModelConfig:
    """The estimator's architecture (tmr_core.mde.MDEConfig) and its input encoding."""

    backbone: str = opt("dandelin/vilt-b32-mlm", "ViLT checkpoint name or local folder (with its processor).")
    projection_dim: int = opt(128, "Size of z, the space SupCon (Eq. 6) compares.")
    temperature: float = opt(0.07, "SupCon temperature τ (Eq. 6).")
    max_length: int = opt(40, "Word pieces per caption (ViLT has 40 text positions).")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and linear decay (paper App. B.3)."""

    lr: float = opt(1e-4, "Peak learning rate.")
    weight_decay: float = opt(1e-2, "AdamW weight decay on non-bias, non-norm weights.")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up.")
    batch_size: int = opt(32, "Rows per step per worker.")
    epochs: int = opt(10, "Passes over the training split (capped by max_steps).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (paper: 100000); null: epochs decide.")
    grad_clip: float = opt(1.0, "Max global gradient norm; 0 disables clipping.")
    head_fit_epochs: int = opt(20, "SupCon only: epochs refitting the 3-way head on frozen z after training.")
    head_fit_lr: float = opt(1e-2, "SupCon only: learning rate of the head refit.")
    head_fit_rows: int = opt(4096, "SupCon only: training rows whose z the head is refitted on.")
    eval_batch_size: int = opt(64, "Rows per evaluation batch.")


@dataclass
class Config:
    """Pretrain the multimodal divergence estimator (Table 3 objectives) with Ray Train."""

    loss: Literal["supcon", "ce", "ce_negative_sampling"] = opt("supcon", "Training objective (Table 3).")
    seed: int = opt(0, "Seed for model init and data order.")
    force: bool = opt(False, "Train from scratch as a new run, discarding this config's checkpoints (default: resume).")
    output: str = opt("outputs/mde", "Folder (or s3://) for the final model, metrics.json and config.yaml.")
    device: str = opt("cpu", "Device of the driver's final evaluation (workers use Ray's device).")
    data: DataConfig = opt(DataConfig, "The caption corpus.")
    model: ModelConfig = opt(ModelConfig, "The estimator.")
    optim: OptimConfig = opt(OptimConfig, "Optimisation.")
    ray: RayTrainConfig = opt(RayTrainConfig, "Ray Train workers, storage and retries.")
    tracking: TrackingConfig = opt(TrackingConfig, "MLflow.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")
    debug: DebugConfig = opt(DebugConfig, "Test knobs.")


def check_config(cfg: Config) -> None:
    problems = []
    if cfg.optim.batch_size < 1:
        problems.append(f"--optim.batch_size: expected >= 1, got {cfg.optim.batch_size}")
    if cfg.optim.epochs < 1:
        problems.append(f"--optim.epochs: expected >= 1, got {cfg.optim.epochs}")
    if cfg.optim.max_steps is not None and cfg.optim.max_steps < 1:
        problems.append(f"--optim.max_steps: expected >= 1 or null, got {cfg.optim.max_steps}")
    if not cfg.data.test_splits:
        problems.append("--data.test_splits: name at least one test split")
    if problems:
        raise ConfigError(problems)


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"mde/{cfg.data.dataset_name}/{cfg.loss}/seed{cfg.seed}"


# --------------------------------------------------------------------------- setup (worker and driver)


def build_model(cfg: Config):
    from tmr_core.mde import MultimodalDivergenceEstimator
    from tmr_core.training import set_seed

    set_seed(cfg.seed)
    return MultimodalDivergenceEstimator.from_backbone(
        cfg.model.backbone, projection_dim=cfg.model.projection_dim, temperature=cfg.model.temperature,
        objective=cfg.loss,
    )


def build_collator(cfg: Config):
    from transformers import ViltProcessor

    from tmr_core.mde import MDECollator

    processor = ViltProcessor.from_pretrained(cfg.model.backbone)
    return MDECollator(processor, max_length=cfg.model.max_length, storage_options=cfg.storage.options(),
                       pixel_cache_bytes=cfg.data.pixel_cache_mb * 2**20)


def predict_categories(model, batch) -> tuple[list, list]:
    """``evaluate``'s predict_fn: gold and predicted category indices of a batch."""
    from tmr_core.mde import TRAINING_KEYS

    inputs = {k: v for k, v in batch.items() if k not in TRAINING_KEYS}
    predicted = model(**inputs).logits.argmax(dim=-1)
    return batch["labels"].tolist(), predicted.tolist()


def score_categories(gold: list, pred: list) -> dict:
    from tmr_core.metrics import classification_scores

    return classification_scores(gold, pred, labels=[0, 1, 2])


def evaluate_rows(model, rows: list[dict], collate, batch_size: int, device) -> dict:
    """Accuracy, macro F1 and per-category F1 of ``model`` on ``rows`` (flat metric names)."""
    from jobs._train import shard_batches
    from tmr_core.schema import ALIGNMENT_CATEGORIES
    from tmr_core.training import evaluate

    scores = evaluate(model, shard_batches(rows, batch_size, collate), predict_categories, score_categories, device)
    flat = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    for index, name in enumerate(ALIGNMENT_CATEGORIES):
        flat[f"{name}_f1"] = scores["per_label"][index]["f1"]
    return flat


# --------------------------------------------------------------------------- train loop (every worker)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: DDP on its shard, rank 0 evaluates, logs and checkpoints each epoch."""
    import ray.train
    import ray.train.torch

    from jobs import _tracking, _train
    from tmr_core.training import build_optimizer, build_scheduler, evaluate, train_epoch

    cfg: Config = loop["cfg"]
    rank0 = _train.is_rank_zero()
    model = build_model(cfg)
    collate = build_collator(cfg)
    model = ray.train.torch.prepare_model(model)
    device = _train.device()
    optimizer = build_optimizer(_train.unwrap(model), cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, loop["total_steps"], cfg.optim.warmup_ratio)
    state = _train.restore_or_start(model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                                    loop["mlflow_run_id"])
    if rank0 and state.attempts > 1:
        print(f"[pretrain_mde] resumed at epoch {state.epoch}, step {state.global_step} (attempt {state.attempts})",
              flush=True)
    _train.announce_pid(cfg.debug)
    train_shard = _train.ShardRows(ray.train.get_dataset_shard("train"), cfg.ray.cache_shard_rows)
    valid_rows = _train.dataset_rows(ray.train.get_dataset_shard("valid"))[:cfg.debug.max_eval_rows] if rank0 else []
    progress = _train.Progress("pretrain_mde", cfg.optim.epochs)
    for epoch in range(state.epoch, cfg.optim.epochs):
        remaining = loop["total_steps"] - state.global_step
        if remaining <= 0:
            break
        cap = min(remaining, cfg.debug.max_steps_per_epoch or remaining)
        progress.epoch_start()
        batches = _train.shard_batches(train_shard, cfg.optim.batch_size, collate, cap, cfg.debug.step_delay_s,
                                       shuffle_seed=cfg.seed + epoch)
        stats = train_epoch(model, batches, optimizer, scheduler, device, cfg.optim.grad_clip,
                            on_step=lambda step, loss, e=epoch: rank0 and progress.step(e, step, state.global_step, loss))
        metrics = {"epoch": epoch + 1, "train_loss": stats["loss"], "lr": scheduler.get_last_lr()[0]}
        if rank0:
            valid = evaluate(_train.unwrap(model), _train.shard_batches(valid_rows, cfg.optim.eval_batch_size, collate),
                             predict_categories, score_categories, device)
            metrics |= {"valid_accuracy": valid["accuracy"], MONITOR: valid["macro_f1"]}
        state.finish_epoch(metrics.get(MONITOR, 0.0), stats["steps"], metrics)
        metrics["global_step"] = state.global_step
        if rank0:
            progress.epoch_end(epoch + 1, metrics)
            if loop["tracking_uri"] and state.mlflow_run_id:
                _tracking.log_metrics(loop["tracking_uri"], state.mlflow_run_id, metrics, step=epoch + 1)
        _train.report_epoch(metrics, state, model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                            cfg.storage.options(), keep=loop["checkpoints_to_keep"])


# --------------------------------------------------------------------------- driver


def total_steps(cfg: Config, train_rows: int) -> int:
    workers = max(1, cfg.ray.num_workers)
    per_epoch = -(-train_rows // (cfg.optim.batch_size * workers))
    if cfg.debug.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.debug.max_steps_per_epoch)
    steps = per_epoch * cfg.optim.epochs
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


def finalize(cfg: Config, folder: str, tracking_uri: str | None, run_id: str | None, train_time_s: float) -> dict:
    """Best epoch → (SupCon) head refit on frozen z → test scores → save, log, register."""
    from jobs import _tracking, _train
    from tmr_core.mde import MultimodalDivergenceEstimator

    options = cfg.storage.options()
    with tempfile.TemporaryDirectory() as tmp:
        best_dir, state = _train.best_model_dir(folder, tmp, options)
        model = MultimodalDivergenceEstimator.from_pretrained(best_dir, device=cfg.device)
    collate = build_collator(cfg)
    metrics: dict = {"best_epoch": state.best_epoch, "best_" + MONITOR: state.best_metric,
                     "global_step": state.global_step, "train_time_s": train_time_s, "attempts": state.attempts}
    if cfg.loss == "supcon":
        from jobs._train import shard_batches

        train_rows = _train.read_rows(cfg.data.corpus, cfg.data.train_split, options, cfg.optim.head_fit_rows)
        fit = model.fit_head_on_frozen(shard_batches(train_rows, cfg.optim.eval_batch_size, collate),
                                       epochs=cfg.optim.head_fit_epochs, lr=cfg.optim.head_fit_lr, device=cfg.device)
        metrics["head_fit_loss"] = fit["loss"]
    model.eval()
    for split in [cfg.data.valid_split, *cfg.data.test_splits]:
        rows = _train.read_rows(cfg.data.corpus, split, options, cfg.debug.max_eval_rows)
        for key, value in evaluate_rows(model, rows, collate, cfg.optim.eval_batch_size, cfg.device).items():
            metrics[f"{split}_{key}"] = value
    model_dir = _train.save_outputs(cfg, model, metrics)
    if cfg.tracking.enabled and run_id:
        _tracking.log_final_outputs(cfg, tracking_uri, run_id, model, model_dir, metrics, state.epoch,
                                    tags={"loss": cfg.loss}, job="pretrain_mde")
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.pretrain_mde")
    check_config(cfg)
    print_config(cfg, "pretrain_mde")
    from jobs import _data, _tracking, _train

    options = cfg.storage.options()
    _train.init_ray(cfg.ray)
    splits = (cfg.data.train_split, cfg.data.valid_split, *cfg.data.test_splits)
    identity = _train.run_identity(cfg, cfg.data.corpus, options, splits)
    name = cfg.ray.name or _train.default_run_name(run_name(cfg), identity)
    folder = _train.run_folder(cfg.ray, name)
    if cfg.force:
        _train.discard_run(folder, options)
    _train.claim_run_folder(folder, identity, options)
    train_ds = _data.read_split(cfg.data.corpus, cfg.data.train_split, options)
    if cfg.data.max_train_rows:
        train_ds = train_ds.limit(cfg.data.max_train_rows)
    train_ds = train_ds.materialize()
    valid_ds = _data.read_split(cfg.data.corpus, cfg.data.valid_split, options)
    tracking_uri = run_id = None
    if cfg.tracking.enabled:
        tracking_uri = _tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {"tmr.task": "mde", "tmr.dataset": cfg.data.dataset_name, "tmr.loss": cfg.loss,
                "tmr.seed": str(cfg.seed), "mlflow.source.git.commit": _tracking.git_commit() or "unknown",
                "tmr.ray_run_name": name}
        run_id = _tracking.start_or_resume_run(tracking_uri, cfg.tracking.experiment or "tmr-mde", run_name(cfg),
                                               config_to_dict(cfg), tags, folder, options)
        print(f"[pretrain_mde] MLflow run {run_id} at {tracking_uri}", flush=True)
    loop = {"cfg": cfg, "total_steps": total_steps(cfg, train_ds.count()), "run_folder": folder,
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri}
    start = time.perf_counter()
    try:
        _train.fit(train_loop_per_worker, loop, cfg.ray, name, {"train": train_ds, "valid": valid_ds}, options, MONITOR)
    except Exception:
        if run_id:
            _tracking.finish_run(tracking_uri, run_id, status="FAILED")
        raise
    metrics = finalize(cfg, folder, tracking_uri, run_id, time.perf_counter() - start)
    shown = {k: round(v, 4) for k, v in metrics.items() if "macro_f1" in k or "accuracy" in k}
    print(f"[pretrain_mde] {cfg.loss}: {shown}; model in {cfg.output}/model", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
