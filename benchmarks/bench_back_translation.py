"""Back-translation throughput: the Ray Data job (1 actor) vs a plain diffusers loop, and a cached rerun.

    python -m benchmarks.bench_back_translation                 # paper size: SD v1.5's UNet/VAE/text encoder, 128 px
    python -m benchmarks.bench_back_translation --size tiny     # the tiny pipeline on CPU, ~2-3 minutes
    python -m benchmarks.bench_back_translation --smoke-test    # tiny, one row, seconds after startup
    python -m benchmarks.bench_back_translation --device cuda --num-gpus 1 --dtype float16   # on a GPU machine
    python -m benchmarks.bench_back_translation --model stabilityai/stable-diffusion-2 --device cuda \\
        --dtype float16 --height 768 --width 768 --steps 50 --batch-size 8 --num-gpus 1

Side by side in one run, on the same pipeline, prompts, seeds, batch size and thread count:

1. plain loop, as a script: a fresh Python process imports torch and diffusers, loads the
   pipeline, then per batch calls ``pipeline(prompts, generator=[per-sample])``, PNG-encodes and
   writes each image — what ``python my_loop.py`` costs, and the same work a job's actor does from
   its process start;
2. plain loop, warm: the same loop in this process, where the imports and a warm-up already ran
   (a lower bound: no start-up at all);
3. job: ``jobs.generate_back_translations`` with a 1-actor pool over the same rows on a running
   local Ray cluster (as under ``ray job submit``), end to end: Ray Data read, cache look-up tasks,
   actor start, imports and pipeline load, generation, cache writes, table write;
4. cached rerun: the same job again (``--force true``): every image is a cache hit.

``--size paper`` (default) generates with Stable Diffusion v1.5's architecture at random weights
(``tmr_core.tiny_models.ensure_models("paper")``: 860 M UNet, SD's VAE, CLIP ViT-L/14 text
encoder) at 128×128, 2 Euler steps with guidance (so the UNet runs on 2× the batch): the FLOPs of
the real model per step at a resolution a CPU finishes in seconds.

The number of rows is calibrated on a warm-up batch so the warm loop does at least ``--seconds``
of work. The goal ratio is the job against the script (1); the ratio against the warm loop (2)
is reported too. Prints the ratios beside the machine facts (cores, torch threads, load average
at start and end) and writes JSON.
Goals: job throughput ≥ 0.95× the plain loop at paper size or on a GPU (issue 19), ≥ 0.90× for the
tiny pipeline on a CPU (issue 7); cached rerun ≤ 5% of the first run's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# per size: what fits a few minutes on a 2-core CPU (paper: ~4 s per 128 px image at 2 steps)
SIZE_DEFAULTS = {"tiny": {"steps": 4, "height": 64, "width": 64, "batch_size": 8, "actor_cpus": 1.0},
                 "paper": {"steps": 2, "height": 128, "width": 128, "batch_size": 2, "actor_cpus": 2.0}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_back_translation", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default=None,
                        help="the generated pipeline: tiny or paper (SD v1.5's architecture); default paper, tiny with --smoke-test")
    parser.add_argument("--model", default=None, help="diffusers pipeline; default: ensure_models(--size)'s text-to-image")
    parser.add_argument("--models-dir", default=None, help="where ensure_models keeps the models (default: its own)")
    parser.add_argument("--scheduler", default="EulerDiscreteScheduler")
    parser.add_argument("--steps", type=int, default=None, help="default per size: tiny 4, paper 2")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None, help="default per size: tiny 64, paper 128")
    parser.add_argument("--width", type=int, default=None, help="default per size: tiny 64, paper 128")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default per size: tiny 8, paper 2")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the job's actor")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="CPUs for the actor (default per size: tiny 1, paper 2); Ray sets its torch threads "
                             "from it, the plain loop uses as many")
    parser.add_argument("--seconds", type=float, default=30.0, help="plain-loop work to calibrate the row count for")
    parser.add_argument("--max-rows", type=int, default=4096)
    parser.add_argument("--smoke-test", action="store_true", help="one row: checks the code path, no timing goals")
    parser.add_argument("--output", default="outputs/bench/back_translation.json")
    parser.add_argument("--plain-loop-script", default=None, help=argparse.SUPPRESS)  # internal: the script run
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if args.smoke_test else "paper")
    for key, value in SIZE_DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def machine_facts() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg())}


def goal_ratio(args) -> float:
    """Issue 19's 0.95 with real compute (paper size or a GPU); issue 7's 0.90 for the tiny pipeline on a CPU."""
    return 0.95 if args.size == "paper" or args.device.startswith("cuda") else 0.90


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_rows(folder: Path, n: int) -> list[dict]:
    """``n`` distinct sentences as a one-split NER table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmr_core.schema import base_schema

    words = "Taylor Swift wins the award at a music show in New York with her band tonight".split()
    rows = []
    for i in range(n):
        tokens = [words[(i * 7 + k) % len(words)] for k in range(4 + i % 5)] + [f"#{i}"]
        rows.append({"id": f"b{i:05d}", "split": "test", "task": "ner", "tokens": tokens,
                     "tags": ["O"] * len(tokens), "image_id": f"b{i:05d}", "image_uri": None})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=base_schema("ner")), folder / "test.parquet")
    return rows


