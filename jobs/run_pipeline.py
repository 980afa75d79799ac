"""The whole TMR suite as one job: benchmark → prepare → phrases → back-translator fine-tuning →
back-translation → grounder fine-tuning → grounding → MDE pretraining → divergence → mechanism
probes → NER and RE fine-tuning (full and text-only) → registry → comparison.

    python -m jobs.run_pipeline --config configs/pipeline.tiny.yaml
    python -m jobs.run_pipeline --config configs/pipeline.tiny.yaml --workdir outputs/other --tasks [ner]

Each stage is an ordinary job (``jobs.<name>.main(argv)``) run in this process, so they share one
Ray session. A stage is skipped when its marker in ``<workdir>/.pipeline/`` holds the same
fingerprint (job, arguments, config file contents and the fingerprints of the stages it reads)
and its output still holds the rows per split the marker recorded: rerunning a finished pipeline
does nothing costly, and after a crash the next run resumes from the first unfinished stage (a
stage's marker is removed before it runs). ``--force`` reruns a stage through its own ``--force``.

After each table stage one line gives its rows per split; a stage that changes the valid or test
row count stops the pipeline (only training rows may be dropped, e.g. ``on_missing_image: skip``),
so every model is evaluated on the same samples.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from jobs._config import cli_keys, opt, parse_config, print_config, run_main, save_config
from tmr_core.errors import TMRError
from tmr_core.schema import SPLITS

TASKS = ("ner", "re")
EVALUATION_SPLITS = ("valid", "test")  # a stage may drop training rows, never these


class RowCountError(TMRError):
    """A stage changed the number of valid or test rows its input had."""


@dataclass
class Config:
    """Run every TMR stage in order, skipping those whose outputs are up to date."""

    workdir: str = opt("outputs/pipeline", "Folder for every stage's outputs and the pipeline's markers.")
    tasks: list[Literal["ner", "re"]] = opt(["ner", "re"], "Tasks to run end to end.")
    source: Literal["synthetic", "twitter2015", "twitter2017", "mnre", "jsonl"] = opt(
        "synthetic", "Dataset: synthetic (make_synthetic_benchmark writes it), a real one read from data_dir, or "
        "jsonl: your own annotations (README, \"Train on your own data\")."
    )
    data_dir: str | None = opt(None, "Real datasets: folder of the text files (train.txt …, ours_*.txt).")
    image_dir: str | None = opt(None, "Real datasets: folder of the images.")
    mde_corpus: str | None = opt(
        None, "Real datasets: caption-image-label corpus for pretrain_mde; null: the synthetic benchmark's."
    )
    configs: Literal["tiny", "default", "paper"] = opt(
        "tiny", "Job configs: tiny → configs/<job>.tiny.yaml; default → configs/<job>.yaml; "
        "paper → configs/paper/<job>[.<dataset>].yaml, else configs/<job>.yaml."
    )
    models_dir: str | None = opt(
        ".cache/tmr-models", "Tiny models folder (built by make_tiny_models); null: the job configs name the models."
    )
    phrase_parser: Literal["stanza", "tiny"] | None = opt(
        None, "extract_phrases' parser for real or your own data (null: stanza, the paper's); the synthetic "
        "benchmark always uses its gold trees. tiny: offline heuristic, no stanza models needed."
    )
    text_only_baseline: bool = opt(True, "Also fine-tune the text-only ablation, for the full vs text-only summary.")
    compare: bool = opt(True, "Build the comparison tables (compare_runs) at the end.")
    tracking_uri: str | None = opt(None, "MLflow tracking URI for every job; null: MLFLOW_TRACKING_URI or sqlite:///mlflow.db.")
    force: list[str] = opt([], "Stage ids to rerun even when up to date (e.g. [finetune_extractor.ner.full]); [all]: every stage.")
    stop_after: str | None = opt(None, "Stop after this stage id (inclusive); null: run everything.")
    train_back_translator: bool | None = opt(
        None, "Fine-tune the text-to-image model on the training pairs (finetune_text_to_image) and back-translate "
        "with it; null: on for synthetic data (its tiny pipeline starts random), off for real data."
    )
    back_translators: Literal["per_task", "shared"] = opt(
        "shared", "per_task: one back-translator per task, each fine-tuned on its own task's pairs "
        "(finetune_text_to_image.<task>, configs/finetune_text_to_image[.re].<configs>.yaml, registered as "
        "tmr-t2i-<task>): the tiny model holds NER's one object or RE's head | tail panels, not both. "
        "shared: one, on the pairs of back_translator_tasks (the paper's single Stable Diffusion)."
    )
    back_translator_tasks: list[Literal["ner", "re"]] | None = opt(
        None, "back_translators: shared only: tasks whose training pairs fine-tune it (of those in --tasks; null or "
        "none left: all of them)."
    )
    train_grounder: bool | None = opt(
        None, "Fine-tune the detector on the benchmark's boxes (finetune_grounder) and ground with it; "
        "needs ground-truth boxes, so synthetic data only; null: on for synthetic data."
    )
    parallel_stages: int = opt(
        1, "Training stages (back-translator, grounder, MDE, extractors) that may run at once, each in its own "
        "process joined to this Ray session, beside the table stages, its output in <workdir>/logs/<stage>.log; "
        "1: one stage at a time, in the plan's order."
    )
    stage_threads: int | None = opt(
        None, "torch threads (OMP_NUM_THREADS) of each training stage run in its own process, for jobs in local mode "
        "(ray.num_workers: 0, the tiny configs); Ray Train workers get theirs from Ray; null: torch's default."
    )
    stage_logs: bool = opt(
        False, "Write each stage's output to <workdir>/logs/<stage>.log and print one line per stage."
    )
    critical_path_first: bool = opt(
        True, "With parallel_stages > 1: ready stages are taken longest chain of dependent stages first, and a "
        "training stage in its own process runs at the CPU priority (nice) of Ray's workers, where the table stages "
        "compute, lowered a step per level its chain is shorter, so on a machine with few cores the stages the end "
        "waits on get them (training in local mode, as the tiny configs; Ray Train workers keep Ray's priority)."
    )
    stage_weights: dict[str, float] = opt(
        {}, "With critical_path_first: how long a stage runs relative to the others (by stage id or job; "
        "default 1), so the chain the end waits on longest is taken first (e.g. {finetune_text_to_image.re: 2}: "
        "RE's back-translator trains twice NER's steps)."
    )
    job_args: dict[str, list[str]] = opt(
        {}, "Extra --key value arguments per job, after the pipeline's own (e.g. {finetune_extractor: [--optim.epochs, '2']}); "
        "one the pipeline sets is an error, but for the back-translators' --tracking.register_as (null: register none)."
    )


@dataclass
class Stage:
    """One job invocation of the pipeline."""

    id: str
    job: str
    argv: list[str]
    output: str
    needs: list[str] = field(default_factory=list)
    summary: str = "table"  # table: count rows under `output`; metrics: read <output>/metrics.json


def _job_config(cfg: Config, job: str, variant: str = "") -> str:
    """The config file a stage runs with (see ``Config.configs``)."""
    stems = [f"{job}.{variant}", job] if variant else [job]
    if cfg.configs == "tiny":
        candidates = [os.path.join("configs", stem + ".tiny.yaml") for stem in stems]
    elif cfg.configs == "paper":
        candidates = [os.path.join("configs", "paper", f"{job}.{cfg.source}.yaml"),
                      os.path.join("configs", "paper", f"{job}.yaml"), os.path.join("configs", f"{job}.yaml")]
    else:
        candidates = [os.path.join("configs", stem + ".yaml") for stem in stems]
    # a variant (e.g. RE's) without a file of its own runs the job's config
    return next((path for path in candidates if os.path.isfile(path)), candidates[-1])


PIPELINE_JOBS = frozenset({"make_tiny_models", "make_synthetic_benchmark", "prepare_dataset", "extract_phrases",
                           "finetune_text_to_image", "generate_back_translations", "finetune_grounder",
                           "ground_phrases", "pretrain_mde", "score_divergence", "finetune_extractor",
                           "probe_mechanisms", "compare_runs"})


def trains_back_translator(cfg: Config) -> bool:
    return cfg.source == "synthetic" if cfg.train_back_translator is None else cfg.train_back_translator


def trains_grounder(cfg: Config) -> bool:
    return cfg.source == "synthetic" if cfg.train_grounder is None else cfg.train_grounder


def check_config(cfg: Config) -> None:
    """Reject combinations that cannot run, naming the flags as typed."""
    from jobs._config import ConfigError

    problems = []
    if cfg.parallel_stages < 1:
        problems.append(f"--parallel_stages: expected >= 1, got {cfg.parallel_stages}")
    bad_weights = {k: v for k, v in cfg.stage_weights.items() if not v > 0}
    if bad_weights:
        problems.append(f"--stage_weights: expected > 0, got {bad_weights}")
    # a stage id the plan lacks is fine (--tasks [ner] has no finetune_text_to_image.re); its job and task must exist
    unknown = sorted(k for k in cfg.stage_weights
                     if k.split(".")[0] not in PIPELINE_JOBS or (k.count(".") and k.split(".")[1] not in TASKS))
    if unknown:
        problems.append(f"--stage_weights: {unknown} name no stage of the pipeline (a job, or <job>.<task>[.<ablation>]; "
                        f"jobs: {sorted(PIPELINE_JOBS)}; tasks: {list(TASKS)})")
    if cfg.back_translators == "per_task" and cfg.back_translator_tasks is not None:
        problems.append("--back_translator_tasks: only for --back_translators shared (per_task trains each task's "
                        "back-translator on that task's pairs); set it to null")
    if cfg.stage_threads is not None and cfg.stage_threads < 1:
        problems.append(f"--stage_threads: expected >= 1 or null, got {cfg.stage_threads}")
    unknown = sorted(set(cfg.job_args) - PIPELINE_JOBS)
    if unknown:
        problems.append(f"--job_args: {unknown} are not jobs of the pipeline (one of {sorted(PIPELINE_JOBS)})")
    if cfg.source != "synthetic":
        if not cfg.data_dir:
            problems.append(f"--source {cfg.source} needs --data_dir (the dataset's text files)")
        if not cfg.mde_corpus:
            problems.append(f"--source {cfg.source} needs --mde_corpus (caption, image_uri, label table)")
        task = {"mnre": "re", "jsonl": cfg.tasks[0] if len(cfg.tasks) == 1 else None}.get(cfg.source, "ner")
        if task is None:
            problems.append("--source jsonl holds one task: set --tasks [ner] or --tasks [re]")
        elif list(cfg.tasks) != [task]:
            problems.append(f"--source {cfg.source} is a {task} dataset: set --tasks [{task}]")
        if cfg.train_grounder:
            problems.append(f"--train_grounder needs ground-truth boxes, which --source {cfg.source} has not: "
                            "set --train_grounder false (the job configs' detector grounds zero-shot)")
    if problems:
        raise ConfigError(problems)


def plan(cfg: Config) -> list[Stage]:
    """The stages, in order, with every path derived from ``cfg.workdir``."""
    from tmr_core.phrases import PHRASE_LENGTHS

    wd = cfg.workdir
    bench = os.path.join(wd, "benchmark")
    models = cfg.models_dir
    tracking = ["--tracking.tracking_uri", cfg.tracking_uri] if cfg.tracking_uri else []
    stages: list[Stage] = []
    if models:
        stages.append(Stage("make_tiny_models", "make_tiny_models",
                            ["--config", _job_config(cfg, "make_tiny_models"), "--out", models], models, summary="none"))
    synthetic = cfg.source == "synthetic"
    data_stage = "make_synthetic_benchmark" if synthetic else None
    if synthetic:
        stages.append(Stage("make_synthetic_benchmark", "make_synthetic_benchmark",
                            ["--config", _job_config(cfg, "make_synthetic_benchmark"), "--out", bench], bench,
                            summary="none"))
    source_args = (["--data_dir", bench] if synthetic else
                   ["--data_dir", cfg.data_dir, *(["--image_dir", cfg.image_dir] if cfg.image_dir else [])])

    def phrase_args(task: str) -> list[str]:
        if synthetic:  # the benchmark's gold trees: no stanza model download
            return ["--parser", "trees", "--trees_dir", os.path.join(bench, "trees", task)]
        return ["--parser", cfg.phrase_parser or "stanza"]

    needs_data = [data_stage] if data_stage else []

    def model_args(key: str, name: str) -> list[str]:
        return [key, os.path.join(models, name)] if models else []

    def task_dir(task: str, stage: str) -> str:
        return os.path.join(wd, "stages", task, stage)

    truth = os.path.join(bench, "ground_truth.jsonl")
    storage_args = ["--ray.storage_path", os.path.join(wd, "ray_results")]
    for task in cfg.tasks:
        dataset, phrases = task_dir(task, "dataset"), task_dir(task, "phrases")
        stages += [
            Stage(f"prepare_dataset.{task}", "prepare_dataset",
                  ["--config", _job_config(cfg, "prepare_dataset"), "--format", cfg.source, "--task", task,
                   *source_args, "--output", dataset], dataset, needs_data),
            Stage(f"extract_phrases.{task}", "extract_phrases",
                  ["--config", _job_config(cfg, "extract_phrases"), "--input", dataset, "--output", phrases,
                   *phrase_args(task), "--max_phrase_len", str(PHRASE_LENGTHS[task])], phrases, [f"prepare_dataset.{task}"]),
        ]
    back_translator_stage = {task: [] for task in cfg.tasks}
    generator = {task: model_args("--generation.model", "text-to-image") for task in cfg.tasks}
    if trains_back_translator(cfg):
        for stage, used_by in back_translator_stages(cfg, task_dir, truth if synthetic else None,
                                                     [*storage_args, *tracking], model_args("--model.base", "text-to-image")):
            stages.append(stage)
            for task in used_by:
                back_translator_stage[task] = [stage.id]
                generator[task] = ["--generation.model", os.path.join(stage.output, "model")]
    for task in cfg.tasks:
        stages.append(Stage(f"generate_back_translations.{task}", "generate_back_translations",
                            ["--config", _job_config(cfg, "generate_back_translations"), "--input", task_dir(task, "phrases"),
                             "--output", task_dir(task, "back_translations"),
                             "--cache_uri", os.path.join(wd, "cache", "back_translations"), *generator[task]],
                            task_dir(task, "back_translations"),
                            [f"extract_phrases.{task}", *back_translator_stage[task]]))
    detector = model_args("--detector.model", "detector")
    if trains_grounder(cfg):
        grounder = os.path.join(wd, "grounder")
        stages.append(Stage("finetune_grounder", "finetune_grounder",
                            ["--config", _job_config(cfg, "finetune_grounder"),
                             "--data.datasets", json.dumps([task_dir(t, "phrases") for t in cfg.tasks]),
                             "--data.ground_truth", truth, "--data.dataset_name", cfg.source,
                             "--output", grounder, *storage_args, *model_args("--model.detector", "detector"), *tracking],
                            grounder, [f"extract_phrases.{t}" for t in cfg.tasks], summary="metrics"))
        detector = ["--detector.model", os.path.join(grounder, "model")]
    for task in cfg.tasks:
        stages.append(Stage(f"ground_phrases.{task}", "ground_phrases",
                            ["--config", _job_config(cfg, "ground_phrases"), "--input", task_dir(task, "back_translations"),
                             "--output", task_dir(task, "regions"), *detector], task_dir(task, "regions"),
                            [f"generate_back_translations.{task}", *(["finetune_grounder"] if trains_grounder(cfg) else [])]))
    mde = os.path.join(wd, "mde")
    stages.append(Stage("pretrain_mde", "pretrain_mde",
                        ["--config", _job_config(cfg, "pretrain_mde"),
                         "--data.corpus", os.path.join(bench, "mde") if synthetic else cfg.mde_corpus,
                         "--output", mde, *storage_args,
                         *model_args("--model.backbone", "mde-backbone"), *tracking],
                        mde, needs_data, summary="metrics"))
    for task in cfg.tasks:
        stages.append(Stage(f"score_divergence.{task}", "score_divergence",
                            ["--config", _job_config(cfg, "score_divergence"), "--input", task_dir(task, "regions"),
                             "--output", task_dir(task, "divergence"), "--checkpoint", os.path.join(mde, "model")],
                            task_dir(task, "divergence"), [f"ground_phrases.{task}", "pretrain_mde"]))
    if synthetic:
        probes = os.path.join(wd, "probes")
        stages.append(Stage("probe_mechanisms", "probe_mechanisms",
                            ["--config", _job_config(cfg, "probe_mechanisms"), "--workdir", wd, "--tasks", json.dumps(list(cfg.tasks)), "--output", probes],
                            probes, [f"score_divergence.{t}" for t in cfg.tasks], summary="metrics"))
    for task in cfg.tasks:
        for ablation in ["full", "text_only"] if cfg.text_only_baseline else ["full"]:
            out = os.path.join(wd, "extractor", task, ablation)
            register = [] if ablation == "full" else ["--tracking.register_as", "null"]
            # text only reads the text's columns (tokens, labels; RE's head also its noun phrases):
            # the phrase table (the same rows: each stage's are checked), so it trains while the
            # image stages run instead of after them
            table = "divergence" if ablation == "full" else "phrases"
            table_stage = f"score_divergence.{task}" if ablation == "full" else f"extract_phrases.{task}"
            stages.append(Stage(f"finetune_extractor.{task}.{ablation}", "finetune_extractor",
                                ["--config", _job_config(cfg, "finetune_extractor", "" if task == "ner" else "re"),
                                 "--task", task, "--ablation", ablation, "--output", out,
                                 "--data.dataset", task_dir(task, table), "--data.dataset_name", cfg.source,
                                 *(["--data.ground_truth", truth] if synthetic else ["--data.ground_truth", "null"]), *storage_args,
                                 *model_args("--model.text_encoder", "text-encoder"),
                                 *model_args("--model.image_encoder", "image-encoder"), *register, *tracking],
                                out, [table_stage], summary="metrics"))
    if cfg.compare:
        trained = [s.id for s in stages if s.job in ("finetune_extractor", "pretrain_mde")]
        stages.append(Stage("compare_runs", "compare_runs",
                            ["--config", _job_config(cfg, "compare_runs"), "--output", os.path.join(wd, "comparison"),
                             *tracking], os.path.join(wd, "comparison"), trained, summary="none"))
    for stage in stages:
        extra = cfg.job_args.get(stage.job, [])
        overridden = OVERRIDABLE_FLAGS.get(stage.job, frozenset()) & cli_keys(extra)
        stage.argv = [*without_flags(stage.argv, {f"--{key}" for key in overridden}), *extra]
    if models:
        declare_model_needs(stages, models)
    return stages


def back_translator_stages(cfg: Config, task_dir: Any, truth: str | None, common: list[str],
                           base: list[str]) -> list[tuple[Stage, list[str]]]:
    """``finetune_text_to_image`` stages, each with the tasks that back-translate with it: one per
    task (``finetune_text_to_image.<task>`` in ``<workdir>/t2i/<task>``, on that task's pairs, RE with
    its own config variant) or one shared by every task (``finetune_text_to_image`` in
    ``<workdir>/t2i/shared``, on the pairs of ``back_translator_tasks``)."""
    if cfg.back_translators == "per_task":
        groups = [(f"finetune_text_to_image.{task}", os.path.join(cfg.workdir, "t2i", task), [task], task)
                  for task in cfg.tasks]
    else:
        tasks = [t for t in cfg.tasks if t in (cfg.back_translator_tasks or cfg.tasks)] or list(cfg.tasks)
        groups = [("finetune_text_to_image", os.path.join(cfg.workdir, "t2i", "shared"), tasks, None)]
    stages = []
    for stage_id, output, tasks, own in groups:
        variant = "re" if own == "re" else ""
        register = ["--tracking.register_as", f"tmr-t2i-{own}"] if own else []
        argv = ["--config", _job_config(cfg, "finetune_text_to_image", variant),
                "--data.datasets", json.dumps([task_dir(t, "dataset") for t in tasks]),
                "--data.dataset_name", cfg.source, *(["--data.ground_truth", truth] if truth else []),
                "--output", output, *common, *base, *register]
        stages.append((Stage(stage_id, "finetune_text_to_image", argv, output,
                             [f"prepare_dataset.{t}" for t in tasks], summary="metrics"),
                       [own] if own else list(cfg.tasks)))
    return stages


def declare_model_needs(stages: list[Stage], models: str) -> None:
    """A stage that names a model under ``models`` (an argument or its config file) needs the stage
    that builds them: the scheduler may otherwise start it first (it orders by needs, not by plan)."""
    builder = stages[0].id
    prefix = os.path.normpath(models)
    for stage in stages[1:]:
        names_one = any(os.path.normpath(arg) == prefix or os.path.normpath(arg).startswith(prefix + os.sep)
                        for arg in stage.argv)
        config = stage.argv[stage.argv.index("--config") + 1] if "--config" in stage.argv else None
        if not names_one and config and os.path.isfile(config):
            with open(config, encoding="utf-8") as handle:
                names_one = prefix in handle.read()
        if names_one and builder not in stage.needs:
            stage.needs = [builder, *stage.needs]


# flags the pipeline sets that --job_args may still override (the pipeline then leaves its own out)
# per job, the keys of the pipeline's arguments that --job_args may override (the back-translators'
# registered names, e.g. null: register nothing); the text-only extractor's null stays
OVERRIDABLE_FLAGS = {"finetune_text_to_image": frozenset({"tracking.register_as"})}


def without_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without each ``--flag value`` pair of ``flags``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def check_job_args(stages: list[Stage], job_args: dict[str, list[str]]) -> None:
    """Reject extra arguments that repeat a flag the pipeline sets itself (paths, tracking …),
    however spelled, but for the job's :data:`OVERRIDABLE_FLAGS`."""
    from jobs._config import ConfigError

    problems = []
    for stage in stages:
        extra = job_args.get(stage.job, [])
        own = cli_keys(stage.argv[: len(stage.argv) - len(extra)]) - OVERRIDABLE_FLAGS.get(stage.job, frozenset())
        for key in sorted(cli_keys(extra) & own):
            problems.append(f"--job_args.{stage.job}: --{key} is set by the pipeline for {stage.id}; "
                            "change it through the pipeline's own options instead")
    if problems:
        raise ConfigError(sorted(set(problems)))


