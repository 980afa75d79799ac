"""Probe TMR's own mechanisms on a finished pipeline's stage tables, against the synthetic ground truth.

    python -m jobs.probe_mechanisms --workdir outputs/demo
    python -m jobs.probe_mechanisms --workdir outputs/demo --split valid --tasks [ner]

Three questions, each answered from what the pipeline actually fed the extractor (no model is run):

- **v' fidelity** (Eq. 3): does the back-translation show the entity type its text decides? A reader
  that knows the world's glyph colours (:class:`tmr_core.probes.GlyphReader`) reads each
  ``back_translation_uri``; on NER texts whose context decides the focus type it should read that
  type, on RE texts whose context decides the relation both argument types, and on neutral texts
  it should match the gold type(s) only at chance.
- **Grounding** (§3.2, V^r): is each mention's object among the top-3 ``regions`` of the real image
  (IoU ≥ 0.5), and how many of those boxes have no area?
- **Estimator transfer** (§3.4, Eq. 7): does argmax α (``divergence``) agree with the benchmark's
  alignment label of each pair? (macro F1; chance ≈ 0.33)

The ground truth (``ground_truth.jsonl``) is read only here, after the fact. Results go to
``<output>/metrics.json`` and a Markdown table on stdout; ``--min_*`` turn the goals of issue 17 into
a failing exit code, for CI and the tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from jobs._common import StorageConfig
from jobs._config import ConfigError, opt, parse_config, print_config, run_main, save_config
from tmr_core.errors import TMRError

JOB = "probe_mechanisms"


@dataclass
class Config:
    """Score back-translation fidelity, grounding recall and the estimator's transfer on one split."""

    workdir: str = opt("outputs/demo", "run_pipeline's workdir: reads stages/<task>/{back_translations,regions,divergence}.")
    ground_truth: str | None = opt(None, "ground_truth.jsonl; null: <workdir>/benchmark/ground_truth.jsonl.")
    output: str | None = opt(None, "Folder for metrics.json and config.yaml; null: <workdir>/probes.")
    tasks: list[Literal["ner", "re"]] = opt(["ner", "re"], "Tasks whose tables are probed.")
    split: str = opt("test", "Split probed (tune on valid, report test once).")
    iou_threshold: float = opt(0.5, "Grounding: IoU at which a box finds a mention's object.")
    top_k: int = opt(3, "Grounding: boxes per image that count (the paper's 3 regions).")
    min_fidelity: float | None = opt(None, "Fail when v' fidelity on deciding texts is below this (goal 0.8).")
    min_grounding_recall: float | None = opt(None, "Fail when recall@IoU within top_k, all tasks' mentions together, is below this (goal 0.8).")
    max_zero_area_share: float | None = opt(None, "Fail when the share of zero-area boxes, all tasks together, is above this (goal 0.05).")
    min_alpha_macro_f1: float | None = opt(None, "Fail when argmax-α macro F1 of any task is below this (goal 0.6).")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")


class ProbeFailed(TMRError):
    """A probe fell short of its --min_* / --max_* goal."""


def _table(cfg: Config, task: str, stage: str) -> list[dict]:
    from jobs._train import read_rows

    return read_rows(os.path.join(cfg.workdir, "stages", task, stage), cfg.split, cfg.storage.options())


def load_truth(path: str) -> dict[str, dict]:
    if not os.path.isfile(path):
        raise ConfigError([f"--ground_truth {path}: no such file (the synthetic benchmark writes it; real data has none)"])
    with open(path, encoding="utf-8") as handle:
        return {row["id"]: row for row in map(json.loads, filter(str.strip, handle))}


def fidelity(cfg: Config, task: str, truth: dict[str, dict]) -> dict[str, float]:
    """v' fidelity on the split: what the reader sees in each back-translation the extractor got.
    NER keys are ``bt_fidelity_*``, RE's ``re_bt_fidelity_*``."""
    from tmr_core.images import load_image
    from tmr_core.probes import (
        back_translation_fidelity,
        probe_items,
        relation_back_translation_fidelity,
        relation_probe_items,
    )

    rows = [r for r in _table(cfg, task, "back_translations") if r.get("back_translation_uri")]
    options = cfg.storage.options()
    images = {r["id"]: load_image(r["back_translation_uri"], options) for r in rows}
    known = [truth[i] for i in images if i in truth]
    if task == "ner":
        scores, prefix = back_translation_fidelity(probe_items(known, cfg.split), images), "bt_fidelity_"
    else:
        scores, prefix = relation_back_translation_fidelity(relation_probe_items(known, cfg.split), images), "re_bt_fidelity_"
    return {prefix + k: float(v) for k, v in scores.items()}


