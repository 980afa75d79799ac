"""Fine-tune the TMR extractor for NER or RE with Ray Train, tracked and registered in MLflow.

    python -m jobs.finetune_extractor --config configs/finetune_extractor.yaml
    python -m jobs.finetune_extractor --config configs/finetune_extractor.tiny.yaml --ablation text_only --seed 1

Reads the stage tables (``<data.dataset>/{train,valid,test}``: tokens, tags or head/tail/relation,
image_uri, phrases, back_translation_uri, regions, back_translation_regions, divergence) in the
driver (small: URIs, not pixels); train goes to the workers as a Ray Dataset, each training on
``ray.train.get_dataset_shard("train")`` under DDP; rank 0 scores valid (shipped in the loop
config) each epoch, logs to MLflow and checkpoints (safetensors, resumable). The best epoch on valid
is scored on test: precision/recall/F1 micro and per entity type / relation label, and, with
``--data.ground_truth`` (the synthetic benchmark's ``ground_truth.jsonl``), on the
ambiguous-mention subset and per alignment category (strengthen/complement/weaken).

Ablations (paper Table 1/2) are the model's switches: ``--ablation no_back_translation|no_mde|
no_fine|no_coarse|text_only``; ``--data.train_fraction 0.1`` is the low-resource setting (Fig. 4).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from jobs._common import StorageConfig
from jobs._config import ConfigError, config_to_dict, opt, parse_config, print_config, run_main
from jobs._tracking import TrackingConfig
from jobs._train import DebugConfig, RayTrainConfig

MONITOR = "valid_f1"


@dataclass
class DataConfig:
    """The stage tables and what part of them to use."""

    dataset: str = opt("outputs/dataset", "Folder (or s3://) with the train/valid/test stage tables.")
    dataset_name: str = opt("synthetic", "Dataset name for run names and tags (twitter2015, twitter2017, mnre, …).")
    train_fraction: float = opt(1.0, "Train on this random fraction of the training split (low-resource: 0.05–0.5).")
    ground_truth: str | None = opt(
        None, "ground_truth.jsonl of the synthetic benchmark: adds ambiguous-subset and per-alignment scores."
    )
    relations: list[str] = opt([], "RE: the relation labels in id order; empty: read from the tables (sorted).")
    pixel_cache_mb: int = opt(
        1024, "Per worker: processed image and crop pixels kept for the next epoch (LRU); 0: process every epoch."
    )


@dataclass
class ModelConfig:
    """The extractor's backbones and encoding (tmr_core.extractor.TMRConfig)."""

    text_encoder: str = opt("bert-base-uncased", "BERT-family text encoder: hub name or local folder.")
    image_encoder: str = opt("microsoft/resnet-50", "ResNet-family image encoder: hub name or local folder.")
    max_length: int | None = opt(None, "Word pieces per sentence; null: the paper's 80 (NER) / 128 (RE).")
    max_phrase_len: int | None = opt(None, "Words per noun phrase; null: the paper's 4 (NER) / 6 (RE).")
    max_phrases: int = opt(8, "Noun phrases kept per sample.")
    num_regions: int = opt(3, "Grounded region crops per image (V^r).")
    whole_image_region: bool = opt(True, "An image with no usable grounded box gets the whole image as its region.")
    num_patches: int = opt(49, "Patch grid of V^s (7×7).")
    num_heads: int = opt(8, "Heads of every attention block.")
    dropout: float = opt(0.1, "Dropout in attention and heads.")
    fixed_alpha: list[float] = opt([0.5, 0.5, 0.0], "α (s, c, w) used by the no_mde ablation.")
    back_translation_alpha: Literal["image", "back_translation"] = opt(
        "image", "α of G'*: image = the MDE's score of (t, v), as Eq. 4 prints it; back_translation = its score "
        "of (t, v') (score_divergence --score_back_translations true), as TMR's code does."
    )


@dataclass
class OptimConfig:
    """AdamW with linear warmup and decay (paper App. B.1/B.2)."""

    lr: float = opt(3e-5, "Peak learning rate (paper NER: 3e-5).")
    weight_decay: float = opt(0.01, "AdamW weight decay on non-bias, non-norm weights.")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up.")
    batch_size: int = opt(16, "Rows per step per worker.")
    epochs: int = opt(10, "Passes over the training split.")
    grad_clip: float = opt(1.0, "Max global gradient norm; 0 disables clipping.")
    eval_batch_size: int = opt(32, "Rows per evaluation batch.")