def plain_loop(settings, rows: list[dict], batch_size: int, out_dir: Path) -> float:
    """Seconds for: load the pipeline, generate every row batch by batch, write PNGs."""
    sync(settings.device)
    start = time.perf_counter()
    import torch

    from tmr_core.back_translation import encode_png, generation_seed, load_pipeline, prompt_from_tokens

    pipeline = load_pipeline(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        # the job's default seeds (generation.seed 0, not per sample)
        generators = [torch.Generator(settings.device).manual_seed(generation_seed(r["id"], "")) for r in batch]
        with torch.inference_mode():
            images = pipeline(prompt=[prompt_from_tokens(r["tokens"]) for r in batch],
                              num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                              height=settings.height, width=settings.width, generator=generators,
                              output_type="pil").images
        for row, image in zip(batch, images, strict=True):
            (out_dir / f"{row['id']}.png").write_bytes(encode_png(image))
    sync(settings.device)
    seconds = time.perf_counter() - start
    release(pipeline)
    return seconds


def release(pipeline) -> None:
    """Free a pipeline now: at paper size each holds 4.3 GB, and the job's actor loads its own next."""
    del pipeline
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_loop_script(settings, rows_file: Path, batch_size: int, out_dir: Path, threads: int) -> float:
    """Wall seconds of :func:`plain_loop` in a fresh Python process, from its start to its exit."""
    import dataclasses

    spec = json.dumps({"settings": dataclasses.asdict(settings), "rows": str(rows_file),
                       "batch_size": batch_size, "out": str(out_dir), "threads": threads})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # what Ray sets for a num_cpus actor
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.bench_back_translation", "--plain-loop-script", spec],
                   check=True, env=env)
    return time.perf_counter() - start


def _run_plain_loop_script(spec_json: str) -> int:
    import pyarrow.parquet as pq
    import torch

    from tmr_core.back_translation import GenerationSettings

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    rows = pq.read_table(spec["rows"]).to_pylist()
    plain_loop(GenerationSettings(**spec["settings"]), rows, spec["batch_size"], Path(spec["out"]))
    return 0


def seconds_per_image(settings, batch_size: int) -> float:
    """Warm-up: per-image time of one warm batch (the pipeline is loaded and run once first)."""
    import torch

    from tmr_core.back_translation import load_pipeline

    pipeline = load_pipeline(settings)
    kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  height=settings.height, width=settings.width, output_type="pil")
    prompts = ["a warm up sentence"] * batch_size
    with torch.inference_mode():
        pipeline(prompt=prompts, generator=[torch.Generator(settings.device).manual_seed(0)] * batch_size, **kwargs)
        sync(settings.device)
        start = time.perf_counter()
        pipeline(prompt=prompts, generator=[torch.Generator(settings.device).manual_seed(1)] * batch_size, **kwargs)
        sync(settings.device)
    seconds = (time.perf_counter() - start) / batch_size
    release(pipeline)
    return seconds


def run_job(args, model: str, inp: Path, out: Path, cache: Path, *extra: str) -> tuple[float, dict]:
    from jobs import generate_back_translations

    argv = ["--input", str(inp), "--output", str(out), "--cache_uri", str(cache),
            "--generation.model", model, "--generation.scheduler", args.scheduler,
            "--generation.steps", str(args.steps), "--generation.guidance_scale", str(args.guidance_scale),
            "--generation.height", str(args.height), "--generation.width", str(args.width),
            "--generation.dtype", args.dtype, "--generation.device", args.device,
            "--compute.min_actors", "1", "--compute.max_actors", "1", "--compute.batch_size", str(args.batch_size),
            "--compute.num_cpus", str(args.actor_cpus), "--compute.num_gpus", str(args.num_gpus), *extra]
    start = time.perf_counter()
    assert generate_back_translations.main(argv) == 0
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "_SUCCESS.json").read_text())["summary"]


