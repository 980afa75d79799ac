"""The Ray Train wiring both training jobs share: configs, checkpoints, resume and progress.

A job writes one ``train_loop_per_worker`` and calls, in order:

    state = restore_or_start(model, optimizer, scheduler, loop["run_folder"], loop["local_mode"])
    for epoch in range(state.epoch, epochs):
        ...  # train on ray.train.get_dataset_shard("train"), evaluate valid on rank 0
        state.finish_epoch(valid_metric, steps)
        report_epoch(metrics, state, model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                     keep=loop["checkpoints_to_keep"])

A checkpoint folder (``checkpoint_epoch_0003/``) holds everything a resume needs, weights in
safetensors only:

    model/config.json, model/model.safetensors    the unwrapped model (``save_pretrained``)
    optimizer.safetensors, optimizer.json         AdamW moments; param groups + scheduler state
    train_state.json                              epoch, global step, best epoch, MLflow run id

Ray Train persists it to ``<storage_path>/<name>/`` (local or ``s3://``) and, on a worker
failure (``FailureConfig(max_failures)``) or when a job is resubmitted with the same name and
storage path, hands it back through ``ray.train.get_checkpoint()``. Local mode
(``num_workers: 0``) has no Ray storage, so the scaffold persists and finds checkpoints itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from jobs._config import opt

CHECKPOINT_PREFIX = "checkpoint_epoch_"
MODEL_DIR = "model"
STATE_FILE = "train_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


@dataclass
class RayTrainConfig:
    """How Ray Train runs the loop: workers, resources, storage, retries."""

    num_workers: int = opt(1, "Training workers (DDP ranks); 0: local mode, the loop runs in this process.")
    use_gpu: bool = opt(False, "One GPU per worker (NCCL); false: CPU workers (gloo).")
    cpus_per_worker: float = opt(1.0, "CPUs each worker reserves.")
    gpus_per_worker: float = opt(1.0, "GPUs each worker reserves when use_gpu is true.")
    resources_per_worker: dict[str, float] = opt({}, "Extra custom resources per worker, e.g. {accelerator_type:A100: 0.01}.")
    name: str | None = opt(
        None, "Ray Train run name (storage subfolder); null: the MLflow run name with / -> _ and a hash of the "
        "config and input, so a resubmitted job resumes its run and a changed one starts afresh."
    )
    storage_path: str = opt("outputs/ray_results", "Where checkpoints persist: a local folder or s3://bucket/prefix.")
    max_failures: int = opt(2, "Worker-group restarts from the last checkpoint before the run fails; -1: unlimited.")
    checkpoints_to_keep: int | None = opt(
        None, "Keep the best N checkpoints by the validation metric (plus the latest); null: keep all."
    )
    address: str | None = opt(None, "ray.init address; null: a running cluster if any, else a local one.")
    cache_shard_rows: int = opt(
        100_000, "Read a worker's training shard into its memory before the first step when it has at most this "
        "many rows (stage tables hold text and URIs, not pixels): every epoch is then a seeded shuffle of it in id "
        "order, the same on any cluster; 0: stream it from Ray Data every epoch."
    )

    def __post_init__(self) -> None:
        problems = []
        if self.cache_shard_rows < 0:
            problems.append(f"ray.cache_shard_rows: expected >= 0, got {self.cache_shard_rows}")
        if self.num_workers < 0:
            problems.append(f"ray.num_workers: expected >= 0, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            problems.append(f"ray.cpus_per_worker: expected > 0, got {self.cpus_per_worker}")
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            problems.append(f"ray.checkpoints_to_keep: expected >= 1 or null, got {self.checkpoints_to_keep}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DebugConfig:
    """Knobs for tests and demos; leave at their defaults for real runs."""

    step_delay_s: float = opt(0.0, "Sleep after each training step (lets a test kill a worker mid-run).")
    max_steps_per_epoch: int | None = opt(None, "Stop each epoch after this many steps; null: the whole shard.")
    max_eval_rows: int | None = opt(None, "Score only the first N valid/test rows; null: all of them.")
    worker_pid_file: str | None = opt(
        None, "Rank 0 appends its process id here at each (re)start, so a test can kill it from outside."
    )


def announce_pid(debug: DebugConfig) -> None:
    """Append this worker's pid to ``debug.worker_pid_file`` (rank 0 only; tests kill it)."""
    if debug.worker_pid_file and is_rank_zero():
        with open(debug.worker_pid_file, "a") as handle:
            handle.write(f"{os.getpid()}\n")