# --------------------------------------------------------------------------- skipping


def stage_fingerprint(stage: Stage, upstream: dict[str, str]) -> str:
    """Hash of what decides a stage's output: job, resolved config, upstream fingerprints.

    The config is resolved as the job resolves it (defaults < YAML < CLI), so a changed default
    in the code reruns the stage just as an edited YAML does.
    """
    blob = [stage.job, _resolved_config(stage), [upstream.get(n, "") for n in stage.needs]]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _resolved_config(stage: Stage) -> dict:
    from jobs._config import config_to_dict

    module = importlib.import_module(f"jobs.{stage.job}")
    return config_to_dict(parse_config(module.Config, list(stage.argv), prog=f"jobs.{stage.job}"))


def _marker_path(workdir: str, stage: Stage) -> str:
    return os.path.join(workdir, ".pipeline", f"{stage.id}.json")


def is_up_to_date(workdir: str, stage: Stage, fingerprint: str) -> bool:
    """Same fingerprint, and the output still holds what the stage wrote (its rows per split, its
    own ``_SUCCESS.json`` matching its files): a marker never vouches for files that are gone."""
    marker = read_marker(workdir, stage)
    if marker.get("fingerprint") != fingerprint or not os.path.exists(stage.output):
        return False
    if stage.summary != "table":
        return True
    from jobs._data import StageOutputError

    try:
        rows = stage_rows(stage)
    except StageOutputError as exc:
        print(f"=== [{stage.id}] output changed since it ran ({exc}); running it again", flush=True)
        return False
    if rows != marker.get("rows"):
        print(f"=== [{stage.id}] output holds rows {rows}, its marker says {marker.get('rows')}; running it again",
              flush=True)
        return False
    return True


