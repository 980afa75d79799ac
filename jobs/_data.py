"""Ray Data table helpers shared by the stage jobs (and the training jobs that read their tables).

A dataset is a folder (local or ``s3://``) with one table per split: ``<uri>/<split>.parquet`` (one
file, as ``prepare_dataset`` writes it) or ``<uri>/<split>/`` (Parquet parts, as Ray Data writes
them). A stage reads each split present, adds its columns, and writes ``<output>/<split>/``, then
``config.yaml`` and, last, ``_SUCCESS.json`` with per-split row counts, its part files and a
fingerprint of its config and inputs; a stage whose marker matches is up to date and can be skipped.

A marker never describes files that are not there: before the first byte of an output changes,
``_INCOMPLETE.json`` is written and ``_SUCCESS.json`` retired, so a run killed or failed halfway
leaves a folder that no later run takes for a finished one. Readers that trust a marker (the
up-to-date check, a stage's or a training job's input identity) first check it against the files
on disk (a listing and the Parquet footers).

Stage UDFs may add private columns next to their real ones: ``_stat_<name>`` (numbers summed, or
strings counted per value, into the summary) and ``_drop`` (true: the row is left out; stages
set it only on training rows, e.g. ``on_missing_image: skip``). :func:`write_splits` aggregates and removes them before writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from jobs._config import config_to_dict, opt
from tmr_core import storage
from tmr_core.errors import TMRError
from tmr_core.schema import SPLITS, STAGE_FIELDS

SUCCESS_MARKER = "_SUCCESS.json"
INCOMPLETE_MARKER = "_INCOMPLETE.json"
STAT_PREFIX = "_stat_"
DROP_COLUMN = "_drop"
# Forwarded to Ray workers, which may have started before the driver's env was set.
_FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_EC2_METADATA_DISABLED",
)


class StageOutputError(TMRError):
    """A stage folder that cannot be trusted: an unfinished run, or a ``_SUCCESS.json`` that does
    not describe the tables on disk. The message names the folder, what differs and what to rerun."""


@dataclass
class ComputeConfig:
    """How a stage's model runs on the cluster: an autoscaling pool of actors, one model each."""

    min_actors: int = opt(1, "Smallest actor pool; the pool grows to max_actors as resources appear.")
    max_actors: int = opt(1, "Largest actor pool (one model copy per actor).")
    batch_size: int = opt(8, "Rows per batch handed to an actor (one model call).")
    num_cpus: float = opt(1.0, "CPUs each actor reserves.")
    num_gpus: float = opt(0.0, "GPUs (or units of accelerator_resource) each actor reserves.")
    accelerator_resource: str | None = opt(
        None, "Request num_gpus of this custom resource instead of GPUs (e.g. fake_gpu in tests)."
    )

    def __post_init__(self) -> None:
        problems = []
        if self.min_actors < 1:
            problems.append(f"compute.min_actors: must be ≥ 1, got {self.min_actors}")
        if self.max_actors < self.min_actors:
            problems.append(f"compute.max_actors ({self.max_actors}) must be ≥ compute.min_actors ({self.min_actors})")
        if self.batch_size < 1:
            problems.append(f"compute.batch_size: must be ≥ 1, got {self.batch_size}")
        if self.accelerator_resource is not None and self.num_gpus <= 0:
            problems.append("compute.accelerator_resource needs compute.num_gpus > 0 (units per actor)")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- Ray setup