# --------------------------------------------------------------------------- Ray configs


def scaling_config(cfg: RayTrainConfig):
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu and cfg.num_workers > 0,
        resources_per_worker=resources if cfg.num_workers > 0 else None,
    )


def run_config(cfg: RayTrainConfig, name: str, storage_options: Any = None, metric: str | None = None):
    """``RunConfig(name, storage_path)`` with retries and retention; an ``s3://`` path with a custom
    endpoint gets a pyarrow S3 filesystem so Ray writes where the rest of the pipeline does."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from tmr_core import storage

    storage_path, filesystem = cfg.storage_path, None
    if storage.is_remote(cfg.storage_path):
        endpoint = getattr(storage_options, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            filesystem, storage_path = storage.resolve(cfg.storage_path, storage_options)
    else:
        storage_path = os.path.abspath(cfg.storage_path)
    keep = CheckpointConfig(
        num_to_keep=cfg.checkpoints_to_keep,
        checkpoint_score_attribute=metric if cfg.checkpoints_to_keep else None,
        checkpoint_score_order="max",
    )
    return RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures), checkpoint_config=keep,
    )


def run_folder(cfg: RayTrainConfig, name: str) -> str:
    """``<storage_path>/<name>``: where Ray (or local mode) keeps this run's checkpoints."""
    from tmr_core import storage

    base = cfg.storage_path if storage.is_remote(cfg.storage_path) else os.path.abspath(cfg.storage_path)
    return storage.join(base, name)


def ray_run_name(mlflow_run_name: str) -> str:
    """A storage-safe Ray run name from an MLflow run name (``ner/x/full`` -> ``ner_x_full``)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", mlflow_run_name).strip("_")


# --------------------------------------------------------------------------- run identity

IDENTITY_FILE = "run_identity.json"
# where and how a run executes and is tracked, not what it trains
NOT_IDENTITY = ("ray", "tracking", "debug", "output", "device", "force")


def run_identity(cfg: Any, dataset_uri: str, options: Any = None,
                 splits: tuple[str, ...] = ("train", "valid", "test")) -> dict:
    """What a training run trains: its resolved config minus :data:`NOT_IDENTITY` and
    ``optim.epochs`` (a resubmission may extend a run), plus the identity of its input tables and
    of every local file or folder the config names (a backbone rebuilt in place is another run)."""
    from jobs._config import config_to_dict
    from jobs._data import file_infos, input_identity

    config = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IDENTITY}
    config.get("optim", {}).pop("epochs", None)
    # the input tables are identified by their stage marker above, not by their files' mtimes
    named = _strings(config) - {dataset_uri}
    local = {path: file_infos(path) for path in sorted(named) if os.sep in path and os.path.exists(path)}
    return {"config": config, "inputs": input_identity(dataset_uri, list(splits), options), "local_files": local}


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_strings, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(_strings, value)) if value else set()
    return {value} if isinstance(value, str) and value else set()


def default_run_name(mlflow_run_name: str, identity: dict) -> str:
    """``<ray_run_name>-<8 hex of the identity>``: a resubmitted job finds its run and resumes it,
    while a changed config, default or input table starts a run of its own."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{ray_run_name(mlflow_run_name)}-{digest[:8]}"