def main(argv: list[str] | None = None) -> int:
    import ray

    from tmr_core.back_translation import GenerationSettings

    args = parse_args(argv)
    if args.plain_loop_script:
        return _run_plain_loop_script(args.plain_loop_script)
    import torch

    torch.set_num_threads(max(1, int(args.actor_cpus)))  # the same thread count as the job's actor
    before = machine_facts()
    model = args.model
    if model is None:
        from tmr_core.tiny_models import ensure_models

        model = ensure_models(args.size, args.models_dir)["text_to_image"]
    settings = GenerationSettings(model=model, scheduler=args.scheduler, steps=args.steps,
                                  guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                                  dtype=args.dtype, device=args.device)
    if args.smoke_test:
        rows_n, per_image = 1, float("nan")
    else:
        per_image = seconds_per_image(settings, args.batch_size)
        rows_n = min(args.max_rows, args.batch_size * math.ceil(args.seconds / per_image / args.batch_size))
    print(f"[bench] {rows_n} rows; warm per-image time {per_image:.4f}s; model {model}")

    work = Path(tempfile.mkdtemp(prefix="bench-bt-"))
    try:
        rows = write_rows(work / "in", rows_n)
        threads = max(1, int(args.actor_cpus))
        script_s = plain_loop_script(settings, work / "in" / "test.parquet", args.batch_size, work / "script", threads)
        plain_s = plain_loop(settings, rows, args.batch_size, work / "plain")

        started = not ray.is_initialized()  # a caller's cluster (tests) is used as it is
        if started:
            ray.init(num_cpus=math.ceil(args.actor_cpus) + 1, num_gpus=math.ceil(args.num_gpus),
                     include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        job_s, job_summary = run_job(args, model, work / "in", work / "out", work / "cache")
        cached_s, cached_summary = run_job(args, model, work / "in", work / "out", work / "cache", "--force", "true")
        if started:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    after = machine_facts()
    result = {
        "size": args.size, "machine_before": before, "machine_after": after,
        "device": args.device, "dtype": args.dtype, "model": model, "steps": args.steps,
        "image_size": [args.height, args.width], "batch_size": args.batch_size, "rows": rows_n,
        "plain_loop_script": {"seconds": script_s, "images_per_s": rows_n / script_s},
        "plain_loop_warm": {"seconds": plain_s, "images_per_s": rows_n / plain_s},
        "job": {"seconds": job_s, "images_per_s": rows_n / job_s, "summary": job_summary},
        "cached_rerun": {"seconds": cached_s, "summary": cached_summary},
        "throughput_ratio_job_vs_plain": script_s / job_s,
        "throughput_ratio_job_vs_warm_loop": plain_s / job_s,
        "cached_rerun_time_fraction": cached_s / job_s,
        "goals": {"throughput_ratio_min": goal_ratio(args), "cached_fraction_max": 0.05},
        "smoke_test": args.smoke_test,
    }
    print(f"[bench] machine: {before['cpus']} cores, torch {before['torch_threads']} threads, "
          f"load {before['load_avg'][0]:.2f} -> {after['load_avg'][0]:.2f} (1-min average, start -> end); "
          f"size {args.size}: {args.height}x{args.width}, {args.steps} steps, batch {args.batch_size}, {args.dtype} on {args.device}")
    print(f"[bench] plain script {script_s:8.2f}s  {rows_n / script_s:8.2f} images/s  (fresh process: imports, load, loop)")
    print(f"[bench] warm loop    {plain_s:8.2f}s  {rows_n / plain_s:8.2f} images/s  (in this warm process)")
    print(f"[bench] Ray Data job {job_s:8.2f}s  {rows_n / job_s:8.2f} images/s  "
          f"(ratio {result['throughput_ratio_job_vs_plain']:.3f}× the script, goal ≥ "
          f"{result['goals']['throughput_ratio_min']}; {result['throughput_ratio_job_vs_warm_loop']:.3f}× the warm loop)")
    print(f"[bench] cached rerun {cached_s:8.2f}s  ({100 * result['cached_rerun_time_fraction']:.1f}% of the first run, "
          f"goal ≤ 5%; generated {cached_summary.get('generated')}, cached {cached_summary.get('cached')})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"[bench] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