def init_ray() -> None:
    """A bare ``ray.init()`` (local, or the cluster under ``ray job submit``), progress bars on."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = True


def worker_env(*uris: str | None) -> dict[str, Any]:
    """``{"runtime_env": ...}`` (a Ray Data remote argument) passing the driver's storage env vars
    on to Ray workers when any of ``uris`` is remote (workers may have started before the driver's
    credentials were set). Local-only stages get ``{}``: a runtime env costs a dedicated worker
    process."""
    if not any(u and storage.is_remote(u) for u in uris):
        return {}
    env = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def actor_pool_args(compute: ComputeConfig, *uris: str | None) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a model stage that reads/writes ``uris``.

    Ray Data's actor pool restarts a killed actor and retries its unfinished batch by default
    (``max_restarts=-1``, ``max_task_retries=-1``), so a preempted node or a killed process costs
    time, not rows (``tests/test_stage_reliability.py`` kills one).
    """
    import ray

    args: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
        "batch_size": compute.batch_size,
        "batch_format": "pyarrow",
        "num_cpus": compute.num_cpus,
        **worker_env(*uris),
    }
    if compute.accelerator_resource:
        args["resources"] = {compute.accelerator_resource: compute.num_gpus}
    elif compute.num_gpus:
        args["num_gpus"] = compute.num_gpus
    return args


# --------------------------------------------------------------------------- tables


def split_uri(dataset_uri: str, split: str, options: storage.StorageOptions | None = None) -> str | None:
    """Where a split's table is: ``<uri>/<split>.parquet`` or ``<uri>/<split>/``; None if absent."""
    for candidate in (storage.join(dataset_uri, f"{split}.parquet"), storage.join(dataset_uri, split)):
        if storage.exists(candidate, options):
            return candidate
    return None


def present_splits(dataset_uri: str, splits: list[str], options: storage.StorageOptions | None = None,
                   output: str | None = None) -> list[str]:
    """The requested splits that exist under ``dataset_uri``.

    Args:
        output: the stage's output, checked first (:func:`tmr_core.storage.check_writable`), so a
            read-only folder or an unreachable bucket fails before any input is read or computed.

    Raises:
        StageOutputError: ``output`` is the input folder.
        StorageError: ``output`` cannot be written.
        FileNotFoundError: when no split exists (the message names the folder and what was looked for).
    """
    if output is not None:
        if storage.resolve(output, options)[1] == storage.resolve(dataset_uri, options)[1]:
            raise StageOutputError(f"--output {output} is the --input folder: a stage writes a new folder "
                                   "(writing its splits would delete the input); choose another --output")
        storage.check_writable(output, options)
    found = [s for s in splits if split_uri(dataset_uri, s, options) is not None]
    if not found:
        raise FileNotFoundError(
            f"--input {dataset_uri}: no split table found (looked for <split>.parquet or <split>/ for "
            f"splits {list(splits)}); run the previous stage first"
        )
    return found


def read_split(dataset_uri: str, split: str, options: storage.StorageOptions | None = None) -> Any:
    """A split as a Ray Dataset (local path or ``s3://``)."""
    import ray

    uri = split_uri(dataset_uri, split, options)
    if uri is None:
        raise FileNotFoundError(f"{dataset_uri}: no table for split '{split}'")
    fs, path = storage.resolve(uri, options)
    _use_task_based_parquet_listing()
    return ray.data.read_parquet(path, filesystem=fs, **worker_env(uri))


def _use_task_based_parquet_listing() -> None:
    """Read Parquet through Ray Data's task-based (V1) datasource unless the user chose otherwise
    with ``RAY_DATA_USE_DATASOURCE_V2``.

    The V2 datasource lists a read by starting a pool of ``FooterReader`` actors to collect
    row-group statistics for predicate push-down. Stage tables are read whole, and on a small
    cluster those actors cost ~1 s per read (0.1 s with V1, measured on 2 cores) — a large part of
    a cached rerun.
    """
    import ray

    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ray.data.DataContext.get_current().use_datasource_v2 = False


def add_columns(batch: pa.Table, stage: str, values: dict[str, list]) -> pa.Table:
    """Append a stage's columns to a batch, typed exactly as ``tmr_core.schema.STAGE_FIELDS``.

    Private ``_stat_*`` / ``_drop`` columns may be passed too (types inferred).

    Raises:
        KeyError: a schema column of ``stage`` is missing from ``values``.
    """
    for field in STAGE_FIELDS[stage]:
        column = pa.array(values[field.name], type=field.type)
        batch = _set_column(batch, field.name, column)
    for name, column in values.items():
        if name.startswith(STAT_PREFIX) or name == DROP_COLUMN:
            batch = _set_column(batch, name, pa.array(column))
    return batch