def discard_run(folder: str, options: Any = None) -> None:
    """``--force true``: remove this config's run folder (checkpoints, MLflow run id), so the job
    trains from scratch as a new run instead of resuming or re-finalising a finished one."""
    from tmr_core import storage

    if storage.exists(folder, options):
        print(f"[train] --force: starting over; removing {folder}", flush=True)
        storage.remove(folder, options)


def claim_run_folder(folder: str, identity: dict, options: Any = None) -> None:
    """Record what a run folder trains, or check that a reused one (an explicit ``ray.name``)
    trains the same thing, so a changed job never silently resumes another run's checkpoints.

    Raises:
        ConfigError: the folder holds a run of another config or input, naming what differs.
    """
    from jobs._config import ConfigError
    from tmr_core import storage

    path = storage.join(folder, IDENTITY_FILE)
    if not storage.exists(path, options):
        storage.write_bytes_atomic(path, json.dumps(identity, sort_keys=True, default=str, indent=1).encode(), options)
        return
    recorded = json.loads(storage.read_bytes(path, options))
    current = json.loads(json.dumps(identity, default=str))
    differs = _differing_keys(recorded.get("config"), current["config"])
    if recorded.get("inputs") != current["inputs"]:
        differs.append("the input tables")
    if recorded.get("local_files") != current.get("local_files"):
        differs.append("the local files it names (" + ", ".join(sorted(current.get("local_files") or {})) + ")")
    if differs:
        shown = ", ".join(differs[:8]) + (f" and {len(differs) - 8} more" if len(differs) > 8 else "")
        raise ConfigError([
            f"ray.name: {folder} holds a run of another config or input ({shown} differ); its checkpoints "
            "would be resumed. Pick another --ray.name, leave it null (one run per config), or delete that folder."
        ])


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".") or "(root)"]


def fit(train_loop: Any, loop_config: dict, cfg: RayTrainConfig, name: str, datasets: dict,
        storage_options: Any = None, metric: str | None = None):
    """Run ``train_loop`` under a ``TorchTrainer``; only the ``train`` dataset is split across workers."""
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=absolute_local_paths({**loop_config, "local_mode": cfg.num_workers == 0,
                                                "checkpoints_to_keep": cfg.checkpoints_to_keep}),
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, name, storage_options, metric),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()


def absolute_local_paths(value: Any) -> Any:
    """``value`` (configs, dicts, lists) with every relative path that exists here made absolute.

    Ray Train's workers are actors, which start in Ray's own working directory, not the driver's:
    ``--model.base .cache/tmr-models/text-to-image`` worked in local mode and failed with one worker
    or more. Strings holding a path separator that name no local file (s3:// URIs, hub ids such as
    ``bert-base-uncased``, plain words) are left alone.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {f.name: absolute_local_paths(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changed)
    if isinstance(value, dict):
        return {key: absolute_local_paths(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields as arguments
        return type(value)(*(absolute_local_paths(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(absolute_local_paths(item) for item in value)
    if (isinstance(value, str) and os.sep in value and "://" not in value and not os.path.isabs(value)
            and os.path.exists(value)):
        return os.path.abspath(value)
    return value


def init_ray(cfg: RayTrainConfig) -> None:
    """A bare ``ray.init`` (joins a cluster under ``ray job submit``), once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.address, log_to_driver=True)


# --------------------------------------------------------------------------- worker context


def world_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def rank_agreement(model: Any, steps: int) -> dict:
    """``world_size``, every rank's ``rank_steps`` this epoch and ``ranks_agree``: whether every rank
    holds the tensors rank 0 checkpoints (the model's ``state_dict``). A collective under DDP: every
    rank calls it. Rank 0 alone writes the checkpoint the export comes from, so a rank that drifted
    (weights DDP does not all-reduce, such as a VAE trained before it) or stepped differently would
    otherwise go unseen; the digest is float64 sums on the tensors' device, so nothing is copied
    and equal weights give equal sums."""
    import torch

    world = world_size()
    if world == 1:
        return {"world_size": 1, "rank_steps": [steps], "ranks_agree": True}
    with torch.no_grad():
        digest = [(float(t.double().sum()), float(t.double().square().sum()))
                  for t in unwrap(model).state_dict().values()]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (steps, digest))
    return {"world_size": world, "rank_steps": [s for s, _ in gathered],
            "ranks_agree": all(d == gathered[0][1] for _, d in gathered)}


