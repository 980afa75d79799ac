"""Read a TMR dataset into one Parquet table per split: ``<output>/{train,valid,test}.parquet``.

    python -m jobs.prepare_dataset --format twitter2017 --data_dir data/twitter2017 \
        --image_dir data/twitter2017_images --output s3://bucket/tmr/twitter2017

Formats: Twitter-2015 and Twitter-2017 (NER), MNRE (RE), the synthetic benchmark
(``--format synthetic --task ner|re``), and your own annotated data (``--format jsonl``:
``<data_dir>/{train,valid,test}.jsonl``, see ``tmr_core.readers.read_jsonl``). The rows
follow ``tmr_core.schema.base_schema``; every later stage adds columns to these tables. No Ray
is needed: reading text files is quick, and the heavy per-sample work starts in the next stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from jobs._common import StorageConfig
from jobs._config import ConfigError, config_to_dict, opt, parse_config, print_config, run_main, save_config
from jobs._data import file_infos, retire_success_marker, write_success_marker


@dataclass
class Config:
    """Read Twitter-2015/2017, MNRE, the synthetic benchmark or your own JSONL into Parquet tables, one per split."""

    format: Literal["twitter2015", "twitter2017", "mnre", "synthetic", "jsonl"] = opt(
        "synthetic", "Dataset file format: twitter2015|twitter2017 (NER), mnre (RE), synthetic (both), jsonl (your own, either)."
    )
    task: Literal["ner", "re"] | None = opt(
        None, "ner|re; required for --format synthetic, implied by the real formats, for jsonl read from the first row."
    )
    data_dir: str = opt("outputs/benchmark", "Folder with the dataset's text files.")
    image_dir: str | None = opt(
        None, "Folder (or s3:// URI) with the images; null: <data_dir>/images (synthetic) or <data_dir> (jsonl)."
    )
    output: str = opt("outputs/dataset", "Local folder or s3://bucket/prefix for <split>.parquet and config.yaml.")
    splits: list[Literal["train", "valid", "test"]] = opt(
        ["train", "valid", "test"], "Splits to read (MNRE's ours_val and Twitter-2015's val.txt are 'valid')."
    )
    on_missing_image: Literal["error", "skip", "keep"] = opt(
        "error", "A missing or unreadable image: error, skip the sample, or keep it with a null image_uri."
    )
    allow_cross_split_duplicates: bool = opt(
        False, "Write a sample id found in two splits (a train/test leak) instead of stopping; reported either way."
    )
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")


def check_config(cfg: Config) -> None:
    """Reject option combinations that cannot work, all at once, named as the user types them."""
    problems = []
    if cfg.format == "synthetic" and cfg.task is None:
        problems.append("--task: --format synthetic holds both tasks; pass --task ner or --task re")
    real_task = {"twitter2015": "ner", "twitter2017": "ner", "mnre": "re"}.get(cfg.format)
    if real_task and cfg.task not in (None, real_task):
        problems.append(f"--task {cfg.task}: --format {cfg.format} is a {real_task} dataset")
    if cfg.format not in ("synthetic", "jsonl") and not cfg.image_dir:
        problems.append(f"--image_dir: --format {cfg.format} needs the folder of its images")
    if not cfg.splits:
        problems.append("--splits: name at least one of train, valid, test")
    if problems:
        raise ConfigError(problems)


def write_split(rows: list[dict], task: str, uri: str, storage_options) -> None:
    """Write one split's rows as a Parquet file through the pyarrow filesystem of ``uri``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmr_core import storage
    from tmr_core.schema import base_schema

    table = pa.Table.from_pylist(rows, schema=base_schema(task))
    fs, path = storage.resolve(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)