def _set_column(batch: pa.Table, name: str, column: pa.Array) -> pa.Table:
    """Add a column, or replace it when a rerun reads a table that already has it."""
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, column)
    return batch.append_column(name, column)


def read_splits(dataset_uri: str, splits: list[str], options: storage.StorageOptions | None = None,
                rows_per_block: int | None = None) -> Any:
    """The union of the requested splits (each row keeps its ``split`` column), so one actor pool
    serves every split.

    Args:
        rows_per_block: re-block the rows (streaming, no shuffle) into blocks of at most this many
            rows. ``prepare_dataset`` writes one file per split, i.e. a single block: without this
            one actor would get the whole split, the pool could not grow, and a killed actor would
            redo all of it. Pass the stage's batch size.
    """
    import ray

    uris = []
    for split in splits:
        uri = split_uri(dataset_uri, split, options)
        if uri is None:
            raise FileNotFoundError(f"{dataset_uri}: no table for split '{split}'")
        uris.append(uri)
    fs, _ = storage.resolve(uris[0], options)
    # one read over every split's files, not a union of per-split reads: each read costs its own
    # listing and read tasks, and on a small cluster those queue behind the stage's actors
    paths = [storage.resolve(uri, options)[1] for uri in uris]
    _use_task_based_parquet_listing()
    ds = ray.data.read_parquet(paths, filesystem=fs, **worker_env(*uris))
    return ds.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else ds


def _is_private(name: str) -> bool:
    return name.startswith(STAT_PREFIX) or name == DROP_COLUMN


def _kept_rows_of_split(batch: pa.Table, split: str) -> pa.Table:
    """The batch's rows of ``split`` that are not dropped, without private columns."""
    import pyarrow.compute as pc

    keep = pc.equal(batch.column("split"), split)
    if DROP_COLUMN in batch.column_names:
        dropped = pc.fill_null(batch.column(DROP_COLUMN), False)
        if split != "train" and pc.any(pc.and_(keep, dropped)).as_py():
            # a stage may thin the training split only: valid/test must stay comparable
            raise ValueError(f"a stage dropped rows of split {split!r}; only training rows may be dropped")
        keep = pc.and_(keep, pc.invert(dropped))
    return batch.filter(keep).drop_columns([n for n in batch.column_names if _is_private(n)])


def _batch_report(table: pa.Table) -> dict[str, Any]:
    """Rows kept per split and the private stats of one written batch: numeric ``_stat_*`` columns
    summed, string ones counted per value (e.g. rows per node), ``_drop`` counted as ``dropped``."""
    private = [n for n in table.column_names if _is_private(n)]
    dropped = table.column(DROP_COLUMN).to_pylist() if DROP_COLUMN in private else [False] * table.num_rows
    rows: dict[str, int] = {}
    for split, drop in zip(table.column("split").to_pylist(), dropped, strict=True):
        rows[split] = rows.get(split, 0) + (0 if drop else 1)
    stats: dict[str, Any] = {}
    for name in private:
        values = table.column(name).to_pylist()
        key = "dropped" if name == DROP_COLUMN else name[len(STAT_PREFIX):]
        if pa.types.is_string(table.column(name).type):
            counts: dict[str, int] = {}
            for value in values:
                counts[str(value)] = counts.get(str(value), 0) + 1
            stats[key] = counts
        else:
            stats[key] = int(sum(int(v or 0) for v in values))
    return {"rows": rows, "stats": stats}


def _merge_reports(reports: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, Any]]:
    rows: dict[str, int] = {}
    stats: dict[str, Any] = {}
    for report in reports:
        for split, n in report["rows"].items():
            rows[split] = rows.get(split, 0) + n
        for key, value in report["stats"].items():
            if isinstance(value, dict):
                counts = stats.setdefault(key, {})
                for name, n in value.items():
                    counts[name] = counts.get(name, 0) + n
            else:
                stats[key] = stats.get(key, 0) + value
    return rows, stats