def is_rank_zero() -> bool:
    return world_rank() == 0


def unwrap(model: Any) -> Any:
    """The model inside a DDP wrapper (``prepare_model`` wraps only when world size > 1)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def device():
    import ray.train.torch

    return ray.train.torch.get_device()


# --------------------------------------------------------------------------- train state


@dataclass
class TrainState:
    """Counters that continue across restarts, saved in every checkpoint's ``train_state.json``."""

    epoch: int = 0  # completed epochs; the next epoch to run
    global_step: int = 0  # optimizer steps taken so far, summed over epochs
    best_metric: float | None = None  # best validation score so far (higher is better)
    best_epoch: int | None = None  # 1-based epoch that reached it
    best_checkpoint: str | None = None  # folder name of that epoch's checkpoint
    mlflow_run_id: str | None = None
    attempts: int = 1  # how many times the loop has (re)started on this run
    history: list[dict] = field(default_factory=list)  # per-epoch metrics, for the final report
    scores: dict[str, float] = field(default_factory=dict)  # checkpoint folder -> its metric (local mode: kept ones)

    def finish_epoch(self, metric: float, steps: int, metrics: dict) -> bool:
        """Advance the counters after an epoch; returns True when ``metric`` is a new best."""
        self.epoch += 1
        self.global_step += steps
        self.history.append({"epoch": self.epoch, "global_step": self.global_step, **metrics})
        self.scores[checkpoint_name(self.epoch)] = float(metric)
        improved = self.best_metric is None or metric > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = float(metric), self.epoch
            self.best_checkpoint = checkpoint_name(self.epoch)
        return improved

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


# --------------------------------------------------------------------------- checkpoints