def grounding(cfg: Config, task: str, truth: dict[str, dict]) -> dict[str, float]:
    """Recall of the mentions' objects in the real image's top-k regions, and the zero-area share."""
    from tmr_core.grounding import regions_recall

    scores = regions_recall(_table(cfg, task, "regions"), truth, cfg.iou_threshold, cfg.top_k)
    return {f"{task}_grounding_{k}": float(scores[k]) for k in ("recall", "found", "support", "zero_area_share", "boxes")}


def pooled_grounding(metrics: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Recall and zero-area share over every task's mentions and boxes together (the goal's unit)."""
    found = sum(metrics[f"{t}_grounding_found"] for t in tasks)
    support = sum(metrics[f"{t}_grounding_support"] for t in tasks)
    boxes = sum(metrics[f"{t}_grounding_boxes"] for t in tasks)
    zero = sum(metrics[f"{t}_grounding_zero_area_share"] * metrics[f"{t}_grounding_boxes"] for t in tasks)
    return {"grounding_recall": found / support if support else 0.0,
            "grounding_zero_area_share": zero / boxes if boxes else 0.0}


def estimator_transfer(cfg: Config, task: str, truth: dict[str, dict]) -> dict[str, float]:
    """argmax α against the alignment labels of the split's pairs."""
    from tmr_core.probes import alpha_alignment_scores

    scores = alpha_alignment_scores(_table(cfg, task, "divergence"), truth)
    return {f"{task}_alpha_{k}": float(v) for k, v in scores.items()}


def probe(cfg: Config) -> dict[str, float]:
    truth = load_truth(cfg.ground_truth or os.path.join(cfg.workdir, "benchmark", "ground_truth.jsonl"))
    metrics: dict[str, float] = {}
    for task in cfg.tasks:
        metrics |= fidelity(cfg, task, truth)
        metrics |= grounding(cfg, task, truth)
        metrics |= estimator_transfer(cfg, task, truth)
    return metrics | pooled_grounding(metrics, list(cfg.tasks))


def shortfalls(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """Every goal the metrics miss, as one line each."""
    checks = [("bt_fidelity_deciding", cfg.min_fidelity, "min"),
              ("grounding_recall", cfg.min_grounding_recall, "min"),
              ("grounding_zero_area_share", cfg.max_zero_area_share, "max")]
    checks += [(f"{task}_alpha_macro_f1", cfg.min_alpha_macro_f1, "min") for task in cfg.tasks]
    missed = []
    for key, goal, kind in checks:
        if goal is None or key not in metrics:
            continue
        value = metrics[key]
        if (kind == "min" and value < goal) or (kind == "max" and value > goal):
            missed.append(f"{key} = {value:.3f} ({'below' if kind == 'min' else 'above'} the goal {goal})")
    return missed


def probe_table(metrics: dict[str, float], split: str) -> str:
    """Markdown: one line per probe and task."""
    def cell(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "–"

    def interval(prefix: str) -> str:
        key = prefix + "undecided_read_gold_match"
        if key not in metrics:
            return "–"
        return f"{metrics[key]:.3f} [{metrics[key + '_low']:.2f}, {metrics[key + '_high']:.2f}]"

    lines = [f"| probe ({split} split) | NER | RE | both | goal |", "|---|---|---|---|---|",
             f"| v' fidelity, texts that decide a type (RE: both argument types) | {cell('bt_fidelity_deciding')} "
             f"| {cell('re_bt_fidelity_deciding')} | – | ≥ 0.8 |",
             f"| v' reads the gold type, neutral texts (chance NER {cell('bt_fidelity_undecided_chance')}, "
             f"RE {cell('re_bt_fidelity_undecided_chance')}) | {cell('bt_fidelity_undecided_gold_match')} "
             f"| {cell('re_bt_fidelity_undecided_gold_match')} | – | – |",
             f"| … of those whose v' shows a type, 95 % interval (chance NER {cell('bt_fidelity_undecided_read_chance')}, "
             f"RE {cell('re_bt_fidelity_undecided_read_chance')}) | {interval('bt_fidelity_')} "
             f"| {interval('re_bt_fidelity_')} | – | holds chance |"]
    for label, key, goal in (("grounding recall@IoU0.5, top 3", "grounding_recall", "≥ 0.8"),
                             ("zero-area boxes", "grounding_zero_area_share", "≤ 0.05"),
                             ("argmax α vs alignment, macro F1", "alpha_macro_f1", "≥ 0.6")):
        lines.append(f"| {label} | {cell('ner_' + key)} | {cell('re_' + key)} | {cell(key)} | {goal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    metrics = probe(cfg)
    output = cfg.output or os.path.join(cfg.workdir, "probes")
    os.makedirs(output, exist_ok=True)
    save_config(cfg, output)
    with open(os.path.join(output, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
    print(f"\n## TMR's mechanisms, probed\n\n{probe_table(metrics, cfg.split)}\n", flush=True)
    missed = shortfalls(cfg, metrics)
    if missed:
        raise ProbeFailed("probes short of their goals: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    run_main(main)
