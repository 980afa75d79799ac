"""Ray Train overhead: the same TMR extractor training steps in a plain PyTorch loop and under TorchTrainer.

    python -m benchmarks.bench_train                        # paper size: bert-base + ResNet-50, >= 60 s per arm
    python -m benchmarks.bench_train --size tiny            # the tiny backbones (seconds per step -> ms)
    python -m benchmarks.bench_train --smoke-test           # tiny, 3 steps: checks the code paths
    python -m benchmarks.bench_train --device cuda          # on a GPU machine

The model is ``finetune_extractor``'s (NER, every mechanism on: text encoder, image encoder on the
image, its 3 region crops, the back-translation and its crops, multi-grained attention, CRF). At
``--size paper`` its backbones are bert-base-uncased and ResNet-50 with random weights
(``tmr_core.tiny_models.ensure_models("paper")``): the FLOPs of the real model, no download.
Rows are synthetic posts with images, phrases, regions and divergence scores.

Arms, on the same rows, batch size, threads and step count:
1. plain: ``tmr_core.training.train_epoch`` in this process, batches collated here; it trains
   for ``--min-train-seconds`` after a warm-up step and fixes the step count for the others;
2. ray-1: ``TorchTrainer`` with 1 worker holding the same CPUs (so the same torch threads), its
   rows from ``get_dataset_shard("train")`` through the jobs' ``ShardRows``, as finetune_extractor;
3. ray-2 (tiny default; ``--two-workers``): 2 workers (half the CPUs each) sharing the steps (DDP).

Training time is measured inside each loop (after the warm-up step, to the last step); the rest of
``fit()`` (worker group, process group, dataset split) is reported as start-up. Goal (issue 19):
ray-1 / plain training time <= 1.05. Machine facts (cores, torch threads, load average at start
and end) are printed beside the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

GOAL_RATIO = 1.05
# per size: the batch (paper: bert-base + 8 ResNet-50 passes per post on a CPU), attention heads
SIZE_DEFAULTS = {"tiny": {"batch_size": 16, "num_heads": 2, "two_workers": True},
                 "paper": {"batch_size": 4, "num_heads": 8, "two_workers": False}}
WORDS = "Kevin Durant joins the Golden State Warriors in Oakland with Amazon ahead of Brexit tonight".split()
TYPES = ("PER", "LOC", "ORG", "MISC")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default=None,
                        help="backbones: tiny or paper (bert-base + ResNet-50); default paper, tiny with --smoke-test")
    parser.add_argument("--models-dir", default=None, help="where ensure_models keeps them (default: its own)")
    parser.add_argument("--rows", type=int, default=64, help="distinct synthetic posts (the loop wraps around)")
    parser.add_argument("--min-train-seconds", type=float, default=60.0, help="training work per arm")
    parser.add_argument("--batch-size", type=int, default=None, help="default per size: tiny 16, paper 4")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the plain loop and the 1-worker arm")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (use_gpu for the Ray arms)")
    parser.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=None,
                        help="also time 2 workers (default: on at tiny size, off at paper size)")
    parser.add_argument("--cache-shard-rows", type=int, default=None,
                        help="ray.cache_shard_rows of the jobs (default: theirs); 0 streams every epoch from Ray Data")
    parser.add_argument("--pixel-cache-mb", type=int, default=1024, help="finetune_extractor's data.pixel_cache_mb")
    parser.add_argument("--local-mode", action="store_true",
                        help="Ray Train local mode (num_workers=0, the loop in this process): tests the arm's "
                             "code without a worker group; its ratio is not Ray Train's")
    parser.add_argument("--output", default="outputs/bench/bench_train.json")
    parser.add_argument("--smoke-test", action="store_true", help="3 steps per arm, no timing goal")
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if args.smoke_test else "paper")
    for key, value in SIZE_DEFAULTS[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def machine_facts() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg())}


# --------------------------------------------------------------------------- data


def write_rows(folder: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` NER posts with an image, a back-translation, 3 regions each, phrases and divergence."""
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)

    def image(name: str) -> str:
        picture = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
        picture.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(48), rng.randrange(48), 80, 80))
        path = os.path.join(folder, f"{name}.png")
        picture.save(path)
        return path

    def regions(phrases: list[dict]) -> list[dict]:
        boxes = []
        for k in range(3):
            x, y = rng.randrange(40), rng.randrange(40)
            boxes.append({"box": [float(x), float(y), float(x + 40), float(y + 40)], "score": 0.9 - 0.1 * k,
                          "phrase": phrases[k % len(phrases)]["text"]})
        return boxes

    rows = []
    for i in range(n):
        tokens = rng.sample(WORDS, rng.randint(6, 12))
        tags = ["O"] * len(tokens)
        start = rng.randrange(len(tokens) - 1)
        kind = rng.choice(TYPES)
        tags[start], tags[start + 1] = f"B-{kind}", f"I-{kind}"
        phrases = [{"text": " ".join(tokens[s:s + 2]), "start": s, "end": s + 2} for s in range(0, len(tokens) - 1, 3)]
        weights = [rng.random() + 0.1 for _ in range(3)]
        rows.append({
            "id": f"p{i:04d}", "split": "train", "task": "ner", "tokens": tokens, "tags": tags,
            "image_id": f"p{i:04d}", "image_uri": image(f"p{i:04d}"), "phrases": phrases,
            "regions": regions(phrases), "back_translation_uri": image(f"p{i:04d}-bt"),
            "back_translation_regions": regions(phrases), "divergence": [w / sum(weights) for w in weights],
        })
    return rows