def save_optimizer(directory: str, optimizer: Any, scheduler: Any) -> None:
    """Optimizer tensors to safetensors and the rest (param groups, scheduler) to JSON."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().contiguous().cpu()
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
    meta = {"param_groups": groups, "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_file(tensors, os.path.join(directory, OPTIMIZER_TENSORS))
    with open(os.path.join(directory, OPTIMIZER_META), "w") as handle:
        json.dump(meta, handle, default=lambda value: None)


def load_optimizer(directory: str, optimizer: Any, scheduler: Any) -> None:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, OPTIMIZER_TENSORS))
    with open(os.path.join(directory, OPTIMIZER_META)) as handle:
        meta = json.load(handle)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta.get("scheduler"):
        saved = {k: v for k, v in meta["scheduler"].items() if k != "lr_lambdas"}
        scheduler.load_state_dict({**scheduler.state_dict(), **saved})


def write_checkpoint(directory: str, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> None:
    """Fill ``directory`` with the unwrapped model, optimizer, scheduler and train state."""
    unwrap(model).save_pretrained(os.path.join(directory, MODEL_DIR))
    if optimizer is not None:
        save_optimizer(directory, optimizer, scheduler)
    with open(os.path.join(directory, STATE_FILE), "w") as handle:
        handle.write(state.to_json())


def report_epoch(metrics: dict, state: TrainState, model: Any, optimizer: Any, scheduler: Any,
                 folder: str, local_mode: bool, storage_options: Any = None, keep: int | None = None) -> None:
    """``ray.train.report`` this epoch's metrics with a checkpoint written by rank 0.

    Every rank calls it (it is a barrier). In local mode the checkpoint is also copied to
    ``folder/checkpoint_epoch_NNNN`` because Ray keeps no storage there, and ``keep``
    (``ray.checkpoints_to_keep``, which Ray applies to its own storage) is applied here:
    :func:`forget_superseded_checkpoints`.
    """
    import ray.train
    from ray.train import Checkpoint

    name = checkpoint_name(state.epoch)
    # decided before the state is written, so train_state.json lists only the checkpoints that stay
    superseded = forget_superseded_checkpoints(state, keep) if local_mode and keep else []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if is_rank_zero():
            write_checkpoint(tmp, model, optimizer, scheduler, state)
            if local_mode:
                persisted = keep_local_checkpoint(tmp, folder, state, superseded, bool(keep), storage_options)
                checkpoint = Checkpoint(persisted) if persisted else Checkpoint.from_directory(tmp)
            else:
                checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def forget_superseded_checkpoints(state: TrainState, keep: int) -> list[str]:
    """The local-mode checkpoints to remove now, dropped from ``state.scores``: all but the
    ``keep`` best by the monitored metric, the best one (which the job exports) and the latest
    (where a restart resumes), as Ray's ``CheckpointConfig(num_to_keep)`` does with its own
    storage. A tiny back-translator checkpoints 13 MB for each of ~180 short epochs: 2.4 GB kept
    otherwise."""
    ranked = sorted(state.scores, key=lambda name: state.scores[name], reverse=True)
    kept = set(ranked[:keep]) | {state.best_checkpoint, checkpoint_name(state.epoch)}
    superseded = [name for name in state.scores if name not in kept]
    for name in superseded:
        del state.scores[name]
    return superseded


def keep_local_checkpoint(source: str, folder: str, state: TrainState, superseded: list[str], prune: bool,
                          storage_options: Any = None) -> str | None:
    """Local mode: persist this epoch's checkpoint to ``folder``; with ``prune``
    (``ray.checkpoints_to_keep`` set) remove the superseded checkpoints and any
    :func:`unlisted_checkpoints`, else every checkpoint stays.
    Returns the local path of the persisted checkpoint, or None for a remote folder."""
    persisted = persist_local_checkpoint(source, folder, checkpoint_name(state.epoch), storage_options)
    if prune:
        remove_checkpoints(folder, sorted(set(superseded) | set(unlisted_checkpoints(folder, state))), storage_options)
    return persisted


def unlisted_checkpoints(folder: str, state: TrainState) -> list[str]:
    """Checkpoint folders in a local run folder that ``state.scores`` no longer lists, other than
    the best (which the job exports; a state written before ``scores`` existed lists nothing) and
    the latest: what a crash between persisting an epoch's checkpoint and removing the ones it
    superseded left behind, which the resumed state no longer names. [] for a remote folder (its
    superseded checkpoints are removed by name only, so a crash there can still leave some)."""
    from tmr_core import storage

    if storage.is_remote(folder) or not os.path.isdir(folder):
        return []
    listed = set(state.scores) | {state.best_checkpoint, checkpoint_name(state.epoch)}
    return sorted(n for n in os.listdir(folder) if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", n) and n not in listed)


def remove_checkpoints(folder: str, names: list[str], storage_options: Any = None) -> None:
    from tmr_core import storage

    for name in names:
        storage.remove(storage.join(folder, name), storage_options)


def persist_local_checkpoint(source: str, folder: str, name: str, storage_options: Any = None) -> str | None:
    """Copy a checkpoint folder to ``folder/name`` (local or s3://); returns the local path or None."""
    from tmr_core import storage

    target = storage.join(folder, name)
    if storage.is_remote(folder):
        for root, _, files in os.walk(source):
            for file_name in files:
                local = os.path.join(root, file_name)
                relative = os.path.relpath(local, source).replace(os.sep, "/")
                with open(local, "rb") as handle:
                    storage.write_bytes_atomic(storage.join(target, relative), handle.read(), storage_options)
        return None
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)  # a half-copied checkpoint is never picked up
    return target