def _part_name(table: pa.Table) -> str:
    """A file name fixed by the rows it holds: a retried write task replaces its own file instead
    of adding a second copy of the same rows."""
    digest = hashlib.sha1("\x1f".join(map(str, table.column("id").to_pylist())).encode("utf-8")).hexdigest()
    return f"part-{digest[:20]}.parquet"


def _make_split_sink(output_uri: str, splits: list[str], options: storage.StorageOptions | None,
                     min_rows_per_file: int) -> Any:
    """A Ray Data ``Datasink`` writing a stage's rows to ``<output>/<split>/part-*.parquet`` and its
    stats to the driver, in the stage's own streaming pass (built here so importing this module
    does not import Ray)."""
    import io

    import pyarrow.parquet as pq
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class SplitTableSink(Datasink):
        def __init__(self) -> None:
            self.reports: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return min_rows_per_file

        def get_name(self) -> str:
            return "SplitParquet"

        def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
            tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"rows": {}, "stats": {}}
            table = pa.concat_tables(tables, promote_options="default")
            name = _part_name(table)
            for split in splits:
                part = _kept_rows_of_split(table, split)
                if part.num_rows:
                    buffer = io.BytesIO()
                    pq.write_table(part, buffer)
                    storage.write_bytes_atomic(storage.join(output_uri, split, name), buffer.getvalue(), options)
            return _batch_report(table)

        def on_write_complete(self, write_result: Any) -> None:
            self.reports = list(write_result.write_returns)

    return SplitTableSink()


def write_splits(ds: Any, output_uri: str, splits: list[str], options: storage.StorageOptions | None = None,
                 min_rows_per_file: int = 4096) -> tuple[dict[str, int], dict[str, Any]]:
    """Run a stage's dataset once, streaming: each split's rows go to ``<output>/<split>/`` (an
    older copy is removed first, see :func:`begin_output`) and the private ``_stat_*``/``_drop``
    columns are aggregated on the way, without a second pass over the data. The folder stays
    marked unfinished until the stage calls :func:`write_success_marker`.

    Returns:
        (rows written per split, stats).

    Raises:
        StorageError: a part file could not be written (one line, not a worker's traceback).
    """
    begin_output(output_uri, splits, options)
    sink = _make_split_sink(output_uri, splits, options, min_rows_per_file)
    try:
        ds.write_datasink(sink, ray_remote_args=worker_env(output_uri) or None)
    except Exception as exc:
        cause = _storage_error_in(exc)
        if cause is not None:
            # the instance Ray hands back carries its retry advice after the first line
            raise storage.StorageError(str(cause).splitlines()[0]) from None
        raise
    rows, stats = _merge_reports(sink.reports)
    for split in splits:
        rows.setdefault(split, 0)
    return rows, stats


def retire_success_marker(output_uri: str, splits: list[str], options: storage.StorageOptions | None = None) -> None:
    """Write ``_INCOMPLETE.json``, then remove ``_SUCCESS.json``: from here until
    :func:`write_success_marker`, no marker vouches for the folder."""
    progress = {"started_at": time.time(), "splits": list(splits)}
    storage.write_text_atomic(storage.join(output_uri, INCOMPLETE_MARKER), json.dumps(progress), options)
    storage.remove(storage.join(output_uri, SUCCESS_MARKER), options)


def begin_output(output_uri: str, splits: list[str], options: storage.StorageOptions | None = None) -> None:
    """Mark ``output_uri`` unfinished, then retire its ``_SUCCESS.json``, then empty the split
    tables, in that order: a run killed anywhere from here on leaves ``_INCOMPLETE.json`` and no
    success marker, so neither a rerun (not up to date) nor the next stage (an error) takes the
    partial folder for a finished one."""
    retire_success_marker(output_uri, splits, options)
    # every split, not only this run's: a split left by an older run with more --splits would be
    # read as part of this output by the next stage
    for split in sorted(set(splits) | set(SPLITS)):
        storage.remove(storage.join(output_uri, f"{split}.parquet"), options)  # would shadow <split>/
        storage.remove(storage.join(output_uri, split), options)
    for split in splits:
        storage.makedirs(storage.join(output_uri, split), options)