@dataclass
class Config:
    """Fine-tune the TMR extractor for NER or RE with Ray Train."""

    task: Literal["ner", "re"] = opt("ner", "ner (Twitter-2015/2017) or re (MNRE).")
    ablation: Literal["full", "no_back_translation", "no_mde", "no_fine", "no_coarse", "text_only"] = opt(
        "full", "Which part of the model to remove (paper ablations); full keeps everything."
    )
    seed: int = opt(0, "Seed for model init, data order and the train fraction.")
    force: bool = opt(False, "Train from scratch as a new run, discarding this config's checkpoints (default: resume).")
    output: str = opt("outputs/extractor", "Folder (or s3://) for the final model, metrics.json and config.yaml.")
    device: str = opt("cpu", "Device of the driver's final test evaluation (workers use Ray's device).")
    data: DataConfig = opt(DataConfig, "The stage tables.")
    model: ModelConfig = opt(ModelConfig, "The extractor.")
    optim: OptimConfig = opt(OptimConfig, "Optimisation.")
    ray: RayTrainConfig = opt(RayTrainConfig, "Ray Train workers, storage and retries.")
    tracking: TrackingConfig = opt(TrackingConfig, "MLflow.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")
    debug: DebugConfig = opt(DebugConfig, "Test knobs.")


def check_config(cfg: Config) -> None:
    problems = []
    if not 0 < cfg.data.train_fraction <= 1:
        problems.append(f"--data.train_fraction: expected in (0, 1], got {cfg.data.train_fraction}")
    if cfg.optim.batch_size < 1:
        problems.append(f"--optim.batch_size: expected >= 1, got {cfg.optim.batch_size}")
    if cfg.optim.epochs < 1:
        problems.append(f"--optim.epochs: expected >= 1, got {cfg.optim.epochs}")
    if cfg.data.ground_truth and not cfg.data.ground_truth.startswith("s3://") and not os.path.isfile(cfg.data.ground_truth):
        problems.append(f"--data.ground_truth {cfg.data.ground_truth}: no such file")
    if cfg.tracking.register_as and cfg.tracking.register_as != f"tmr-{cfg.task}":
        problems.append(f"--tracking.register_as {cfg.tracking.register_as}: a {cfg.task} model registers as tmr-{cfg.task}")
    if problems:
        raise ConfigError(problems)


def run_name(cfg: Config) -> str:
    from jobs._tracking import default_run_name

    return cfg.tracking.run_name or default_run_name(cfg.task, cfg.data.dataset_name, cfg.ablation,
                                                     cfg.data.train_fraction, cfg.seed)


def model_config(cfg: Config, labels: list[str]):
    from tmr_core.extractor import ABLATIONS, TMRConfig

    m = cfg.model
    return TMRConfig(
        task=cfg.task, labels=tuple(labels), text_encoder=m.text_encoder, image_encoder=m.image_encoder,
        max_length=m.max_length, max_phrase_len=m.max_phrase_len, max_phrases=m.max_phrases,
        num_regions=m.num_regions, whole_image_region=m.whole_image_region, num_patches=m.num_patches, num_heads=m.num_heads, dropout=m.dropout,
        fixed_alpha=tuple(m.fixed_alpha), back_translation_alpha=m.back_translation_alpha,
        **ABLATIONS[cfg.ablation],
    )


# --------------------------------------------------------------------------- prediction and scoring


def as_model_inputs(batches):
    """``train_epoch`` calls ``model(**inputs)``; the extractor takes the whole batch as ``batch``."""
    for batch in batches:
        yield {"batch": batch}


def gold_labels(task: str, rows: list[dict]) -> list:
    """The reader's labels: every original token's tag (NER) or the relation (RE) of each row."""
    if task == "ner":
        return [[str(tag) for tag in row["tags"]] for row in rows]
    return [str(row["relation"]) for row in rows]


def score_fn(task: str, none_label: str = "None"):
    from tmr_core.metrics import ner_scores, re_scores

    return ner_scores if task == "ner" else (lambda gold, pred: re_scores(gold, pred, none_label=none_label))


def flat_scores(scores: dict, prefix: str) -> dict[str, float]:
    """``{precision, recall, f1, support, per_type|per_label}`` as flat MLflow metric names."""
    flat = {f"{prefix}_{k}": float(scores[k]) for k in ("precision", "recall", "f1", "support")}
    for label, values in (scores.get("per_type") or scores.get("per_label") or {}).items():
        flat[f"{prefix}_{label}_f1"] = float(values["f1"])
    return flat