def latest_local_checkpoint(folder: str) -> str | None:
    """The newest complete ``checkpoint_epoch_*`` folder under a local run folder, or None.

    Complete means every file a resume reads is there (a worker killed while uploading leaves a
    partial folder behind).
    """
    if not os.path.isdir(folder):
        return None
    needed = (STATE_FILE, os.path.join(MODEL_DIR, "model.safetensors"), os.path.join(MODEL_DIR, "config.json"))
    names = sorted(n for n in os.listdir(folder)
                   if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", n)
                   and all(os.path.isfile(os.path.join(folder, n, f)) for f in needed))
    return os.path.join(folder, names[-1]) if names else None


def restore_or_start(model: Any, optimizer: Any, scheduler: Any, folder: str, local_mode: bool,
                     mlflow_run_id: str | None = None) -> TrainState:
    """Load the latest checkpoint into the model/optimizer/scheduler if there is one.

    Ray hands it back after a worker failure or on a resubmitted run. When it has none, a local
    run folder is searched too: local mode keeps no Ray storage, and a worker killed right after
    uploading a checkpoint can die before the controller registered it.
    Returns the restored :class:`TrainState` (``attempts`` + 1), or a fresh one.
    """
    import ray.train
    from safetensors.torch import load_model

    from tmr_core import storage

    checkpoint = ray.train.get_checkpoint()
    local_path = None
    if checkpoint is None and not storage.is_remote(folder):
        local_path = latest_local_checkpoint(folder)
    if checkpoint is None and local_path is None:
        return TrainState(mlflow_run_id=mlflow_run_id)
    with (checkpoint.as_directory() if checkpoint is not None else _nullcontext(local_path)) as directory:
        load_model(unwrap(model), os.path.join(directory, MODEL_DIR, "model.safetensors"), strict=True)
        if optimizer is not None and os.path.isfile(os.path.join(directory, OPTIMIZER_TENSORS)):
            load_optimizer(directory, optimizer, scheduler)
        with open(os.path.join(directory, STATE_FILE)) as handle:
            state = TrainState.from_json(handle.read())
    state.attempts += 1
    state.mlflow_run_id = state.mlflow_run_id or mlflow_run_id
    return state


class _nullcontext:
    def __init__(self, value: str):
        self.value = value

    def __enter__(self) -> str:
        return self.value

    def __exit__(self, *exc: Any) -> None:
        return None


def best_model_dir(folder: str, local_dir: str, storage_options: Any = None) -> tuple[str, TrainState]:
    """Download (if remote) the best epoch's ``model/`` folder of a finished run.

    Reads ``train_state.json`` of the latest checkpoint in ``folder`` to find the best one.

    Returns:
        ``(local model folder, latest TrainState)``.

    Raises:
        FileNotFoundError: the run folder holds no checkpoint.
    """
    from tmr_core import storage

    state = _latest_state(folder, storage_options)
    if state is None or state.best_checkpoint is None:
        raise FileNotFoundError(f"{folder}: no {CHECKPOINT_PREFIX}* folder with {STATE_FILE}; did training run?")
    source = storage.join(folder, state.best_checkpoint, MODEL_DIR)
    if not storage.is_remote(folder):
        return source, state
    target = os.path.join(local_dir, MODEL_DIR)
    os.makedirs(target, exist_ok=True)
    for file_name in ("config.json", "model.safetensors"):
        with open(os.path.join(target, file_name), "wb") as handle:
            handle.write(storage.read_bytes(storage.join(source, file_name), storage_options))
    return target, state