def _storage_error_in(exc: BaseException) -> BaseException | None:
    """The :class:`~tmr_core.storage.StorageError` a Ray write task raised, found through the
    wrappers Ray and Ray Data put around it (exception chain, ``RayTaskError.cause``)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) is storage.StorageError:  # not Ray's subclass, whose text is a traceback
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


# --------------------------------------------------------------------------- markers


def fingerprint(job: str, cfg: Any, input_uri: str, splits: list[str],
                options: storage.StorageOptions | None = None, ignore: tuple[str, ...] = ("force",),
                extra: Any = None) -> str:
    """sha256 of the job, its resolved config (minus ``ignore``), its inputs' identity and ``extra``
    (e.g. :func:`file_infos` of a model checkpoint the config names by path).

    The input's identity is its own ``_SUCCESS.json`` when it has one, else the size and mtime of
    each split's files.
    """
    config = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    inputs = input_identity(input_uri, splits, options)
    blob = json.dumps({"job": job, "config": config, "inputs": inputs, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def input_identity(input_uri: str, splits: list[str], options: storage.StorageOptions | None = None) -> Any:
    """What identifies a dataset's content: its ``_SUCCESS.json`` fingerprint and row counts when
    it has one, else the size and mtime of each split's files.

    Raises:
        StageOutputError: the folder is an unfinished stage run, or its marker does not describe
            the files of ``splits`` on disk (:func:`check_marker`): a marker is trusted only then.
    """
    marker = check_marker(input_uri, splits, options)
    if marker is not None:
        return {"fingerprint": marker.get("fingerprint"), "rows": marker.get("rows")}
    return {split: file_infos(split_uri(input_uri, split, options), options) for split in splits}


def file_infos(uri: str | None, options: storage.StorageOptions | None = None) -> list:
    """(path, size, mtime) of a file or of every file under a folder; [] when absent."""
    import pyarrow.fs as pafs

    if uri is None:
        return []
    fs, path = storage.resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    else:
        infos = [info]
    return sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)


def write_success_marker(output_uri: str, rows: dict[str, int], fingerprint_: str,
                         summary: dict | None = None, options: storage.StorageOptions | None = None) -> str:
    """Write ``_SUCCESS.json`` last: its presence means every split and the config are complete.

    It records each split's part files and their row counts as found on disk, so readers can
    check it later; then ``_INCOMPLETE.json`` goes.

    Raises:
        StageOutputError: the files on disk do not hold the rows the stage counted (e.g. a
            duplicated part): no marker is written.
    """
    files = {split: parquet_files(output_uri, split, options) for split in rows}
    on_disk = {split: sum(parts.values()) for split, parts in files.items()}
    if on_disk != dict(rows):
        raise StageOutputError(f"{output_uri}: the stage counted rows {dict(rows)} but its files hold {on_disk}; "
                               "no _SUCCESS.json written, rerun the stage")
    uri = storage.join(output_uri, SUCCESS_MARKER)
    payload = {"fingerprint": fingerprint_, "rows": rows, "files": files, "summary": summary or {},
               "finished_at": time.time()}
    storage.write_text_atomic(uri, json.dumps(payload, indent=2, sort_keys=True, default=str), options)
    storage.remove(storage.join(output_uri, INCOMPLETE_MARKER), options)
    return uri


def read_success_marker(output_uri: str, options: storage.StorageOptions | None = None) -> dict | None:
    uri = storage.join(output_uri, SUCCESS_MARKER)
    if not storage.exists(uri, options):
        return None
    try:
        return json.loads(storage.read_bytes(uri, options))
    except ValueError:
        return None  # a marker that does not parse is no marker


def is_up_to_date(output_uri: str, fingerprint_: str, options: storage.StorageOptions | None = None) -> bool:
    """True when ``output_uri`` holds a finished run with this exact config and input, and its
    marker still describes the files on disk (else the stage reruns, saying why)."""
    marker = read_success_marker(output_uri, options)
    if marker is None or marker.get("fingerprint") != fingerprint_:
        return False
    differences = marker_differences(output_uri, marker, list(marker.get("rows") or {}), options)
    if differences:
        print(f"[{output_uri}] {SUCCESS_MARKER} does not match the files on disk ({'; '.join(differences)}); "
              "running the stage again")
        return False
    return True


def parquet_files(dataset_uri: str, split: str, options: storage.StorageOptions | None = None) -> dict[str, int]:
    """A split's Parquet files (path relative to ``dataset_uri``) and their row counts, from a
    listing and the files' footers (no data read); {} when the split is absent."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    uri = split_uri(dataset_uri, split, options)
    if uri is None:
        return {}
    fs, root = storage.resolve(dataset_uri, options)
    _, path = storage.resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    else:
        infos = [info]
    counts = {}
    for item in infos:
        if item.type == pafs.FileType.File and item.path.endswith(".parquet"):
            with fs.open_input_file(item.path) as handle:
                counts[posixpath.relpath(item.path, root)] = pq.ParquetFile(handle).metadata.num_rows
    return dict(sorted(counts.items()))


