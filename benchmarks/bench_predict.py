"""jobs.predict against a plain in-process loop over the same steps, models and rows.

    python -m benchmarks.bench_predict                  # ≥ 60 s of work per arm (tiny models)
    python -m benchmarks.bench_predict --smoke-test     # a few rows: checks the code paths

Arms, each timed from before its models load to its last row written (Ray is started first, as a
cluster is there before a job is submitted):

1. plain loop: the step classes of ``jobs.predict`` built in this process and called batch after
   batch (phrases → cache look-up → grounding → divergence → NER), the loop a user would write;
2. ``jobs.predict``: the same rows through its Ray Data pipeline, one actor per step, the
   machine's CPUs shared among them.

Goal (issue 18): predict's throughput ≥ 0.9 × the loop's. Machine facts (cores, torch threads,
load average before and after) are printed beside the ratio.

``--size`` is accepted for ``make bench`` and recorded, but this benchmark runs the tiny models at
either size: its ratio is Ray Data's per-step overhead around the same step classes, and five
paper-size models (one actor each) do not fit a 2-core, 24 GB machine beside each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time

WORDS = "Kevin Durant joins the Golden State Warriors in Oakland with Amazon ahead of Brexit tonight".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-seconds", type=float, default=60.0, help="Work per arm (the loop's wall time).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="outputs/bench/bench_predict.json")
    parser.add_argument("--smoke-test", action="store_true", help="8 rows, no timing goal.")
    parser.add_argument("--size", choices=("tiny", "paper"), default="tiny",
                        help="accepted for make bench; the tiny models run at either size (see above).")
    return parser.parse_args(argv)


def machine_facts() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def write_posts(folder: str, rows: int, seed: int = 0) -> str:
    """``rows`` posts of 6–12 words, each with its own 64×64 image."""
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "posts.jsonl")
    with open(path, "w") as handle:
        for i in range(rows):
            image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(40), rng.randrange(40), 56, 56))
            image.save(os.path.join(folder, "images", f"{i}.png"))
            tokens = rng.sample(WORDS, rng.randint(6, 12))
            handle.write(json.dumps({"id": str(i), "tokens": tokens, "image": f"images/{i}.png"}) + "\n")
    return path


def predict_argv(models: dict, posts: str, output: str, cache: str, batch_size: int) -> list[str]:
    # one actor per step, the machine's CPUs shared among the five (1 CPU each would ask for 5)
    cpus = f"{(os.cpu_count() or 1) / 5:.2f}"
    return [
        "--config", "configs/predict.tiny.yaml", "--input", posts, "--output", output,
        "--ner_model", models["ner"], "--divergence.checkpoint", models["mde"],
        "--grounding.detector.model", models["detector"], "--back_translation.generation.model", models["text_to_image"],
        "--back_translation.cache_uri", cache,
        *(arg for step in ("phrases", "back_translation", "grounding", "divergence", "ner")
          for arg in (f"--{step}.compute.batch_size", str(batch_size), f"--{step}.compute.num_cpus", cpus)),
    ]


def plain_loop(argv: list[str]) -> dict:
    """The predict job's steps in this process, batch after batch; returns seconds and rows."""
    import pyarrow as pa

    from jobs import predict
    from jobs._config import parse_config
    from tmr_core import storage

    start = time.perf_counter()
    cfg = parse_config(predict.Config, argv)
    rows = predict.input_rows(cfg, predict.read_records(cfg.input), storage.parent(cfg.input))
    steps = [predict.Phrases(cfg),
             predict.BackTranslate(cfg, predict.back_translation_identities(cfg)),
             predict.Ground(cfg), predict.Divergence(cfg), predict.RecognizeEntities(cfg)]
    loaded = time.perf_counter()
    size = cfg.phrases.compute.batch_size
    out, batch_s = [], []
    for i in range(0, len(rows), size):
        tick = time.perf_counter()
        batch = pa.Table.from_pylist(rows[i:i + size])
        for step in steps:
            batch = step(batch)
        out.extend(predict.output_row(r, cfg.tasks) for r in batch.to_pylist())
        batch_s.append(time.perf_counter() - tick)
    end = time.perf_counter()
    steady = sorted(batch_s)[len(batch_s) // 2] / size  # the median batch: no first-call warm-up
    return {"seconds": end - start, "load_s": loaded - start, "rows": len(out), "steady_s_per_row": steady,
            "failed": sum(1 for r in out if r["error"]), "entities": [signature(r["entities"]) for r in out]}


def signature(entities: list[dict] | None) -> list[tuple]:
    """Spans, types and scores (predict stores scores as float32)."""
    return [(e["start"], e["end"], e["type"], float(e["score"])) for e in entities or []]


def same_predictions(a: list[list[tuple]], b: list[list[tuple]], tolerance: float = 1e-5) -> bool:
    """The same entities per row, scores within ``tolerance``."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(p[:3] == q[:3] and abs(p[3] - q[3]) <= tolerance for p, q in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


def predict_job(argv: list[str]) -> dict:
    from jobs import predict

    start = time.perf_counter()
    assert predict.main([*argv, "--force", "true"]) == 0
    seconds = time.perf_counter() - start
    output = argv[argv.index("--output") + 1]
    rows = [json.loads(line) for line in open(os.path.join(output, "predictions.jsonl"))]
    return {"seconds": seconds, "rows": len(rows), "failed": sum(1 for r in rows if r["error"]),
            "entities": [signature(r["entities"]) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size != "tiny":
        print(f"[bench_predict] --size {args.size}: this benchmark runs the tiny models (its ratio is Ray Data's "
              "per-step overhead; see the module docstring)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from benchmarks.bench_serve import make_untrained_checkpoints
    from tmr_core.tiny_models import ensure_tiny_models

    root = tempfile.mkdtemp(prefix="bench-predict-")
    tiny = ensure_tiny_models()
    models = {**tiny, **make_untrained_checkpoints(os.path.join(root, "models"), tiny)}
    before = machine_facts()

    probe_posts = write_posts(os.path.join(root, "probe"), 5 * args.batch_size)
    probe = plain_loop(predict_argv(models, probe_posts, os.path.join(root, "probe-out"), os.path.join(root, "cache"),
                                    args.batch_size))
    per_row = probe["steady_s_per_row"]
    rows = 8 if args.smoke_test else max(4 * args.batch_size, math.ceil(args.min_seconds / per_row))
    print(f"[bench_predict] {rows} rows, batch {args.batch_size} (probe: {per_row * 1000:.0f} ms/row in process)")
    posts = write_posts(os.path.join(root, "posts"), rows, seed=1)
    argv_ = predict_argv(models, posts, os.path.join(root, "out"), os.path.join(root, "cache"), args.batch_size)

    loop = plain_loop(argv_)
    started = not ray.is_initialized()  # a caller's cluster (tests) is used as it is
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    job = predict_job(argv_)
    if started:
        ray.shutdown()
    after = machine_facts()

    same = same_predictions(loop["entities"], job["entities"])
    report = {
        "rows": rows, "batch_size": args.batch_size, "machine_before": before, "machine_after": after,
        "plain_loop": {k: v for k, v in loop.items() if k != "entities"},
        "predict": {k: v for k, v in job.items() if k != "entities"},
        "loop_rows_per_s": rows / loop["seconds"], "predict_rows_per_s": rows / job["seconds"],
        "throughput_ratio": loop["seconds"] / job["seconds"], "same_predictions": same,
        "smoke_test": args.smoke_test, "size_asked": args.size, "size": "tiny",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"[bench_predict] machine: {before['cpus']} cores, torch {before['torch_threads']} threads, "
          f"load {before['load_avg'][0]:.2f} → {after['load_avg'][0]:.2f}")
    print(f"[bench_predict] plain loop : {loop['seconds']:.1f} s ({report['loop_rows_per_s']:.2f} rows/s, "
          f"{loop['load_s']:.1f} s loading)")
    print(f"[bench_predict] jobs.predict: {job['seconds']:.1f} s ({report['predict_rows_per_s']:.2f} rows/s)")
    print(f"[bench_predict] throughput predict / loop = {report['throughput_ratio']:.3f}  (goal ≥ 0.9); "
          f"same predictions: {same}")
    print(f"[bench_predict] wrote {args.output}")
    return 0 if same and loop["failed"] == job["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
