"""What serving costs in accuracy: test-set F1 of the served composite model in full vs fast mode.

    python -m benchmarks.eval_serve_modes                                  # after `make demo`
    python -m benchmarks.eval_serve_modes --workdir outputs/demo --serve-config configs/serve.tiny.yaml

The serve config's model deployments (``TMRModel`` per task, and the ``BackTranslator``) are built
in this process (``serve.app.in_process_pipeline``) and every test sentence of the pipeline's
stage tables goes through the same ``Pipeline`` the HTTP ingress runs (phrase parser →
back-translation → grounder → MDE → extractor), with the test image and the row's id as
``sample_id`` (so its seed, hence its back-translation key, is the batch job's). Three arms:

- ``full``: the back-translation is generated per request through the content-addressed cache
  (here every test image is already cached by the batch job, so this is the batch job's image);
- ``fast`` (warm cache): looked up only; the same images, so the same predictions as ``full``;
- ``fast`` (cold cache): an empty cache, so the model runs its no-back-translation path — what
  fast mode costs for a sentence the batch job never saw.

Scores are the training job's (entity micro F1 for NER, relation micro F1 without ``None`` for
RE, and the synthetic benchmark's ambiguous subset). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.eval_serve_modes", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="outputs/demo", help="run_pipeline's workdir (stage tables, benchmark)")
    parser.add_argument("--serve-config", default="configs/serve.tiny.yaml")
    parser.add_argument("--tasks", nargs="+", default=["ner", "re"], choices=["ner", "re"])
    parser.add_argument("--limit", type=int, default=None, help="first N test rows per task (default: all)")
    parser.add_argument("--output", default="outputs/bench/serve_modes.json")
    return parser.parse_args(argv)


def test_rows(workdir: Path, task: str, limit: int | None) -> list[dict]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(workdir / "stages" / task / "divergence" / "test"), format="parquet").to_table()
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])
    return rows[:limit] if limit else rows


def entity_tags(length: int, entities: list) -> list[str]:
    tags = ["O"] * length
    for entity in entities:
        tags[entity.start] = f"B-{entity.type}"
        for i in range(entity.start + 1, entity.end):
            tags[i] = f"I-{entity.type}"
    return tags


async def predict(pipeline: Any, task: str, rows: list[dict], mode: str) -> tuple[list, int]:
    """Predicted tags (NER) or relations (RE) per row, and how many requests used a back-translation."""
    from serve.schemas import NERRequest, RERequest

    predictions, used = [], 0
    for row in rows:
        image = Path(row["image_uri"]).read_bytes() if row.get("image_uri") else None
        common = {"tokens": row["tokens"], "mode": mode, "sample_id": row["id"]}
        if task == "ner":
            response = await pipeline.ner_request(NERRequest(**common), image)
            predictions.append(entity_tags(len(row["tokens"]), response.entities))
        else:
            spans = {k: {"start": row[k]["start"], "end": row[k]["end"]} for k in ("head", "tail")}
            response = await pipeline.re_request(RERequest(**common, **spans), image)
            predictions.append(response.relation)
        used += bool(response.back_translation and response.back_translation.used)
    return predictions, used


def score(task: str, rows: list[dict], predictions: list, truth: dict, none_label: str) -> dict[str, float]:
    from jobs.finetune_extractor import ground_truth_scores, score_fn

    gold = [row["tags"] for row in rows] if task == "ner" else [row["relation"] for row in rows]
    overall = score_fn(task, none_label)(gold, predictions)
    metrics = {"test_f1": float(overall["f1"])}
    if truth:
        metrics["test_ambiguous_f1"] = ground_truth_scores(task, rows, gold, predictions, truth, none_label)[
            "test_ambiguous_f1"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    from jobs.finetune_extractor import load_ground_truth
    from serve.app import AppArgs, in_process_pipeline, load_serve_config

    args = parse_args(argv)
    workdir = Path(args.workdir)
    app_args = AppArgs.model_validate(load_serve_config(args.serve_config)["applications"][0]["args"])
    truth = load_ground_truth(str(workdir / "benchmark" / "ground_truth.jsonl"), None) \
        if (workdir / "benchmark" / "ground_truth.jsonl").exists() else {}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cold-cache-") as cold_cache:
        arms = [("full", app_args.back_translation_cache, "full"),
                ("fast (warm cache)", app_args.back_translation_cache, "fast"),
                ("fast (cold cache)", cold_cache, "fast")]
        for arm, cache_uri, mode in arms:
            # fast mode never generates: only the full arm loads the diffusion pipeline
            pipeline = in_process_pipeline(app_args, cache_uri, tasks=tuple(args.tasks), back_translator=mode == "full")
            for task in args.tasks:
                rows = test_rows(workdir, task, args.limit)
                started = time.perf_counter()
                predictions, used = asyncio.run(predict(pipeline, task, rows, mode))
                none_label = getattr(pipeline.re.extraction.model.config, "none_label", "None") \
                    if task == "re" else "None"
                metrics = score(task, rows, predictions, truth, none_label)
                results.append({"task": task, "arm": arm, "rows": len(rows), "with_back_translation": used,
                                "seconds": round(time.perf_counter() - started, 1), **metrics})
                print(f"[eval] {task} {arm}: {metrics} ({used}/{len(rows)} with a back-translation)")

    print("\n| task | mode | test F1 | ambiguous-subset F1 | rows with a back-translation |\n|---|---|---|---|---|")
    for r in results:
        ambiguous = f"{100 * r['test_ambiguous_f1']:.1f}" if "test_ambiguous_f1" in r else "–"
        print(f"| {r['task']} | {r['arm']} | {100 * r['test_f1']:.1f} | {ambiguous} | "
              f"{r['with_back_translation']}/{r['rows']} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"[eval] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
