"""Compare training runs in MLflow: the ablation table, the low-resource curve and MDE Table 3.

    python -m jobs.compare_runs --config configs/compare_runs.yaml
    python -m jobs.compare_runs --config configs/compare_runs.tiny.yaml --sweep true   # launch the runs first

Reads the finished runs of the ``tmr-ner``, ``tmr-re`` and ``tmr-mde`` experiments (tags
``tmr.task``, ``tmr.dataset``, ``tmr.ablation``, ``tmr.train_fraction``, ``tmr.seed``,
``tmr.loss`` that the training jobs set) and writes, to ``--output`` and as artifacts of one
MLflow run in the ``tmr-comparisons`` experiment:

- ``ablations.{md,csv}``: per task/dataset and ablation switch, valid F1, test F1, ambiguous-subset
  F1 and F1 per alignment category: mean ± sample standard deviation over seeds with a 95 %
  t-interval, and each ablation's difference from ``full`` with its 95 % interval, paired by seed
  (the two rows differ only in the removed part; paper Table 1's ablation rows);
- ``low_resource.{md,csv,png}``: test F1 vs train fraction 5–50% (paper Fig. 4);
- ``mde_table3.{md,csv}``: in-domain and out-of-domain F1 per MDE loss (paper Table 3).

``--sweep true`` first launches the runs these tables need as Ray Train runs (ablations × seeds,
train fractions, MDE losses) through the training jobs' own ``main``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from statistics import mean, stdev

from jobs._config import config_to_dict, opt, parse_config, print_config, run_main, save_config
from jobs._tracking import TrackingConfig

ABLATIONS = ("full", "no_back_translation", "no_mde", "no_fine", "no_coarse", "text_only")


@dataclass
class SweepConfig:
    """The runs ``--sweep true`` launches before comparing."""

    tasks: list[str] = opt(["ner", "re"], "Tasks to fine-tune (ner, re).")
    extractor_configs: dict[str, str] = opt(
        {"ner": "configs/finetune_extractor.tiny.yaml", "re": "configs/finetune_extractor.re.tiny.yaml"},
        "Base finetune_extractor config per task.",
    )
    ablations: list[str] = opt(list(ABLATIONS), "Ablation switches to run (full = none).")
    seeds: list[int] = opt([0, 1, 2, 3, 4], "Seeds per ablation (≥ 5 for a 95 % interval worth citing).")
    train_fractions: list[float] = opt([0.05, 0.1, 0.2, 0.5], "Train fractions for the low-resource curve (full model).")
    mde_config: str | None = opt("configs/pretrain_mde.tiny.yaml", "Base pretrain_mde config; null: no MDE runs.")
    mde_losses: list[str] = opt(["ce", "ce_negative_sampling", "supcon"], "MDE objectives for Table 3.")
    extra_args: list[str] = opt([], "Extra --key value arguments passed to every launched run.")
    task_args: dict[str, list[str]] = opt(
        {}, "Extra --key value arguments per task (e.g. another pipeline's stage tables and output folders)."
    )


@dataclass
class Config:
    """Build comparison tables and plots from MLflow runs (optionally launching them first)."""

    output: str = opt("outputs/comparison", "Folder for the Markdown, CSV and PNG files.")
    experiments: list[str] = opt(["tmr-ner", "tmr-re", "tmr-mde"], "MLflow experiments to read.")
    metric: str = opt("test_f1", "Extractor metric compared across runs.")
    ambiguous_metric: str = opt("test_ambiguous_f1", "Extractor metric on the ambiguous-mention subset.")
    mde_metrics: list[str] = opt(
        ["test_in_domain_macro_f1", "test_out_of_domain_macro_f1"], "MDE metrics for Table 3 (in, out of domain)."
    )
    sweep: bool = opt(False, "Launch the sweep's runs before comparing.")
    sweep_config: SweepConfig = opt(SweepConfig, "What --sweep launches.")
    tracking: TrackingConfig = opt(TrackingConfig, "MLflow server and the comparison run.")
    comparison_experiment: str = opt("tmr-comparisons", "Experiment of the run that holds the tables as artifacts.")


# --------------------------------------------------------------------------- sweep


def sweep_commands(cfg: Config) -> list[tuple[str, list[str]]]:
    """``(job, argv)`` for every run the tables need."""
    sweep, commands = cfg.sweep_config, []
    tracking = ["--tracking.tracking_uri", cfg.tracking.tracking_uri] if cfg.tracking.tracking_uri else []
    for task in sweep.tasks:
        base = ["--config", sweep.extractor_configs[task], *tracking, *sweep.extra_args, *sweep.task_args.get(task, [])]
        for ablation in sweep.ablations:
            for seed in sweep.seeds:
                commands.append(("finetune_extractor", [*base, "--ablation", ablation, "--seed", str(seed)]))
        for fraction in sweep.train_fractions:
            commands.append(("finetune_extractor", [*base, "--data.train_fraction", str(fraction)]))
    if sweep.mde_config:
        for loss in sweep.mde_losses:
            commands.append(("pretrain_mde", ["--config", sweep.mde_config, "--loss", loss, *tracking, *sweep.extra_args]))
    return commands


def run_sweep(cfg: Config) -> list[int]:
    """Run each command through its job's ``main`` (each is a Ray Train run); returns exit codes."""
    from jobs import finetune_extractor, pretrain_mde

    jobs = {"finetune_extractor": finetune_extractor.main, "pretrain_mde": pretrain_mde.main}
    codes = []
    for job, argv in sweep_commands(cfg):
        print(f"[compare_runs] sweep: python -m jobs.{job} {' '.join(argv)}", flush=True)
        codes.append(jobs[job](argv))
    return codes


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    """The tags and metrics of one finished run that the tables need."""

    run_id: str
    experiment: str
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    start_time: int = 0  # ms since the epoch, as MLflow records it

    @property
    def fraction(self) -> float:
        return float(self.tags.get("tmr.train_fraction", 1.0))