def predict_rows(model, rows: list[dict], collate, batch_size: int, device) -> list:
    """Predicted tags per original token (NER) or relation (RE) for every row, in row order.

    Leaves the model in eval mode (``train_epoch`` switches it back).
    """
    from jobs._train import shard_batches
    from tmr_core.training import move_to_device

    model.eval()
    predictions: list = []
    for batch in shard_batches(rows, batch_size, collate):
        predicted = model.predict(move_to_device(batch, device))  # no_grad inside
        predictions.extend(predicted if model.config.task == "ner" else [relation for relation, _ in predicted])
    return predictions


def past_max_length(task: str, rows: list[dict], collate) -> int:
    """Gold entities (NER) or instances (RE) that lie at least partly past the word-piece limit."""
    from tmr_core.metrics import chunks

    count = 0
    for index, row in enumerate(rows):
        cut = collate.encode_text(row, f"row {index}").truncated_from
        if cut is None:
            continue
        if task == "ner":
            count += sum(end > cut for _, _, end in chunks([str(t) for t in row["tags"]]))
        else:
            count += max(int(row["head"]["end"]), int(row["tail"]["end"])) > cut
    return count


def score_rows(model, rows: list[dict], collate, batch_size: int, device, split: str) -> tuple[dict, list]:
    """``(flat metrics of split, predictions)``: predictions on every row against its original gold."""
    task = model.config.task
    pred = predict_rows(model, rows, collate, batch_size, device)
    scores = score_fn(task, model.config.none_label)(gold_labels(task, rows), pred)
    return flat_scores(scores, split), pred


def gold_support(task: str, rows: list[dict], none_label: str) -> int:
    """Gold entities (NER) or gold non-``None`` instances (RE) of ``rows``: what recall divides by."""
    from tmr_core.metrics import chunks

    if task == "ner":
        return sum(len(chunks([str(t) for t in row["tags"]])) for row in rows)
    return sum(str(row["relation"]) != none_label for row in rows)


def support_metrics(task: str, rows: list[dict], collate, none_label: str, split: str) -> dict[str, float]:
    """``<split>_support`` and ``<split>_past_max_length`` (gold that lies past the word-piece limit)."""
    return {f"{split}_support": float(gold_support(task, rows, none_label)),
            f"{split}_past_max_length": float(past_max_length(task, rows, collate))}


def ambiguous_ner_scores(rows: list[dict], pred: list, truth: dict[str, dict]) -> dict:
    """Entity P/R/F1 restricted to the ambiguous mentions' spans.

    Gold chunks are the ambiguous mentions; a predicted chunk counts when its span equals one of
    them (so a wrong type there costs precision and recall, a missed mention costs recall).
    """
    from tmr_core.metrics import chunks

    correct = predicted = expected = 0
    for row, pred_tags in zip(rows, pred, strict=True):
        mentions = [m for m in truth.get(row["id"], {}).get("mentions", []) if m["ambiguous"]]
        spans = {(m["start"], m["end"]): m["type"] for m in mentions}
        expected += len(spans)
        for entity_type, start, end in chunks(pred_tags):
            if (start, end) in spans:
                predicted += 1
                correct += spans[(start, end)] == entity_type
    precision = correct / predicted if predicted else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": expected}


def ground_truth_scores(task: str, rows: list[dict], gold: list, pred: list, truth: dict[str, dict],
                        none_label: str) -> dict[str, float]:
    """Scores on the ambiguous subset and per alignment category (synthetic benchmark)."""
    from tmr_core.probes import alpha_alignment_scores
    from tmr_core.schema import ALIGNMENT_CATEGORIES

    scorer = score_fn(task, none_label)
    metrics: dict[str, float] = {}
    if task == "ner":
        scores = ambiguous_ner_scores(rows, pred, truth)
    else:
        keep = [i for i, row in enumerate(rows) if truth.get(row["id"], {}).get("ambiguous")]
        scores = scorer([gold[i] for i in keep], [pred[i] for i in keep])
    metrics |= {f"test_ambiguous_{k}": float(scores[k]) for k in ("precision", "recall", "f1")}
    metrics["test_ambiguous_support"] = float(scores["support"])
    for category in ALIGNMENT_CATEGORIES:
        keep = [i for i, row in enumerate(rows) if truth.get(row["id"], {}).get("alignment") == category]
        if keep:
            metrics[f"test_align_{category}_f1"] = float(scorer([gold[i] for i in keep], [pred[i] for i in keep])["f1"])
    alpha = alpha_alignment_scores(rows, truth)
    return metrics | {f"test_alpha_alignment_{k}": v for k, v in alpha.items() if k != "support"}


