"""MLflow tracking for the training jobs: one run per training job, reused across restarts.

The driver opens (or finds) the run before ``TorchTrainer.fit`` and passes its id to the workers;
rank 0 logs per-epoch metrics into that id with an ``MlflowClient``. The id is also written to
``<run storage folder>/mlflow_run.json``, so a restarted worker group *and* a resubmitted job with
the same run name and storage path keep logging into the same MLflow run (no duplicate runs, a
known Ray pain point). ``MLflowLoggerCallback`` is not used: Ray Train V2 rejects it.

Trained models are registered as plain artifacts (``config.json`` + ``model.safetensors``, the
:class:`tmr_core.modeling.PretrainedModule` format) under the names ``tmr-ner``, ``tmr-re`` and
``tmr-mde`` with an alias such as ``champion``; :func:`resolve_model_uri` turns
``models:/tmr-ner@champion`` back into a local folder that ``from_pretrained`` loads, so loading
never unpickles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs._config import opt

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_PREFIX = "sqlite:///"
RUN_ID_FILE = "mlflow_run.json"
MODEL_ARTIFACT_PATH = "model"
_MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value
_MAX_BATCH = 100  # MLflow's limit on params/metrics per log_batch call


@dataclass
class TrackingConfig:
    """Where and how a training job logs to MLflow."""

    enabled: bool = opt(True, "Log params, metrics, artifacts and the model to MLflow.")
    tracking_uri: str | None = opt(
        None, "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir."
    )
    experiment: str | None = opt(None, "Experiment name; null: one per task (tmr-ner, tmr-re, tmr-mde).")
    run_name: str | None = opt(None, "MLflow run name; null: <task>/<dataset>/<ablation>[/frac<f>][/seed<s>].")
    register_as: str | None = opt(
        None, "Register the best model under this name (tmr-ner|tmr-re|tmr-mde); null: do not register."
    )
    alias: str = opt("champion", "Alias the registered version gets, so servers load models:/<name>@<alias>.")
    log_checkpoint: bool = opt(True, "Log the best checkpoint folder as run artifacts.")


# --------------------------------------------------------------------------- URIs and names


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, then ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``.

    A relative sqlite path is made absolute, because Ray Train workers run in another working
    directory than the driver.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        uri = SQLITE_PREFIX + str(Path(uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def default_run_name(task: str, dataset: str, ablation: str, train_fraction: float = 1.0,
                     seed: int | None = None) -> str:
    """``ner/twitter2017/full``, ``re/mnre/text_only/frac0.1/seed2``: what ran, readable in the UI."""
    parts = [task, dataset, ablation]
    if train_fraction < 1.0:
        parts.append(f"frac{train_fraction:g}")
    if seed is not None:
        parts.append(f"seed{seed}")
    return "/".join(parts)


def git_commit(repo: str | Path | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or None outside git."""
    cwd = str(repo or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config dict as dotted MLflow params (values cut to MLflow's length limit)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, dotted + "."))
        else:
            flat[dotted] = str(value)[:_MAX_PARAM_VALUE]
    return flat


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# --------------------------------------------------------------------------- runs


def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    run_folder: str,
    storage_options: Any = None,
) -> str:
    """The MLflow run id for this training run: the one recorded in ``run_folder``, else a new run.

    Args:
        run_folder: the Ray Train run's storage folder (``<storage_path>/<name>``), local or s3://.
            ``mlflow_run.json`` there records the id, so restarts and resubmissions reuse it.
        params: the full resolved config (nested dict), logged as dotted params on a new run.
    """
    from tmr_core import storage

    client = _client(tracking_uri)
    marker = storage.join(run_folder, RUN_ID_FILE)
    if storage.exists(marker, storage_options):
        recorded = json.loads(storage.read_bytes(marker, storage_options))
        if recorded.get("tracking_uri") == tracking_uri:
            from mlflow.exceptions import MlflowException

            try:
                run = client.get_run(recorded["run_id"])
            except MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                client.update_run(run.info.run_id, status="RUNNING")
                client.set_tag(run.info.run_id, "tmr.resumed", "true")
                return run.info.run_id
    experiment_id = ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, "tmr.run_folder": run_folder})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(items), _MAX_BATCH):
        client.log_batch(run.info.run_id, params=items[start:start + _MAX_BATCH])
    storage.write_text_atomic(
        marker, json.dumps({"run_id": run.info.run_id, "tracking_uri": tracking_uri}), storage_options
    )
    return run.info.run_id