def load_runs(tracking_uri: str, experiments: list[str]) -> list[RunRecord]:
    """Finished runs of ``experiments`` (missing experiments are skipped)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    records = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            continue
        page_token = None
        while True:
            page = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                      max_results=1000, page_token=page_token)
            for run in page:
                records.append(RunRecord(run.info.run_id, name, dict(run.data.tags), dict(run.data.metrics),
                                         run.info.start_time or 0))
            page_token = page.token
            if not page_token:
                break
    return records


SETTING_TAGS = ("tmr.task", "tmr.dataset", "tmr.ablation", "tmr.loss", "tmr.seed", "tmr.train_fraction")


def latest_per_setting(runs: list[RunRecord]) -> list[RunRecord]:
    """The newest run of each setting (experiment, task, dataset, ablation, loss, seed, fraction):
    a rerun after a code or data change replaces its predecessor instead of averaging with it."""
    latest: dict[tuple, RunRecord] = {}
    for run in runs:
        key = (run.experiment, *(run.tags.get(tag) for tag in SETTING_TAGS))
        if key not in latest or run.start_time > latest[key].start_time:
            latest[key] = run
    return list(latest.values())


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the deviation is nan for a single value."""
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else math.nan)


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values``; (nan, nan) for fewer than two values."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    centre, spread = mean(values), stdev(values) / math.sqrt(len(values))
    if spread == 0:
        return centre, centre
    low, high = stats.t.interval(confidence, len(values) - 1, loc=centre, scale=spread)
    return float(low), float(high)


def estimate(values: list[float]) -> dict[str, float]:
    """``{mean, sd, lo, hi, n}`` of a metric over seeds."""
    centre, sd = _stats(values)
    low, high = t_interval(values)
    return {"mean": centre, "sd": sd, "lo": low, "hi": high, "n": len(values)}