def marker_differences(dataset_uri: str, marker: dict, splits: list[str],
                       options: storage.StorageOptions | None = None) -> list[str]:
    """How the files of ``splits`` on disk differ from what ``marker`` says (row counts, and the
    part files when the marker lists them); [] when they agree."""
    differences = []
    listed_rows, listed_files = marker.get("rows") or {}, marker.get("files") or {}
    for split in splits:
        parts = parquet_files(dataset_uri, split, options)
        if split not in listed_rows:
            if parts:
                differences.append(f"split '{split}' is on disk but not in the marker (left by an older run?)")
            continue
        if sum(parts.values()) != listed_rows[split]:
            differences.append(f"split '{split}': marker says {listed_rows[split]} rows, files hold {sum(parts.values())}")
        if split in listed_files:
            missing = sorted(set(listed_files[split]) - set(parts))
            extra = sorted(set(parts) - set(listed_files[split]))
            if missing:
                differences.append(f"split '{split}': {len(missing)} listed file(s) missing, e.g. {missing[0]}")
            if extra:
                differences.append(f"split '{split}': {len(extra)} file(s) not in the marker, e.g. {extra[0]}")
    return differences


def check_marker(dataset_uri: str, splits: list[str], options: storage.StorageOptions | None = None) -> dict | None:
    """The folder's ``_SUCCESS.json`` once checked against the files of ``splits`` on disk; None
    for a folder without markers (e.g. ``prepare_dataset``'s tables or the user's own).

    Raises:
        StageOutputError: the folder holds an unfinished run (``_INCOMPLETE.json``, no success
            marker) or a marker that does not describe its files; the message says what differs
            and to rerun the stage that writes the folder.
    """
    marker = read_success_marker(dataset_uri, options)
    if marker is None:
        if storage.exists(storage.join(dataset_uri, INCOMPLETE_MARKER), options):
            raise StageOutputError(
                f"{dataset_uri}: a stage run writing this folder did not finish (killed or failed; "
                f"{INCOMPLETE_MARKER} is there, {SUCCESS_MARKER} is not); rerun the stage that writes it"
            )
        return None
    differences = marker_differences(dataset_uri, marker, splits, options)
    if differences:
        raise StageOutputError(
            f"{dataset_uri}/{SUCCESS_MARKER} does not describe the files on disk: {'; '.join(differences)}; "
            "rerun the stage that writes this folder (--force true)"
        )
    return marker