def start_new_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any],
                  tags: dict[str, str] | None = None) -> str:
    """A fresh run (for one-off jobs such as ``compare_runs``) with the config as params."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    run = client.create_run(ensure_experiment(client, experiment), run_name=run_name,
                            tags={"mlflow.source.git.commit": git_commit() or "unknown", **(tags or {})})
    items = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(items), _MAX_BATCH):
        client.log_batch(run.info.run_id, params=items[start:start + _MAX_BATCH])
    return run.info.run_id


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id, created (or restored) when needed. Another process may create it
    between the look-up and the creation (run_pipeline's parallel stages share experiments)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location_beside(str(client.tracking_uri), name))
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def artifact_location_beside(tracking_uri: str, experiment: str) -> str | None:
    """``<database folder>/mlruns/<experiment>`` for a local sqlite store, None for any other.

    MLflow would put a new experiment's artifacts under ``./mlruns`` of whichever directory the
    creating process runs in, wherever the database is; beside the database, a store and its
    artifacts stay together (a test's temporary store, a pipeline's own ``--tracking_uri``)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    database = Path(tracking_uri[len(SQLITE_PREFIX):]).resolve()
    return (database.parent / "mlruns" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def prepare_store(tracking_uri: str | None = None) -> None:
    """Create the tracking store's tables now (a new sqlite file), so processes that start at
    once (run_pipeline's parallel stages) never race to create them."""
    _client(resolve_tracking_uri(tracking_uri)).search_experiments(max_results=1)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics (non-numbers are skipped) at ``step`` in one batch per 100."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(key, float(value), now, step or 0)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    client = _client(tracking_uri)
    for start in range(0, len(items), _MAX_BATCH):
        client.log_batch(run_id, metrics=items[start:start + _MAX_BATCH])


def log_artifacts(tracking_uri: str, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    """Upload a file or folder as run artifacts."""
    client = _client(tracking_uri)
    if os.path.isdir(local_path):
        client.log_artifacts(run_id, local_path, artifact_path)
    else:
        client.log_artifact(run_id, local_path, artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- model registry


def register_model(
    tracking_uri: str, run_id: str, model_dir: str, name: str, alias: str = "champion",
    tags: dict[str, str] | None = None, required_files: tuple[str, ...] | None = None,
) -> str:
    """Log ``model_dir`` as the run's ``model`` artifacts (``model-2``
    and so on when the run already registered one) and
    register it as a new version of ``name`` carrying ``alias``; returns the version number.

    Args:
        required_files: files ``model_dir`` must hold; None: config.json + model.safetensors
            (a ``save_pretrained`` folder); a diffusers pipeline passes ``("model_index.json",)``.

    Raises:
        FileNotFoundError: ``model_dir`` lacks one of ``required_files``.
    """
    from tmr_core.modeling import CONFIG_NAME, WEIGHTS_NAME

    for file_name in required_files or (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(model_dir, file_name)):
            raise FileNotFoundError(f"{model_dir}: missing {file_name}; register a save_pretrained folder")
    client = _client(tracking_uri)
    # A version's source must never be overwritten: a second registration from the same run
    # (a resubmitted job) goes to model-2/, model-3/, …
    taken = {os.path.basename(a.path) for a in client.list_artifacts(run_id)}
    artifact_path = next(p for p in (MODEL_ARTIFACT_PATH, *(f"{MODEL_ARTIFACT_PATH}-{k}" for k in range(2, 10**6)))
                         if p not in taken)
    client.log_artifacts(run_id, model_dir, artifact_path)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def resolve_model_uri(uri: str, dst_dir: str | None = None, tracking_uri: str | None = None) -> str:
    """A model location as something ``from_pretrained`` loads.

    ``models:/tmr-ner@champion``, ``models:/tmr-ner/3`` and ``runs:/<id>/model`` are downloaded
    (to ``dst_dir`` or a fresh temp folder) and the local folder is returned; a local path or an
    ``s3://`` URI is returned unchanged (``from_pretrained`` reads those itself).
    """
    if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return uri
    import mlflow

    dst_dir = dst_dir or tempfile.mkdtemp(prefix="tmr-model-")
    return mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=dst_dir, tracking_uri=resolve_tracking_uri(tracking_uri)
    )


def log_final_outputs(cfg: Any, tracking_uri: str, run_id: str, model: Any, model_dir: str, metrics: dict,
                      step: int, tags: dict[str, str], job: str) -> None:
    """Log a training job's final metrics, config and model, register it if asked, and close the run."""

    from jobs._config import save_config
    from tmr_core import storage

    log_metrics(tracking_uri, run_id, metrics, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, tmp)
        with open(os.path.join(tmp, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        log_artifacts(tracking_uri, run_id, tmp, "outputs")
        local_model = model_dir
        if (cfg.tracking.log_checkpoint or cfg.tracking.register_as) and storage.is_remote(model_dir):
            local_model = os.path.join(tmp, "model")  # the registry needs the files locally
            model.save_pretrained(local_model)
        if cfg.tracking.register_as:
            version = register_model(tracking_uri, run_id, local_model, cfg.tracking.register_as,
                                     cfg.tracking.alias, tags=tags)
            print(f"[{job}] registered models:/{cfg.tracking.register_as}@{cfg.tracking.alias} (v{version})",
                  flush=True)
        elif cfg.tracking.log_checkpoint:
            log_artifacts(tracking_uri, run_id, local_model, "model")
    finish_run(tracking_uri, run_id)