def format_summary(stats_list: list, task: str) -> str:
    """Per split: rows read/written, entities per type (NER) or relations per label (RE), images."""
    what = "entities per type" if task == "ner" else "relations per label"
    lines = []
    for stats in stats_list:
        lines.append(
            f"  {stats.split}: {stats.rows_read} rows read, {stats.rows_written} written; images missing "
            f"{stats.images_missing}, corrupt {stats.images_corrupt}  ({stats.source})"
        )
        labels = ", ".join(f"{label} {count}" for label, count in sorted(stats.labels.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"      {what} ({sum(stats.labels.values())}): {labels or '-'}")
    return "\n".join(lines)


def check_cross_split_duplicates(tables: list[tuple[str, list[dict]]], stats_list: list, allow: bool) -> str:
    """Refuse (or, when ``allow``, describe) sample ids that two splits share.

    Returns the warning lines for the summary; empty when the splits are disjoint.

    Raises:
        DataFormatError: naming both split files, the count and a few ids, unless ``allow``.
    """
    from tmr_core.errors import DataFormatError
    from tmr_core.readers import cross_split_overlaps

    overlaps = cross_split_overlaps({split: [row["id"] for row in rows] for split, rows in tables})
    if not overlaps:
        return ""
    sources = {stats.split: stats.source for stats in stats_list}
    lines = [
        f"{len(o.ids)} sample id(s) in both '{o.first}' ({sources[o.first]}) and '{o.second}' ({sources[o.second]}), "
        f"e.g. {', '.join(repr(i) for i in o.ids[:5])}"
        for o in overlaps
    ]
    if not allow:
        first = overlaps[0]
        raise DataFormatError(
            sources[first.second], None, "; ".join(lines) + ". A sample in two splits leaks evaluation data into "
            "training: remove it from one file, or pass --allow_cross_split_duplicates true to keep it"
        )
    return "\n".join(f"  warning: {line} (kept: --allow_cross_split_duplicates)" for line in lines)


def input_fingerprint(cfg: Config) -> str:
    """What the tables were made from: the resolved config and every input file's size and mtime
    (data and images), so a corrected label file makes the next stages rerun."""
    options = cfg.storage.options()
    inputs = {"config": config_to_dict(cfg), "data": file_infos(cfg.data_dir, options),
              "images": file_infos(cfg.image_dir, options)}
    return "prepare_dataset:" + hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.prepare_dataset")
    check_config(cfg)
    from tmr_core import readers, storage

    if cfg.format == "jsonl" and cfg.task is None:
        cfg.task = readers.infer_jsonl_task(cfg.data_dir, cfg.splits[0])  # every other row must then agree
    task = cfg.task = readers.task_of(cfg.format, cfg.task)  # saved resolved, so a rerun needs no guess
    print_config(cfg, "prepare_dataset")
    options = cfg.storage.options()
    storage.check_writable(cfg.output, options)  # before any input is read
    all_stats = []
    # Read every split before writing any, so a malformed file leaves no half-written output.
    tables = []
    for split in cfg.splits:
        rows, stats = readers.rows_for_split(
            cfg.format, task, cfg.data_dir, cfg.image_dir, split, cfg.on_missing_image, options
        )
        tables.append((split, rows))
        all_stats.append(stats)
    overlap_warning = check_cross_split_duplicates(tables, all_stats, cfg.allow_cross_split_duplicates)
    # A rerun killed while rewriting the tables must leave no marker vouching for a mix of old and new.
    retire_success_marker(cfg.output, [split for split, _ in tables], options)
    for split, rows in tables:
        write_split(rows, task, storage.join(cfg.output, f"{split}.parquet"), options)
    config_uri = save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, {split: len(rows) for split, rows in tables}, input_fingerprint(cfg),
                         options=options)

    print(f"[prepare_dataset] {cfg.format} ({task}) -> {cfg.output}")
    print(format_summary(all_stats, task))
    if overlap_warning:
        print(overlap_warning)
    print(f"[prepare_dataset] wrote {sum(s.rows_written for s in all_stats)} rows in {len(tables)} table(s); config: {config_uri}")
    return 0


if __name__ == "__main__":
    run_main(main)