def cycle(rows: list[dict], batch_size: int):
    """Whole batches of rows forever, wrapping around the table."""
    step = 0
    while True:
        start = (step * batch_size) % len(rows)
        chunk = rows[start:start + batch_size]
        yield chunk if len(chunk) == batch_size else chunk + rows[: batch_size - len(chunk)]
        step += 1


# --------------------------------------------------------------------------- model and timing


def build(config: dict):
    """finetune_extractor's model, collator, optimizer and scheduler on the given backbones."""
    from tmr_core.extractor import TMRConfig, TMRExtractor
    from tmr_core.training import build_optimizer, build_scheduler, set_seed

    set_seed(0)
    model = TMRExtractor.build(TMRConfig(task="ner", text_encoder=config["text_encoder"],
                                         image_encoder=config["image_encoder"], num_heads=config["num_heads"]))
    collate = model.collator(pixel_cache_bytes=config["pixel_cache_mb"] * 2**20)
    optimizer = build_optimizer(model, 3e-5, 0.01)  # App. B.1's lr; the rate does not change a step's cost
    return model, collate, optimizer, build_scheduler(optimizer, 10**6, 0.0)


def timed_steps(model, batches, optimizer, scheduler, device) -> tuple[float, int]:
    """Seconds for all but the first (warm-up) batch of ``batches``, and the number of timed steps."""
    import torch

    from tmr_core.training import train_epoch

    iterator = iter(batches)
    train_epoch(model, [next(iterator)], optimizer, scheduler, device)  # warm-up
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = train_epoch(model, iterator, optimizer, scheduler, device)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, stats["steps"]


def plain_batches(chunks, collate, steps: int | None, seconds: float | None):
    """A warm-up batch, then batches until ``steps`` are done or ``seconds`` passed since the warm-up.

    The generator is lazy: its clock starts when the timed loop asks for the second batch.
    """
    yield {"batch": collate(next(chunks))}
    start, done = time.perf_counter(), 0
    for chunk in chunks:
        if (steps is not None and done >= steps) or (seconds is not None and time.perf_counter() - start >= seconds):
            return
        yield {"batch": collate(chunk)}
        done += 1


def plain_arm(args, config: dict, rows: list[dict], steps: int | None, seconds: float | None) -> dict:
    import torch

    torch.set_num_threads(args.cpus)
    model, collate, optimizer, scheduler = build(config)
    model.to(args.device)
    batches = plain_batches(cycle(rows, args.batch_size), collate, steps, seconds)
    train_s, timed = timed_steps(model, batches, optimizer, scheduler, args.device)
    return {"train_s": train_s, "steps": timed, "step_s": train_s / timed}


def ray_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from jobs._train import ShardRows, device

    model, collate, optimizer, scheduler = build(config)
    model = ray.train.torch.prepare_model(model)
    # the training jobs' data path: streamed the first epoch, then replayed from memory if small
    shard = ShardRows(ray.train.get_dataset_shard("train"), config["cache_shard_rows"])

    def batches():
        produced = 0
        while True:  # wrap around the shard like the plain arm wraps around the table
            for rows in shard.chunks(config["batch_size"]):
                if len(rows) < config["batch_size"]:
                    continue  # whole batches only, as the plain arm
                yield {"batch": collate(rows)}
                produced += 1
                if produced == config["steps"] + 1:
                    return

    seconds, timed = timed_steps(model, batches(), optimizer, scheduler, device())
    # Result.metrics is empty without a checkpoint (Ray Train V2) and in local mode: rank 0 writes
    # the timing to a file the driver reads (the workers run on this machine).
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["timing_file"], "w") as handle:
            json.dump({"train_s": seconds, "steps": timed}, handle)
    ray.train.report({"train_s": seconds, "steps": timed})