def _latest_state(folder: str, storage_options: Any = None) -> TrainState | None:
    import pyarrow.fs as pafs

    from tmr_core import storage

    fs, path = storage.resolve(folder, storage_options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (FileNotFoundError, OSError):
        return None
    names = sorted(os.path.basename(i.path) for i in infos
                   if i.type == pafs.FileType.Directory
                   and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", os.path.basename(i.path)))
    for name in reversed(names):
        state_uri = storage.join(folder, name, STATE_FILE)
        if storage.exists(state_uri, storage_options):
            return TrainState.from_json(storage.read_bytes(state_uri, storage_options).decode())
    return None


def latest_state(folder: str, storage_options: Any = None) -> TrainState | None:
    """The train state of the newest checkpoint in a run folder, or None before the first epoch."""
    return _latest_state(folder, storage_options)


# --------------------------------------------------------------------------- progress


class Progress:
    """Rank-0 console progress: ``[job] epoch 2/5 step 40/120 loss 0.53 (12.1 steps/s)``."""

    def __init__(self, title: str, epochs: int, every: int = 10):
        self.title, self.epochs, self.every = title, epochs, max(1, every)
        self.start = time.perf_counter()

    def step(self, epoch: int, step: int, global_step: int, loss: float) -> None:
        if (step + 1) % self.every == 0:
            rate = (step + 1) / max(time.perf_counter() - self.start, 1e-9)
            print(f"[{self.title}] epoch {epoch + 1}/{self.epochs} step {step + 1} "
                  f"(global {global_step + step + 1}) loss {loss:.4f} ({rate:.1f} steps/s)", flush=True)

    def epoch_start(self) -> None:
        self.start = time.perf_counter()

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"[{self.title}] epoch {epoch}/{self.epochs} done in {time.perf_counter() - self.start:.1f}s: {shown}",
              flush=True)


class ShardRows:
    """A worker's training shard, epoch after epoch: read from Ray Data once and, if it has at most
    ``keep_up_to`` rows, kept in this worker's memory in ``id`` order and reshuffled per epoch.

    Each epoch over a Ray Data shard restarts its streaming split and pays Ray Data's per-batch
    iteration; on 2 cores that was ~0.5–1.7 s per epoch plus 6–9 ms per batch
    (``benchmarks/bench_train.py``), a third of a tiny model's step. The order of a streamed shard
    also depends on the cluster: how many read tasks ran and which block finished first. So a shard
    that fits is read in full before its first step and sorted by ``id`` (stream order if a row has
    none), and every epoch, the first included, is a seeded shuffle of that list: one worker
    trains the same steps from the same seed on any cluster. (With several workers the rows each
    rank gets still follow the stream; each rank keeps its rows, so DDP ranks keep equal step
    counts.) A shard over the limit streams every epoch through a seeded local shuffle buffer.
    """

    def __init__(self, shard: Any, keep_up_to: int):
        self.shard = shard
        self.keep_up_to = keep_up_to
        self.rows: list[dict] | None = None

    def chunks(self, batch_size: int, shuffle_seed: int | None = None):
        """Lists of up to ``batch_size`` row dicts covering the shard once."""
        if self.rows is None and self.keep_up_to > 0:
            yield from self._read_or_stream(batch_size, shuffle_seed)
            if self.rows is None:  # over the limit: that epoch was streamed
                return
        if self.rows is None:
            yield from self._stream(batch_size, shuffle_seed)
            return
        rows = list(self.rows)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(rows)
        yield from (rows[i:i + batch_size] for i in range(0, len(rows), batch_size))

    def _stream(self, batch_size: int, shuffle_seed: int | None):
        shuffle = {} if shuffle_seed is None else {
            "local_shuffle_buffer_size": 8 * batch_size, "local_shuffle_seed": shuffle_seed}
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", **shuffle):
            yield batch.to_pylist()

    def _read_or_stream(self, batch_size: int, shuffle_seed: int | None):
        """Read the shard into ``self.rows`` without yielding; if it grows past ``keep_up_to``,
        yield what was read and stream the rest of this epoch instead (``self.rows`` stays None and
        ``keep_up_to`` drops to 0, so later epochs stream)."""
        stream = self._stream(batch_size, shuffle_seed)
        seen: list[dict] = []
        for rows in stream:
            seen.extend(rows)
            if len(seen) > self.keep_up_to:
                self.keep_up_to = 0
                yield from (seen[i:i + batch_size] for i in range(0, len(seen), batch_size))
                yield from stream
                return
        if seen and all(row.get("id") is not None for row in seen):
            seen.sort(key=lambda row: str(row["id"]))
        self.rows = seen


def shard_batches(shard: Any, batch_size: int, collate: Any, max_steps: int | None = None,
                  step_delay_s: float = 0.0, shuffle_seed: int | None = None):
    """Rows of a :class:`ShardRows`, a Ray Data shard, or a list of row dicts (evaluation, tests,
    benchmarks) as collated batches.

    ``shuffle_seed`` shuffles the epoch (a kept shard in full, a streamed one through a local buffer
    of 8 batches), with a different order per epoch when the caller passes ``seed + epoch``.
    """
    if isinstance(shard, list):
        chunks = (shard[i:i + batch_size] for i in range(0, len(shard), batch_size))
    else:
        rows = shard if isinstance(shard, ShardRows) else ShardRows(shard, keep_up_to=0)
        chunks = rows.chunks(batch_size, shuffle_seed)
    for step, rows in enumerate(chunks):
        if max_steps is not None and step >= max_steps:
            break
        yield collate(rows)
        if step_delay_s:
            time.sleep(step_delay_s)


def read_table(dataset_uri: str, split: str, storage_options: Any = None):
    """A split's table (``<split>.parquet`` or ``<split>/``), read with pyarrow in this process,
    in ``id`` order: a stage writes its part files in whatever order Ray Data finished them, and
    the training order (a seeded shuffle of this order) must not depend on that."""
    import pyarrow.parquet as pq

    from jobs._data import split_uri
    from tmr_core import storage

    uri = split_uri(dataset_uri, split, storage_options)
    if uri is None:
        raise FileNotFoundError(f"{dataset_uri}: no table for split '{split}' (<split>.parquet or <split>/)")
    fs, path = storage.resolve(uri, storage_options)
    table = pq.read_table(path, filesystem=fs)
    return table.sort_by("id") if "id" in table.column_names else table


def read_rows(dataset_uri: str, split: str, storage_options: Any = None, limit: int | None = None) -> list[dict]:
    """A split's table as row dicts, read with pyarrow in this process (driver-side evaluation:
    no Ray Data scheduling for a table that fits in memory)."""
    table = read_table(dataset_uri, split, storage_options)
    return (table.slice(0, limit) if limit else table).to_pylist()


def table_dataset(dataset_uri: str, split: str, storage_options: Any = None):
    """A split as a Ray Dataset whose blocks the driver read with pyarrow (``ray.data.from_arrow``).

    For tables that fit in the driver's memory (the extractor's stage tables hold URIs, not
    pixels): the dataset is materialized from the start, so no Ray Data read task (and no worker
    process to run it) is scheduled before training, on each submission.
    """
    import ray

    return ray.data.from_arrow(read_table(dataset_uri, split, storage_options))


def dataset_rows(dataset: Any) -> list[dict]:
    """A whole (small) Ray dataset or shard as row dicts; evaluation splits go through this."""
    if isinstance(dataset, list):
        return dataset
    rows: list[dict] = []
    for batch in dataset.iter_batches(batch_size=256, batch_format="pyarrow"):
        rows.extend(batch.to_pylist())
    return rows


def save_outputs(cfg: Any, model: Any, metrics: dict) -> str:
    """Write a job's final ``<output>/model``, ``metrics.json`` and ``config.yaml``; returns the model dir."""
    import json

    from jobs._config import save_config
    from tmr_core import storage

    options = cfg.storage.options()
    model_dir = storage.join(cfg.output, "model")
    model.save_pretrained(model_dir, options)
    storage.write_text_atomic(storage.join(cfg.output, "metrics.json"), json.dumps(metrics, indent=2), options)
    save_config(cfg, cfg.output, options=options)
    return model_dir