# --------------------------------------------------------------------------- train loop (every worker)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: DDP on its shard, rank 0 evaluates, logs and checkpoints each epoch."""
    import ray.train
    import ray.train.torch

    from jobs import _tracking, _train
    from tmr_core.extractor import TMRExtractor
    from tmr_core.training import build_optimizer, build_scheduler, set_seed, train_epoch

    cfg: Config = loop["cfg"]
    rank0 = _train.is_rank_zero()
    set_seed(cfg.seed)
    model = TMRExtractor.build(model_config(cfg, loop["labels"]))
    collate = model.collator(cfg.storage.options(), pixel_cache_bytes=cfg.data.pixel_cache_mb * 2**20)
    model = ray.train.torch.prepare_model(model)
    device = _train.device()
    optimizer = build_optimizer(_train.unwrap(model), cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, loop["total_steps"], cfg.optim.warmup_ratio)
    state = _train.restore_or_start(model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                                    loop["mlflow_run_id"])
    if rank0 and state.attempts > 1:
        print(f"[finetune_extractor] resumed at epoch {state.epoch}, step {state.global_step} "
              f"(attempt {state.attempts})", flush=True)
    _train.announce_pid(cfg.debug)
    train_shard = _train.ShardRows(ray.train.get_dataset_shard("train"), cfg.ray.cache_shard_rows)
    valid_rows = loop["valid_rows"] if rank0 else []
    progress = _train.Progress("finetune_extractor", cfg.optim.epochs)
    for epoch in range(state.epoch, cfg.optim.epochs):
        progress.epoch_start()
        batches = _train.shard_batches(train_shard, cfg.optim.batch_size, collate,
                                       cfg.debug.max_steps_per_epoch, cfg.debug.step_delay_s,
                                       shuffle_seed=cfg.seed + epoch)
        stats = train_epoch(model, as_model_inputs(batches), optimizer, scheduler, device, cfg.optim.grad_clip,
                            on_step=lambda step, loss, e=epoch: rank0 and progress.step(e, step, state.global_step, loss))
        metrics = {"epoch": epoch + 1, "train_loss": stats["loss"], "lr": scheduler.get_last_lr()[0]}
        if rank0:
            valid, _ = score_rows(_train.unwrap(model), valid_rows, collate, cfg.optim.eval_batch_size, device, "valid")
            metrics |= {k: valid[k] for k in ("valid_precision", "valid_recall", MONITOR)}
        state.finish_epoch(metrics.get(MONITOR, 0.0), stats["steps"], metrics)
        metrics["global_step"] = state.global_step
        if rank0:
            progress.epoch_end(epoch + 1, metrics)
            if loop["tracking_uri"] and state.mlflow_run_id:
                _tracking.log_metrics(loop["tracking_uri"], state.mlflow_run_id, metrics, step=epoch + 1)
        _train.report_epoch(metrics, state, model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                            cfg.storage.options(), keep=loop["checkpoints_to_keep"])


# --------------------------------------------------------------------------- driver


def relation_labels(cfg: Config) -> list[str]:
    """RE labels in id order: the config's list, else every relation seen in the tables, sorted."""
    from jobs import _train

    if cfg.data.relations:
        return list(cfg.data.relations)
    seen: set[str] = set()
    for split in ("train", "valid", "test"):
        seen.update(row["relation"] for row in _train.read_rows(cfg.data.dataset, split, cfg.storage.options()))
    return sorted(seen)


def load_ground_truth(path: str | None, options) -> dict[str, dict]:
    if not path:
        return {}
    from tmr_core import storage

    text = storage.read_bytes(path, options).decode("utf-8")
    return {row["id"]: row for row in (json.loads(line) for line in text.splitlines() if line.strip())}