def write_marker(workdir: str, stage: Stage, fingerprint: str, seconds: float,
                 rows: dict[str, int] | None = None) -> None:
    path = _marker_path(workdir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"fingerprint": fingerprint, "seconds": round(seconds, 2), "rows": rows, "argv": stage.argv},
                  handle, indent=2)
    os.replace(tmp, path)


def retire_marker(workdir: str, stage: Stage) -> None:
    """Remove a stage's marker before the stage touches its output, so a crash or kill halfway
    never leaves a marker describing files that are no longer there."""
    path = _marker_path(workdir, stage)
    if os.path.isfile(path):
        os.remove(path)


def read_marker(workdir: str, stage: Stage) -> dict:
    path = _marker_path(workdir, stage)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


# --------------------------------------------------------------------------- rows per split


def stage_rows(stage: Stage) -> dict[str, int]:
    """Rows per split of a table stage's output, from its ``_SUCCESS.json`` once checked against
    the files; {} for an output without one (every table stage writes it), which then reruns.

    Raises:
        StageOutputError: an unfinished output, or a marker that does not match the files.
    """
    from jobs._data import check_marker

    marker = check_marker(stage.output, list(SPLITS))
    return dict(marker.get("rows") or {}) if marker is not None else {}


def format_rows(rows: dict[str, int]) -> str:
    """``train 400 | valid 120 | test 120``."""
    ordered = [s for s in SPLITS if s in rows] + sorted(set(rows) - set(SPLITS))
    return " | ".join(f"{split} {rows[split]}" for split in ordered)