def ray_arm(args, config: dict, dataset, steps: int, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = args.device.startswith("cuda")
    scaling = (ScalingConfig(num_workers=0) if args.local_mode else
               ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": args.cpus / workers}))
    with tempfile.TemporaryDirectory() as storage:
        timing_file = os.path.join(storage, "timing.json")
        trainer = TorchTrainer(
            ray_loop,
            train_loop_config={**config, "batch_size": args.batch_size, "steps": steps // workers,
                               "cache_shard_rows": args.cache_shard_rows, "timing_file": timing_file},
            scaling_config=scaling,
            run_config=RunConfig(name=f"bench-{workers}", storage_path=storage),
            datasets={"train": dataset},
        )
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
        if not os.path.exists(timing_file):
            raise RuntimeError("the Ray arm wrote no timing; see the worker logs")
        with open(timing_file) as handle:
            timing = json.load(handle)
    train_s = timing["train_s"]
    return {"train_s": train_s, "steps": timing["steps"], "total_s": total, "startup_s": total - train_s,
            "workers": workers, "step_s": train_s / timing["steps"], "local_mode": args.local_mode}


# --------------------------------------------------------------------------- main


def model_config(args) -> dict:
    from tmr_core.tiny_models import ensure_models

    models = ensure_models(args.size, args.models_dir)
    return {"text_encoder": models["text_encoder"], "image_encoder": models["image_encoder"],
            "num_heads": args.num_heads, "pixel_cache_mb": args.pixel_cache_mb}


def report_lines(report: dict) -> list[str]:
    plain, one, two = report["plain"], report["ray_1_worker"], report["ray_2_workers"]
    before, after = report["machine_before"], report["machine_after"]
    lines = [
        f"machine: {before['cpus']} cores, torch {before['torch_threads']} threads, "
        f"load {before['load_avg'][0]:.2f} -> {after['load_avg'][0]:.2f} (1-min average, start -> end)",
        f"size {report['size']}: {report['steps']} steps of batch {report['batch_size']} per arm, {report['cpus']} CPUs, "
        f"device {report['device']}",
        f"plain loop      : {plain['train_s']:.1f} s train ({plain['step_s']:.3f} s/step)",
        f"Ray Train 1 wkr : {one['train_s']:.1f} s train ({one['step_s']:.3f} s/step) + {one['startup_s']:.1f} s startup",
    ]
    if two:
        lines.append(f"Ray Train 2 wkr : {two['train_s']:.1f} s train + {two['startup_s']:.1f} s startup "
                     f"(each worker {two['steps']} steps, {report['cpus'] / 2:g} CPU)")
    lines.append(f"ratio Ray-1 / plain (training time per step) = {report['ratio_ray1_vs_plain_train']:.3f}  "
                 f"(goal <= {GOAL_RATIO}; load {before['load_avg'][0]:.2f} -> {after['load_avg'][0]:.2f} "
                 f"on {before['cpus']} cores)")
    if two:
        lines.append(f"ratio Ray-2 / Ray-1 (training, same total steps) = {report['ratio_ray2_vs_ray1_train']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cache_shard_rows is None:
        from jobs._train import RayTrainConfig

        args.cache_shard_rows = RayTrainConfig().cache_shard_rows
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    before = machine_facts()
    config = model_config(args)
    rows = write_rows(tempfile.mkdtemp(prefix="bench-train-"), max(args.rows, 2 * args.batch_size))

    # The plain arm trains for the time asked and fixes the step count the Ray arms repeat.
    plain = plain_arm(args, config, rows, 3 if args.smoke_test else None,
                      None if args.smoke_test else args.min_train_seconds)
    steps = plain["steps"]
    print(f"[bench_train] plain loop: {steps} steps of batch {args.batch_size} in {plain['train_s']:.1f} s", flush=True)
    started = not ray.is_initialized()  # a caller's cluster (tests) is used as it is
    if started:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    dataset = ray.data.from_items(rows).materialize()
    one = ray_arm(args, config, dataset, steps, 1)
    two_workers = args.two_workers and args.cpus >= 2 and not args.local_mode
    two = ray_arm(args, config, dataset, steps - steps % 2, 2) if two_workers else None
    if started:
        ray.shutdown()

    report = {
        "size": args.size, "text_encoder": config["text_encoder"], "image_encoder": config["image_encoder"],
        "device": args.device, "batch_size": args.batch_size, "cpus": args.cpus, "steps": steps,
        "cache_shard_rows": args.cache_shard_rows, "machine_before": before, "machine_after": machine_facts(),
        "plain": plain, "ray_1_worker": one, "ray_2_workers": two,
        # per step: the arms ran the same steps, but a ratio of step times also holds if one fell short
        "ratio_ray1_vs_plain_train": one["step_s"] / plain["step_s"],
        "ratio_ray1_vs_plain_total": (one["total_s"] / one["steps"]) / plain["step_s"],
        "ratio_ray2_vs_ray1_train": (two["train_s"] / one["train_s"]) if two else None,
        "goal_ratio_max": GOAL_RATIO, "smoke_test": args.smoke_test, "local_mode": args.local_mode,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    for line in report_lines(report):
        print(f"[bench_train] {line}")
    print(f"[bench_train] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