def finalize(cfg: Config, folder: str, tracking_uri: str | None, run_id: str | None,
             train_time_s: float) -> dict:
    """Best epoch → test scores (micro, per label, ambiguous subset, per alignment) → save, log, register."""
    from jobs import _tracking, _train
    from tmr_core.extractor import TMRExtractor

    options = cfg.storage.options()
    with tempfile.TemporaryDirectory() as tmp:
        best_dir, state = _train.best_model_dir(folder, tmp, options)
        model = TMRExtractor.from_pretrained(best_dir, device=cfg.device)
    collate = model.collator(options)
    metrics: dict = {"best_epoch": state.best_epoch, "best_" + MONITOR: state.best_metric,
                     "global_step": state.global_step, "train_time_s": train_time_s, "attempts": state.attempts}
    none_label = model.config.none_label
    valid_rows = _train.read_rows(cfg.data.dataset, "valid", options, cfg.debug.max_eval_rows)
    metrics |= support_metrics(cfg.task, valid_rows, collate, none_label, "valid")
    rows = _train.read_rows(cfg.data.dataset, "test", options, cfg.debug.max_eval_rows)
    test, pred = score_rows(model, rows, collate, cfg.optim.eval_batch_size, cfg.device, "test")
    metrics |= test | support_metrics(cfg.task, rows, collate, none_label, "test")
    gold = gold_labels(cfg.task, rows)
    truth = load_ground_truth(cfg.data.ground_truth, options)
    if truth:
        metrics |= ground_truth_scores(cfg.task, rows, gold, pred, truth, model.config.none_label)
    model_dir = _train.save_outputs(cfg, model, metrics)
    if cfg.tracking.enabled and run_id:
        _tracking.log_final_outputs(cfg, tracking_uri, run_id, model, model_dir, metrics, state.epoch,
                                    tags={"ablation": cfg.ablation}, job="finetune_extractor")
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.finetune_extractor")
    check_config(cfg)
    print_config(cfg, "finetune_extractor")
    from jobs import _tracking, _train

    options = cfg.storage.options()
    _train.init_ray(cfg.ray)
    identity = _train.run_identity(cfg, cfg.data.dataset, options)
    name = cfg.ray.name or _train.default_run_name(run_name(cfg), identity)
    folder = _train.run_folder(cfg.ray, name)
    if cfg.force:
        _train.discard_run(folder, options)
    _train.claim_run_folder(folder, identity, options)
    train_ds = _train.table_dataset(cfg.data.dataset, "train", options)
    if cfg.data.train_fraction < 1.0:
        train_ds = train_ds.random_sample(cfg.data.train_fraction, seed=cfg.seed)
    train_ds = train_ds.materialize()
    train_rows = train_ds.count()
    if train_rows == 0:
        raise ConfigError([f"--data.train_fraction {cfg.data.train_fraction}: no training row left"])
    labels = relation_labels(cfg) if cfg.task == "re" else []
    if cfg.task == "ner":
        from tmr_core.schema import NER_TAGS

        labels = list(NER_TAGS)
    tracking_uri = run_id = None
    if cfg.tracking.enabled:
        tracking_uri = _tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {"tmr.task": cfg.task, "tmr.dataset": cfg.data.dataset_name, "tmr.ablation": cfg.ablation,
                "tmr.train_fraction": str(cfg.data.train_fraction), "tmr.seed": str(cfg.seed),
                "tmr.train_rows": str(train_rows), "tmr.ray_run_name": name,
                "mlflow.source.git.commit": _tracking.git_commit() or "unknown"}
        run_id = _tracking.start_or_resume_run(tracking_uri, cfg.tracking.experiment or f"tmr-{cfg.task}",
                                               run_name(cfg), config_to_dict(cfg), tags, folder, options)
        print(f"[finetune_extractor] MLflow run {run_id} at {tracking_uri}", flush=True)
    workers = max(1, cfg.ray.num_workers)
    per_epoch = -(-train_rows // (cfg.optim.batch_size * workers))
    if cfg.debug.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.debug.max_steps_per_epoch)
    # Valid is small and scored by rank 0 only: read it here with pyarrow and ship the rows in the
    # loop config, so a (re)started worker group does not launch a Ray Data job to fetch it.
    valid_rows = _train.read_rows(cfg.data.dataset, "valid", options, cfg.debug.max_eval_rows)
    loop = {"cfg": cfg, "labels": labels, "total_steps": per_epoch * cfg.optim.epochs, "run_folder": folder,
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "valid_rows": valid_rows}
    start = time.perf_counter()
    try:
        _train.fit(train_loop_per_worker, loop, cfg.ray, name, {"train": train_ds}, options, MONITOR)
    except Exception:
        if run_id:
            _tracking.finish_run(tracking_uri, run_id, status="FAILED")
        raise
    metrics = finalize(cfg, folder, tracking_uri, run_id, time.perf_counter() - start)
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("test_f1", "test_ambiguous_f1", "best_epoch")}
    print(f"[finetune_extractor] {cfg.task}/{cfg.ablation}: {shown}; model in {cfg.output}/model", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