def paired_difference(ablated: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """The ablation minus ``full`` over the seeds both have (``{seed: value}``), with its t-interval."""
    seeds = sorted(set(ablated) & set(full))
    return estimate([ablated[seed] - full[seed] for seed in seeds])


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


# --------------------------------------------------------------------------- tables


ALIGNMENT_METRICS = tuple(f"test_align_{c}_f1" for c in ("strengthen", "complement", "weaken"))


def _by_seed(members: list[RunRecord], metric: str) -> dict[str, float]:
    return {m.tags.get("tmr.seed", m.run_id): m.metrics[metric] for m in members if metric in m.metrics}


def _ablation_metrics(metric: str, ambiguous_metric: str) -> dict[str, str]:
    """Ablation-table column -> the MLflow metric it estimates."""
    return {"valid_f1": "best_valid_f1", "f1": metric, "ambiguous_f1": ambiguous_metric,
            **{m.replace("test_align_", "align_"): m for m in ALIGNMENT_METRICS},
            "alpha_alignment_f1": "test_alpha_alignment_macro_f1"}


def ablation_csv_header(metric: str, ambiguous_metric: str) -> list[str]:
    """The ablation CSV's columns, as :func:`flatten_estimates` spreads a full row and its Δ."""
    estimates = [key for name in _ablation_metrics(metric, ambiguous_metric)
                 for key in ((name, "delta_" + name) if name in ("f1", "ambiguous_f1") else (name,))]
    return ["task", "dataset", "ablation", "runs", "seeds",
            *(f"{key}{suffix}" for key in estimates for suffix in ("", "_sd", "_ci_low", "_ci_high", "_n"))]


def ablation_rows(runs: list[RunRecord], metric: str, ambiguous_metric: str) -> list[dict]:
    """One row per (task, dataset, ablation) over full-data runs.

    Each metric is ``{mean, sd, lo, hi, n}`` over seeds; ``delta_<metric>`` is the ablation minus
    ``full`` paired by seed (only seeds both settings ran), with its 95 % t-interval.
    """
    metrics = _ablation_metrics(metric, ambiguous_metric)
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.tags.get("tmr.task") == "mde" or "tmr.ablation" not in run.tags or run.fraction < 1.0:
            continue
        key = (run.tags.get("tmr.task"), run.tags.get("tmr.dataset"), run.tags["tmr.ablation"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (task, dataset, ablation), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _order(kv[0][2]))):
        row: dict = {"task": task, "dataset": dataset, "ablation": ablation, "runs": len(members),
                     "seeds": ",".join(sorted(m.tags.get("tmr.seed", "?") for m in members))}
        full = groups.get((task, dataset, "full"), [])
        for name, source in metrics.items():
            row[name] = estimate(list(_by_seed(members, source).values()))
            if ablation != "full" and name in ("f1", "ambiguous_f1"):
                row["delta_" + name] = paired_difference(_by_seed(members, source), _by_seed(full, source))
        rows.append(row)
    return rows


def flatten_estimates(rows: list[dict]) -> list[dict]:
    """Rows with ``{mean, sd, lo, hi, n}`` cells spread into ``<key>``, ``<key>_sd`` … columns (CSV)."""
    flat = []
    for row in rows:
        out: dict = {}
        for key, value in row.items():
            if isinstance(value, dict):
                out |= {key: value["mean"], f"{key}_sd": value["sd"], f"{key}_ci_low": value["lo"],
                        f"{key}_ci_high": value["hi"], f"{key}_n": value["n"]}
            else:
                out[key] = value
        flat.append(out)
    return flat


def format_estimate(value: dict, signed: bool = False) -> str:
    """``82.1 ± 2.3 [79.2, 85.0]`` (percent; mean ± sample sd [95 % t-interval])."""
    if value is None or math.isnan(value["mean"]):
        return "–"
    sign = "+" if signed and value["mean"] > 0 else ""
    text = f"{sign}{100 * value['mean']:.1f}"
    if not math.isnan(value["sd"]):
        text += f" ± {100 * value['sd']:.1f} [{100 * value['lo']:+.1f}, {100 * value['hi']:+.1f}]" if signed else \
            f" ± {100 * value['sd']:.1f} [{100 * value['lo']:.1f}, {100 * value['hi']:.1f}]"
    return text


def ablation_table(rows: list[dict]) -> str:
    """The ablation rows as Markdown: estimates as mean ± sd [95 % CI], differences signed."""
    title = "### Ablations (mean ± sample sd [95 % t-interval] over seeds; Δ paired by seed against full)"
    columns = [("task", "task"), ("ablation", "ablation"), ("runs", "seeds"), ("valid_f1", "valid F1 (best epoch)"),
               ("f1", "test F1"), ("delta_f1", "Δ test F1"), ("ambiguous_f1", "ambiguous F1"),
               ("delta_ambiguous_f1", "Δ ambiguous F1"), ("align_strengthen_f1", "strengthen F1"),
               ("align_complement_f1", "complement F1"), ("align_weaken_f1", "weaken F1"),
               ("alpha_alignment_f1", "argmax α vs alignment (macro F1)")]
    lines = [title, "", "| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    if not rows:  # the header still says what the table would hold
        return "\n".join([*lines, "| " + " | ".join("–" for _ in columns) + " |", "", "(no finished runs)"]) + "\n"
    for row in rows:
        cells = [format_estimate(row.get(k), k.startswith("delta_")) if isinstance(row.get(k), dict) or k.startswith("delta_")
                 else str(row.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _order(ablation: str) -> int:
    return ABLATIONS.index(ablation) if ablation in ABLATIONS else len(ABLATIONS)


def low_resource_rows(runs: list[RunRecord], metric: str) -> list[dict]:
    """Test F1 per (task, dataset, ablation, train fraction), mean over seeds (Fig. 4)."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        if run.tags.get("tmr.task") == "mde" or metric not in run.metrics:
            continue
        key = (run.tags.get("tmr.task"), run.tags.get("tmr.dataset"), run.tags.get("tmr.ablation"), run.fraction)
        groups.setdefault(key, []).append(run.metrics[metric])
    rows = []
    for (task, dataset, ablation, fraction), values in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0][:3]) + (kv[0][3],)):
        f1, std = _stats(values)
        rows.append({"task": task, "dataset": dataset, "ablation": ablation, "train_fraction": fraction,
                     "runs": len(values), "f1": f1, "f1_std": std})
    # a curve needs more than one point: keep groups with at least two fractions
    counts: dict[tuple, int] = {}
    for row in rows:
        counts[(row["task"], row["dataset"], row["ablation"])] = counts.get((row["task"], row["dataset"], row["ablation"]), 0) + 1
    return [r for r in rows if counts[(r["task"], r["dataset"], r["ablation"])] > 1]


def mde_rows(runs: list[RunRecord], metrics: list[str]) -> list[dict]:
    """In-domain and out-of-domain F1 per MDE objective (Table 3), mean over seeds."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.tags.get("tmr.task") == "mde" and "tmr.loss" in run.tags:
            groups.setdefault(run.tags["tmr.loss"], []).append(run)
    order = ["ce", "ce_negative_sampling", "supcon"]
    rows = []
    for loss in sorted(groups, key=lambda name: order.index(name) if name in order else len(order)):
        row = {"loss": loss, "runs": len(groups[loss])}
        for metric in metrics:
            row[metric], row[metric + "_std"] = _stats([r.metrics[metric] for r in groups[loss] if metric in r.metrics])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- output


def write_csv(rows: list[dict], path: str, header: list[str]) -> None:
    """Rows as CSV; with no rows, ``header`` alone, so an empty table still names its columns."""
    import csv

    with open(path, "w", newline="") as handle:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row)) or header  # full has no Δ columns
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], title: str) -> str:
    """A Markdown table; float columns are shown as percentages with two decimals."""
    lines = [f"### {title}", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    if not rows:  # the header still says what the table would hold
        return "\n".join([*lines, "| " + " | ".join("–" for _ in columns) + " |", "", "(no finished runs)"]) + "\n"
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if isinstance(value, float) and key != "train_fraction":
                std = row.get(key + "_std")
                cells.append(_pct(value) + (f" ± {_pct(std)}" if isinstance(std, float) and row.get("runs", 1) > 1 else ""))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_low_resource(rows: list[dict], path: str) -> bool:
    """F1 vs train fraction, one line per task/dataset/ablation (Fig. 4 style); False if no data."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        curves: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["task"] == task:
                curves.setdefault((row["dataset"], row["ablation"]), []).append(row)
        for (dataset, ablation), points in sorted(curves.items()):
            points.sort(key=lambda r: r["train_fraction"])
            axis.plot([100 * p["train_fraction"] for p in points], [100 * p["f1"] for p in points],
                      marker="o", label=f"{dataset} {ablation}")
        axis.set_title(f"{task.upper()}: F1 vs training data")
        axis.set_xlabel("training data (%)")
        axis.set_ylabel("test F1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_bars(rows: list[dict], label_key: str, value_keys: list[str], path: str, title: str) -> bool:
    """Grouped bars (ablation table, Table 3); False if no data."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    width = 0.8 / len(value_keys)
    for index, key in enumerate(value_keys):
        axis.bar([i + index * width for i in range(len(rows))],
                 [100 * (r.get(key) if r.get(key) == r.get(key) else 0.0) for r in rows], width, label=key)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    axis.set_xticklabels([r[label_key] for r in rows], rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("F1 (%)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def build_report(cfg: Config, runs: list[RunRecord]) -> dict[str, str]:
    """Write every table and plot to ``cfg.output``; returns ``{name: path}``."""
    os.makedirs(cfg.output, exist_ok=True)
    files: dict[str, str] = {}
    ablations = ablation_rows(runs, cfg.metric, cfg.ambiguous_metric)
    curve = low_resource_rows(runs, cfg.metric)
    table3 = mde_rows(runs, cfg.mde_metrics)
    sections = [
        ablation_table(ablations),
        markdown_table(curve, [("task", "task"), ("dataset", "dataset"), ("ablation", "ablation"),
                               ("train_fraction", "train fraction"), ("runs", "runs"), ("f1", "test F1")],
                       "Low-resource (F1 vs train fraction)"),
        markdown_table(table3, [("loss", "MDE objective"), ("runs", "runs")] +
                       [(m, h) for m, h in zip(cfg.mde_metrics, ("in domain F1", "out of domain F1"), strict=False)],
                       "MDE generalisation (Table 3)"),
    ]
    headers = {
        "ablations": ablation_csv_header(cfg.metric, cfg.ambiguous_metric),
        "low_resource": ["task", "dataset", "ablation", "train_fraction", "runs", "f1", "f1_std"],
        "mde_table3": ["loss", "runs", *(f"{m}{suffix}" for m in cfg.mde_metrics for suffix in ("", "_std"))],
    }
    for name, rows in (("ablations", flatten_estimates(ablations)), ("low_resource", curve), ("mde_table3", table3)):
        files[name + ".csv"] = os.path.join(cfg.output, name + ".csv")
        write_csv(rows, files[name + ".csv"], headers[name])
    files["comparison.md"] = os.path.join(cfg.output, "comparison.md")
    with open(files["comparison.md"], "w") as handle:
        handle.write("# TMR run comparison\n\n" + "\n".join(sections))
    plots = {
        "low_resource.png": lambda p: plot_low_resource(curve, p),
        "ablations.png": lambda p: plot_bars(
            [dict(r, label=f"{r['task']} {r['ablation']}") for r in flatten_estimates(ablations)], "label",
            ["f1", "ambiguous_f1"], p,
            "Ablations: test F1 and ambiguous-subset F1"),
        "mde_table3.png": lambda p: plot_bars(table3, "loss", cfg.mde_metrics, p, "MDE: in vs out of domain F1"),
    }
    for name, draw in plots.items():
        path = os.path.join(cfg.output, name)
        if draw(path):
            files[name] = path
    return files


def log_report(cfg: Config, tracking_uri: str, files: dict[str, str], runs: list[RunRecord]) -> str:
    """Log the tables and plots as artifacts of a new run in the comparisons experiment."""
    from jobs import _tracking

    run_id = _tracking.start_new_run(tracking_uri, cfg.comparison_experiment, "compare_runs",
                                     params=config_to_dict(cfg), tags={"tmr.compared_runs": str(len(runs))})
    for path in files.values():
        _tracking.log_artifacts(tracking_uri, run_id, path, "comparison")
    _tracking.finish_run(tracking_uri, run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.compare_runs")
    print_config(cfg, "compare_runs")
    os.makedirs(cfg.output, exist_ok=True)
    save_config(cfg, cfg.output)
    from jobs._tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if cfg.sweep:
        failed = [code for code in run_sweep(cfg) if code]
        if failed:
            print(f"[compare_runs] {len(failed)} sweep run(s) failed; comparing what finished", flush=True)
    finished = load_runs(tracking_uri, cfg.experiments)
    runs = latest_per_setting(finished)
    if len(runs) < len(finished):
        print(f"[compare_runs] {len(finished) - len(runs)} older run(s) of a setting rerun since are left out", flush=True)
    files = build_report(cfg, runs)
    if cfg.tracking.enabled:
        run_id = log_report(cfg, tracking_uri, files, runs)
        print(f"[compare_runs] logged {len(files)} files to MLflow run {run_id} ({cfg.comparison_experiment})")
    with open(files["comparison.md"]) as handle:
        print(handle.read())
    print(f"[compare_runs] {len(runs)} runs compared; tables and plots in {os.path.abspath(cfg.output)}")
    return 0


if __name__ == "__main__":
    run_main(main)
