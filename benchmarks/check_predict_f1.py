"""Does ``jobs.predict`` reproduce the training job's test F1 on the demo's models?

    python -m benchmarks.check_predict_f1                     # after `make demo`
    python -m benchmarks.check_predict_f1 --workdir outputs/demo --output outputs/check_predict --mode fast

Each task's synthetic **test** split (the demo's ``stages/<task>/divergence/test`` table, the rows
``finetune_extractor`` scored) is written as predict's JSONL input: tokens, the absolute image path,
the row's phrases (so parsing is skipped, as in the stage jobs) and, for RE, the pair's head/tail
token spans. ``jobs.predict`` labels it with ``configs/predict.tiny.yaml`` (the demo's extractor,
MDE, grounder and each task's back-translator over the demo's v' cache; fast mode: cache hits only)
and its output is scored with ``finetune_extractor``'s own metric (entity-chunk F1 for NER, micro F1
without the None relation for RE). Printed per task: predict's F1 and the training job's test F1
(``<workdir>/extractor/<task>/full/metrics.json``, ablation full, seed 0), rows, rows that had every
v' and rows whose α differs from the stage table's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ALPHA_TOLERANCE = 1e-4  # α is float32 in predict's output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.check_predict_f1", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="outputs/demo", help="run_pipeline's workdir (stages, models, cache)")
    parser.add_argument("--output", default="outputs/check_predict", help="predict's inputs and outputs go here")
    parser.add_argument("--config", default="configs/predict.tiny.yaml")
    parser.add_argument("--mode", choices=("fast", "full"), default="fast")
    parser.add_argument("--tasks", nargs="+", default=["ner", "re"], choices=["ner", "re"])
    return parser.parse_args(argv)


def stage_test_rows(workdir: Path, task: str) -> list[dict]:
    """The rows finetune_extractor scored, in id order (predict keeps input order)."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(workdir / "stages" / task / "divergence" / "test"), format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def write_input(rows: list[dict], task: str, path: Path) -> None:
    """Predict's JSONL: the stage row's id (v' seeds may derive from it), tokens, image, phrases, pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            record = {"id": row["id"], "tokens": row["tokens"], "image": os.path.abspath(row["image_uri"]),
                      "phrases": [{k: p[k] for k in ("text", "start", "end")} for p in row["phrases"]]}
            if task == "re":
                record |= {k: {"start": row[k]["start"], "end": row[k]["end"]} for k in ("head", "tail")}
            handle.write(json.dumps(record) + "\n")


def predict_argv(args: argparse.Namespace, task: str, posts: Path, output: Path) -> list[str]:
    """The tiny predict config pointed at the workdir's models and cache, one task at a time (an RE
    row with spans classifies that pair, as the training job does)."""
    workdir = args.workdir
    model = f"{workdir}/extractor/{task}/full/model"
    # RE's own back-translator exists only with run_pipeline --back_translators per_task
    re_model = Path(workdir, "t2i", "re", "model")
    task_models = f"{{re: {re_model}}}" if re_model.is_dir() else "{}"
    return [
        "--config", args.config, "--input", str(posts), "--output", str(output), "--mode", args.mode,
        "--force", "true",
        "--ner_model", model if task == "ner" else "null", "--re_model", model if task == "re" else "null",
        "--back_translation.cache_uri", f"{workdir}/cache/back_translations",
        "--back_translation.generation.model", f"{workdir}/t2i/ner/model",
        "--back_translation.task_models", task_models,
        "--grounding.detector.model", f"{workdir}/grounder/model",
        "--divergence.checkpoint", f"{workdir}/mde/model",
    ]


def predicted_labels(task: str, output: Path, rows: list[dict]) -> list:
    """Tags per token from predict's ``predictions.conll`` (NER), or the pair's relation (RE)."""
    if task == "re":
        return [row["relations"][0]["relation"] for row in rows]
    blocks = (output / "predictions.conll").read_text().strip("\n").split("\n\n")
    return [[line.split("\t")[1] for line in block.splitlines()[1:]] for block in blocks]  # [0]: "# id = …"


def alpha_differs(stage: dict, out: dict) -> bool:
    a, b = stage["divergence"], out["divergence"]
    return (a is None) != (b is None) or (a is not None and max(abs(x - y) for x, y in zip(a, b, strict=True))
                                          > ALPHA_TOLERANCE)


def check_task(args: argparse.Namespace, task: str) -> dict:
    from jobs import predict
    from jobs.finetune_extractor import gold_labels, score_fn

    workdir, out_dir = Path(args.workdir), Path(args.output)
    rows = stage_test_rows(workdir, task)
    posts = out_dir / f"test.{task}.jsonl"
    write_input(rows, task, posts)
    if predict.main(predict_argv(args, task, posts, out_dir / task)) != 0:
        raise SystemExit(f"[check_predict_f1] {task}: jobs.predict failed; its log is above")
    out = [json.loads(line) for line in (out_dir / task / "predictions.jsonl").read_text().splitlines()]
    if [r["id"] for r in out] != [r["id"] for r in rows] or any(r["error"] for r in out):
        raise SystemExit(f"[check_predict_f1] {task}: predict lost or failed rows ({out_dir / task})")
    extractor = workdir / "extractor" / task / "full"
    model_config = json.loads((extractor / "model" / "config.json").read_text())
    training = json.loads((extractor / "metrics.json").read_text())
    none_label = model_config.get("none_label", "None")
    f1 = score_fn(task, none_label)(gold_labels(task, rows), predicted_labels(task, out_dir / task, out))["f1"]
    return {"task": task, "rows": len(rows), "predict_f1": f1, "training_test_f1": training["test_f1"],
            "equal": abs(f1 - training["test_f1"]) < 1e-9,
            "training_best_epoch": training["best_epoch"],
            "back_translation_used": sum(r["back_translation_used"] for r in out),
            "back_translation_cached": sum(r["back_translation_cached"] for r in out),
            "alpha_differs": sum(alpha_differs(s, o) for s, o in zip(rows, out, strict=True))}


def check_training_run(workdir: Path, task: str) -> None:
    """The metrics compared against must be the full model's, seed 0 (what the demo prints)."""
    import yaml

    path = workdir / "extractor" / task / "full" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    if (cfg["ablation"], cfg["seed"]) != ("full", 0):
        raise SystemExit(f"[check_predict_f1] {path}: ablation {cfg['ablation']}, seed {cfg['seed']}; expected full, 0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = []
    for task in args.tasks:
        check_training_run(Path(args.workdir), task)
        results.append(check_task(args, task))
    print(f"\n| task | rows | predict F1 | training test F1 | equal | v' used | v' cached | α differs |"
          f"  ({args.mode} mode)\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['rows']} | {100 * r['predict_f1']:.2f} | {100 * r['training_test_f1']:.2f} | "
              f"{r['equal']} | {r['back_translation_used']}/{r['rows']} | {r['back_translation_cached']}/{r['rows']} | "
              f"{r['alpha_differs']}/{r['rows']} |")
    seconds = time.perf_counter() - started
    print(f"[check_predict_f1] {seconds:.0f} s")
    (Path(args.output) / "check.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=2))
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