def check_rows_kept(stage: Stage, rows: dict[str, int], rows_by_stage: dict[str, dict[str, int]]) -> None:
    """Raise when ``stage`` has other valid/test row counts than the table stage it reads.

    Raises:
        RowCountError: naming the stage, the split and both counts.
    """
    for upstream in stage.needs:
        before = rows_by_stage.get(upstream)
        if before is None:
            continue
        for split in EVALUATION_SPLITS:
            if split in before and rows.get(split, 0) != before[split]:
                raise RowCountError(
                    f"stage {stage.id}: split '{split}' has {rows.get(split, 0)} rows but its input "
                    f"({upstream}) has {before[split]}; a stage may drop only training rows, so every model is "
                    f"evaluated on the same samples: fix what drops them (e.g. on_missing_image) and rerun {stage.id}"
                )


# --------------------------------------------------------------------------- summary


def read_metrics(output: str) -> dict:
    path = os.path.join(output, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


HEADLINE_METRICS = {
    "pretrain_mde": ("test_in_domain_macro_f1", "test_out_of_domain_macro_f1"),
    "finetune_text_to_image": ("test_bt_fidelity_deciding", "base_test_bt_fidelity_deciding",
                               "re_test_bt_fidelity_deciding", "base_re_test_bt_fidelity_deciding"),
    "finetune_grounder": ("test_recall", "test_zero_area_share"),
    "probe_mechanisms": ("bt_fidelity_deciding", "re_bt_fidelity_deciding", "ner_grounding_recall", "re_grounding_recall",
                         "ner_alpha_macro_f1", "re_alpha_macro_f1"),
    "finetune_extractor": ("test_f1", "test_ambiguous_f1"),
}


def _headline(stage: Stage, metrics: dict) -> str:
    keys = HEADLINE_METRICS.get(stage.job, ())
    shown = [f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    return " ".join(shown)


def summary_table(cfg: Config, stages: list[Stage], ran: dict[str, float | None]) -> str:
    """Markdown table: stage, status, rows per split, time, headline metrics."""
    lines = ["| stage | status | rows | seconds | result |", "|---|---|---|---|---|"]
    for stage in stages:
        if stage.id not in ran:
            continue
        seconds = ran[stage.id]
        status = "ran" if seconds is not None else "up to date"
        if seconds is None:
            seconds = read_marker(cfg.workdir, stage).get("seconds")
        recorded = read_marker(cfg.workdir, stage).get("rows") if stage.summary == "table" else None
        rows = format_rows(recorded) if recorded else None
        result = _headline(stage, read_metrics(stage.output)) if stage.summary == "metrics" else ""
        lines.append(f"| {stage.id} | {status} | {rows if rows is not None else ''} | "
                     f"{seconds if seconds is not None else ''} | {result} |")
    return "\n".join(lines)


def _percent(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "n/a"


def f1_table(cfg: Config, stages: list[Stage]) -> str:
    """NER/RE test F1 (all and ambiguous mentions) of the full model vs the text-only ablation."""
    lines = ["| task | model | test F1 | ambiguous-subset F1 |", "|---|---|---|---|"]
    for stage in stages:
        if stage.job != "finetune_extractor":
            continue
        _, task, ablation = stage.id.split(".")
        metrics = read_metrics(stage.output)
        lines.append(f"| {task} | {ablation} | {_percent(metrics, 'test_f1')} | {_percent(metrics, 'test_ambiguous_f1')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run

# Training stages: each reads finished tables and writes a model, so several may run at once, each in
# its own process joined to the pipeline's Ray session (``parallel_stages``).
BACKGROUND_JOBS = frozenset({"finetune_text_to_image", "finetune_grounder", "pretrain_mde", "finetune_extractor"})
LOG_TAIL_LINES = 30


def stage_argv(stage: Stage, forced: bool) -> list[str]:
    """The stage's arguments; a forced stage also gets ``--force true`` when its job has that
    option, so the job reruns instead of finding its own output up to date."""
    if forced and _has_force_option(stage.job) and "--force" not in stage.argv:
        return [*stage.argv, "--force", "true"]
    return list(stage.argv)


def _has_force_option(job: str) -> bool:
    module = importlib.import_module(f"jobs.{job}")
    return "force" in {f.name for f in dataclasses.fields(module.Config)}


def log_path(workdir: str, stage: Stage) -> str:
    return os.path.join(workdir, "logs", f"{stage.id}.log")


@contextlib.contextmanager
def output_to(path: str | None) -> Iterator[None]:
    """Send this process's stdout and stderr to ``path`` while the block runs: file descriptors 1
    and 2 (Python's prints, Ray's and tqdm's output, C libraries'); ``None``: leave them alone.

    ``sys.stdout``/``sys.stderr`` stay the same objects when they write to those descriptors (a
    terminal, a pipe), so a logging handler made inside the block never holds a file that is
    closed after it; only when they write elsewhere (pytest's capture) are they pointed at the
    log too. When the block raises, the log's last lines are shown on the restored stderr.
    """
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    failed = False
    try:
        with open(path, "a", buffering=1) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                with contextlib.ExitStack() as redirects:
                    if not (_writes_to(sys.stdout, 1) and _writes_to(sys.stderr, 2)):
                        redirects.enter_context(contextlib.redirect_stdout(log))
                        redirects.enter_context(contextlib.redirect_stderr(log))
                    yield
            except BaseException:
                failed = True
                raise
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        if failed:
            print(f"--- last lines of {path}:\n{log_tail(path)}", file=sys.stderr, flush=True)


def _writes_to(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as handle:
        return "".join(collections.deque(handle, maxlen=lines))


def run_stage(stage: Stage, argv: list[str], log: str | None = None) -> None:
    """Run a stage's job in this process (sharing its Ray session); with ``log``, its output goes there."""
    module = importlib.import_module(f"jobs.{stage.job}")
    with output_to(log):
        print(f"\n=== [{stage.id}] python -m jobs.{stage.job} {' '.join(argv)}", flush=True)
        code = module.main(list(argv))
    if code:
        raise RuntimeError(f"stage {stage.id} (jobs.{stage.job}) exited with code {code}")


@dataclass
class BackgroundStage:
    """A stage running in its own process; a watcher thread records when it exits."""

    stage: Stage
    process: subprocess.Popen
    log: str
    started: float
    ended: float | None = None

    def seconds(self) -> float:
        return round((self.ended or time.perf_counter()) - self.started, 1)


def ray_address() -> str:
    """The GCS address of this process's Ray session, so every background stage joins the same
    cluster instead of starting its own."""
    import ray

    from jobs._data import init_ray

    init_ray()
    return ray.get_runtime_context().gcs_address


def start_background(stage: Stage, argv: list[str], log: str, address: str, threads: int | None,
                     niceness: int = 0) -> BackgroundStage:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": address}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "ab") as handle:
        handle.write(f"=== [{stage.id}] python -m jobs.{stage.job} {' '.join(argv)}\n".encode())
        handle.flush()
        process = subprocess.Popen([sys.executable, "-m", f"jobs.{stage.job}", *argv], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env)
    lower_priority(process.pid, niceness)
    running = BackgroundStage(stage, process, log, time.perf_counter())

    def watch() -> None:
        process.wait()
        running.ended = time.perf_counter()

    threading.Thread(target=watch, name=f"watch-{stage.id}", daemon=True).start()
    return running


def lower_priority(pid: int, niceness: int) -> None:
    """Raise a process's nice value by ``niceness`` over this one's. Set from here, not in a
    ``preexec_fn`` (unsafe in a process with threads): the child is still importing by then."""
    if niceness > 0 and hasattr(os, "setpriority"):  # POSIX only
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness))
        except OSError as error:  # a sandbox may forbid it; the stage runs at this process's priority
            print(f"[run_pipeline] could not lower the priority of process {pid}: {error}", file=sys.stderr, flush=True)


def stop_background(running: dict[str, BackgroundStage]) -> None:
    """Stop stages still running after another failed; each resumes from its checkpoints on the next run."""
    for job in running.values():
        if job.process.poll() is None:
            job.process.terminate()
    for job in running.values():
        try:
            job.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.process.kill()


MAX_NICE_PER_LEVEL = 5  # CFS weights: each +5 of nice is ~3x less CPU when cores are contended


def chain_lengths(stages: list[Stage], weights: dict[str, float] | None = None) -> dict[str, float]:
    """Per stage, the length of the longest chain of stages from it to the end (itself and what
    waits on it), each stage counting its weight (``weights`` by stage id, else by job, else 1):
    the classic list-scheduling priority (highest level first), with run times as far as known."""
    weights = weights or {}
    by_id = {s.id: s for s in stages}
    dependents: dict[str, list[str]] = {s.id: [] for s in stages}
    for stage in stages:
        for need in stage.needs:
            dependents.setdefault(need, []).append(stage.id)
    lengths: dict[str, float] = {}

    def weight(stage_id: str) -> float:
        stage = by_id.get(stage_id)
        return weights.get(stage_id, weights.get(stage.job, 1.0) if stage else 1.0)

    def length(stage_id: str) -> float:
        if stage_id not in lengths:
            lengths[stage_id] = weight(stage_id) + max((length(d) for d in dependents.get(stage_id, [])), default=0)
        return lengths[stage_id]

    for stage in stages:
        length(stage.id)
    return {s.id: lengths[s.id] for s in stages}


def background_niceness(stages: list[Stage], lengths: dict[str, float], background: frozenset[str],
                        base: int = 0) -> dict[str, int]:
    """Nice increments (over this process) of the training stages: ``base`` — how much nicer Ray
    runs its workers, where the table stages do their work (Ray's ``worker_niceness``, 15 by
    default) — for the longest training chain, and a step more per level shorter (at most 19).

    Ranked against the table stages' workers, not above them: a back-translator at nice 0 would
    starve the generation and grounding stages that wait on it, which run at 15.
    """
    trained = [s for s in stages if s.job in background]
    if not trained:
        return {}
    top, bottom = max(lengths[s.id] for s in trained), min(lengths[s.id] for s in trained)
    step = max(1, min(MAX_NICE_PER_LEVEL, (19 - base) // max(1, math.ceil(top - bottom))))
    return {s.id: min(19, base + math.ceil(step * (top - lengths[s.id]))) for s in trained}


def ray_worker_niceness() -> int:
    """How much nicer than this process the connected Ray cluster runs its workers (Ray's
    ``worker_niceness``: 15 unless the cluster sets it), measured with one task."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    return max(0, ray.get(niceness.remote()) - os.nice(0))


class Scheduler:
    """Runs the planned stages in dependency order: table stages one at a time in this process,
    training stages (``BACKGROUND_JOBS``) up to ``parallel_stages`` at once in their own processes
    as soon as the stages they read are done. With ``parallel_stages: 1`` it is the plan's order.
    With ``critical_path_first`` (and parallel stages) ready stages are taken longest chain first
    (:func:`chain_lengths`) and training stages run at :func:`background_niceness`."""

    def __init__(self, cfg: Config, stages: list[Stage]) -> None:
        self.cfg = cfg
        self.pending = list(stages)
        self.fingerprints: dict[str, str] = {}
        for stage in stages:
            self.fingerprints[stage.id] = stage_fingerprint(stage, self.fingerprints)
        self.done: set[str] = set()
        self.rows_by_stage: dict[str, dict[str, int]] = {}
        self.ran: dict[str, float | None] = {}
        self.running: dict[str, BackgroundStage] = {}
        self._to_run: set[str] = set()  # stages found not up to date
        self._address: str | None = None
        prioritise = cfg.critical_path_first and cfg.parallel_stages > 1
        self.stages = list(stages)
        self._prioritise = prioritise
        self._lengths = chain_lengths(stages, cfg.stage_weights)
        self._rank = {s.id: -self._lengths[s.id] if prioritise else 0 for s in stages}
        self._niceness: dict[str, int] = {}  # set when the first training stage starts (Ray is up)

    # ---- what may run now

    def _ready(self) -> list[Stage]:
        ready = [s for s in self.pending if all(n in self.done or n not in self.fingerprints for n in s.needs)]
        return sorted(ready, key=lambda s: self._rank[s.id])  # stable: the plan's order among equals

    def _forced(self, stage: Stage) -> bool:
        return "all" in self.cfg.force or stage.id in self.cfg.force

    def _in_background(self, stage: Stage) -> bool:
        return self.cfg.parallel_stages > 1 and stage.job in BACKGROUND_JOBS

    def _log(self, stage: Stage) -> str | None:
        return log_path(self.cfg.workdir, stage) if self.cfg.stage_logs else None

    # ---- the loop

    def run(self) -> dict[str, float | None]:
        try:
            while self.pending or self.running:
                self._collect_finished()
                if self._skip_or_start_ready():
                    continue
                stage = next((s for s in self._ready() if not self._in_background(s)), None)
                if stage is not None:
                    self._run_here(stage)
                elif self.running:
                    time.sleep(0.2)
                elif self.pending:  # a plan whose needs name a later stage: a bug in plan()
                    raise RuntimeError(f"stages {[s.id for s in self.pending]} wait on stages that never run")
        except BaseException:
            stop_background(self.running)
            raise
        return self.ran

    def _skip_or_start_ready(self) -> bool:
        """Skip every ready stage that is up to date and start ready training stages while slots
        are free; True when anything changed (the ready set may have grown)."""
        changed = False
        for stage in self._ready():
            if stage.id not in self._to_run and self._up_to_date(stage):
                self._finish(stage, None)
                changed = True
            elif self._in_background(stage) and len(self.running) < self.cfg.parallel_stages:
                self._start(stage)
                changed = True
        return changed

    def _up_to_date(self, stage: Stage) -> bool:
        """Checked once per stage: one waiting for a free slot is not looked at again."""
        if not self._forced(stage) and is_up_to_date(self.cfg.workdir, stage, self.fingerprints[stage.id]):
            return True
        self._to_run.add(stage.id)
        return False

    def _start(self, stage: Stage) -> None:
        self.pending.remove(stage)
        retire_marker(self.cfg.workdir, stage)
        if self._address is None:
            from jobs._tracking import prepare_store

            with output_to(self._log_of_pipeline()):
                self._address = ray_address()
                if self._prioritise:
                    self._niceness = background_niceness(self.stages, self._lengths, BACKGROUND_JOBS,
                                                         base=ray_worker_niceness())
                prepare_store(self.cfg.tracking_uri)
        log = log_path(self.cfg.workdir, stage)
        self.running[stage.id] = start_background(stage, stage_argv(stage, self._forced(stage)), log,
                                                  self._address, self.cfg.stage_threads,
                                                  self._niceness.get(stage.id, 0))
        print(f"=== [{stage.id}] started in its own process (log: {log})", flush=True)

    def _collect_finished(self) -> None:
        """Finish every stage whose process has exited, the successful ones first (so their
        markers are written even when another failed in the same moment), then raise for a failure."""
        ended = [job for job in self.running.values() if job.ended is not None]
        for job in sorted(ended, key=lambda j: bool(j.process.returncode)):
            del self.running[job.stage.id]
            if not job.process.returncode:
                self._finish(job.stage, job.seconds())
                continue
            print(f"\n--- last lines of {job.log}:\n{log_tail(job.log)}", file=sys.stderr, flush=True)
            print(f"\n[run_pipeline] stage {job.stage.id} failed (exit code {job.process.returncode}); log: {job.log}; "
                  "rerun the same command to resume from it.", flush=True)
            raise RuntimeError(f"stage {job.stage.id} (jobs.{job.stage.job}) exited with code {job.process.returncode}")

    def _run_here(self, stage: Stage) -> None:
        self.pending.remove(stage)
        retire_marker(self.cfg.workdir, stage)
        started = time.perf_counter()
        try:
            run_stage(stage, stage_argv(stage, self._forced(stage)), self._log(stage))
        except BaseException:
            log = self._log(stage)
            print(f"\n[run_pipeline] stage {stage.id} failed{f'; log: {log}' if log else ''}; "
                  "rerun the same command to resume from it.", flush=True)
            raise
        self._finish(stage, round(time.perf_counter() - started, 1))

    def _finish(self, stage: Stage, seconds: float | None) -> None:
        if stage in self.pending:
            self.pending.remove(stage)
        self.ran[stage.id] = seconds
        rows = self.rows_by_stage[stage.id] = stage_rows(stage) if stage.summary == "table" else None
        self._announce(stage, "up to date, skipped" if seconds is None else f"ran in {seconds:.1f} s", rows)
        if rows is not None:
            check_rows_kept(stage, rows, self.rows_by_stage)
        if seconds is not None:
            write_marker(self.cfg.workdir, stage, self.fingerprints[stage.id], seconds, rows)
        self.done.add(stage.id)

    def _announce(self, stage: Stage, status: str, rows: dict[str, int] | None) -> None:
        """One line per stage: ``=== [id] ran in 1.2 s · rows train 400 | valid 120 | test 120`` or
        ``=== [id] ran in 60.1 s · test_f1=0.912 …``."""
        result = _headline(stage, read_metrics(stage.output)) if stage.summary == "metrics" else ""
        details = f"rows {format_rows(rows)}" if rows else result
        print(f"=== [{stage.id}] {status}{' · ' + details if details else ''}", flush=True)

    def _log_of_pipeline(self) -> str | None:
        return os.path.join(self.cfg.workdir, "logs", "pipeline.log") if self.cfg.stage_logs else None


def execute(cfg: Config) -> tuple[list[Stage], dict[str, float | None], float]:
    """Run (or skip) every planned stage; returns the stages, per-stage seconds (None: skipped), total."""
    check_config(cfg)
    if cfg.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    stages = plan(cfg)
    check_job_args(stages, cfg.job_args)
    known = {s.id for s in stages}
    unknown = [s for s in cfg.force if s != "all" and s not in known] + (
        [cfg.stop_after] if cfg.stop_after and cfg.stop_after not in known else [])
    if unknown:
        from jobs._config import ConfigError

        raise ConfigError([f"command line: unknown stage id(s) {unknown}; stages are {sorted(known)}"])
    if cfg.stop_after:  # every stage up to it in the plan's order, whatever may run beside it
        stages = stages[: [s.id for s in stages].index(cfg.stop_after) + 1]
    os.makedirs(cfg.workdir, exist_ok=True)
    save_config(cfg, cfg.workdir, name="pipeline.config.yaml")
    if cfg.stage_logs:
        print(f"[run_pipeline] {len(stages)} stages; each stage's output goes to {os.path.join(cfg.workdir, 'logs')}/<stage>.log",
              flush=True)
    started = time.perf_counter()
    ran = Scheduler(cfg, stages).run()
    return stages, ran, time.perf_counter() - started


def print_summary(cfg: Config, stages: list[Stage], ran: dict[str, float | None], total: float) -> None:
    print("\n## Pipeline summary\n")
    print(summary_table(cfg, stages, ran))
    probes = next((s for s in stages if s.job == "probe_mechanisms" and s.id in ran), None)
    if probes is not None:
        from jobs.probe_mechanisms import probe_table

        print("\n## TMR's mechanisms, probed\n")
        print(probe_table(read_metrics(probes.output), "test"))
    if any(s.job == "finetune_extractor" and s.id in ran for s in stages):
        print("\n## NER / RE: full model vs text only (test split)\n")
        print(f1_table(cfg, [s for s in stages if s.id in ran]))
    print(f"\nTotal {total:.1f} s. Outputs under {cfg.workdir}/.")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.run_pipeline")
    if not cfg.stage_logs:  # else it is in <workdir>/pipeline.config.yaml, like each stage's in its output
        print_config(cfg, "run_pipeline")
    stages, ran, total = execute(cfg)
    print_summary(cfg, stages, ran, total)
    return 0


if __name__ == "__main__":
    run_main(main)
