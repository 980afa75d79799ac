"""Ray Train overhead: the same MDE training steps in the plain tmr_core loop and under TorchTrainer.

    python -m benchmarks.bench_train                       # >= 60 s of training per arm, tiny models
    python -m benchmarks.bench_train --smoke-test          # a few steps, checks the code path
    python -m benchmarks.bench_train --backbone dandelin/vilt-b32-mlm --device cuda   # real model on a GPU box

Arms, all on the synthetic benchmark's MDE corpus with the same model, batch size and step count:
1. plain: ``tmr_core.training.train_epoch`` in this process on rows read with pyarrow;
2. ray-1: ``TorchTrainer`` with 1 worker holding the same CPU count (so the same torch threads)
   reading its ``get_dataset_shard("train")``;
3. ray-2: 2 workers (half the CPUs each) doing the same total steps between them (DDP).

Training time is measured inside the loop (first to last step, after a warm-up step); startup
(worker group, process group, dataset split) is the rest of ``fit()``'s wall time, reported apart.
Prints the ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="ViLT folder/name; default: the tiny mde-backbone.")
    parser.add_argument("--corpus", default=None, help="MDE corpus folder; default: a fresh tiny benchmark.")
    parser.add_argument("--min-train-seconds", type=float, default=60.0, help="Training work per arm.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the plain loop and the 1-worker arm.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (use_gpu for the Ray arms).")
    parser.add_argument("--cache-shard-rows", type=int, default=None,
                        help="ray.cache_shard_rows of the jobs (default: theirs); 0 streams every epoch from Ray Data")
    parser.add_argument("--output", default="outputs/bench/bench_train.json")
    parser.add_argument("--smoke-test", action="store_true", help="3 steps per arm, no ray-2 timing goal.")
    return parser.parse_args(argv)


def build(backbone: str, batch_size: int):
    from transformers import ViltProcessor

    from tmr_core.mde import MDECollator, MultimodalDivergenceEstimator
    from tmr_core.training import build_optimizer, build_scheduler, set_seed

    set_seed(0)
    model = MultimodalDivergenceEstimator.from_backbone(backbone, projection_dim=32, objective="ce")
    collate = MDECollator(ViltProcessor.from_pretrained(backbone), max_length=32)
    optimizer = build_optimizer(model, 1e-3, 0.01)
    return model, collate, optimizer, build_scheduler(optimizer, 10**6, 0.0)


def cycle(rows: list[dict], batch_size: int, steps: int):
    """``steps`` batches of rows, wrapping around the table."""
    for step in range(steps):
        start = (step * batch_size) % len(rows)
        chunk = rows[start:start + batch_size]
        yield chunk if len(chunk) == batch_size else chunk + rows[: batch_size - len(chunk)]


def timed_steps(model, batches, optimizer, scheduler, device) -> tuple[float, int]:
    """Seconds for all but the first (warm-up) batch, and the number of timed steps."""
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


def plain_arm(args, backbone: str, rows: list[dict], steps: int) -> dict:
    import torch

    torch.set_num_threads(args.cpus)
    model, collate, optimizer, scheduler = build(backbone, args.batch_size)
    model.to(args.device)
    batches = (collate(chunk) for chunk in cycle(rows, args.batch_size, steps + 1))
    seconds, timed = timed_steps(model, batches, optimizer, scheduler, args.device)
    return {"train_s": seconds, "steps": timed, "step_s": seconds / timed}


def ray_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from jobs._train import ShardRows, device

    model, collate, optimizer, scheduler = build(config["backbone"], config["batch_size"])
    model = ray.train.torch.prepare_model(model)
    # the training jobs' data path: streamed the first epoch, then replayed from memory if small
    shard = ShardRows(ray.train.get_dataset_shard("train"), config["cache_shard_rows"])

    def batches():
        produced = 0
        while True:  # wrap around the shard like the plain arm wraps around the table
            for rows in shard.chunks(config["batch_size"]):
                if len(rows) < config["batch_size"]:
                    continue  # whole batches only, as the plain arm
                yield collate(rows)
                produced += 1
                if produced == config["steps"] + 1:
                    return

    seconds, timed = timed_steps(model, batches(), optimizer, scheduler, device())
    # Result.metrics only carries metrics reported with a checkpoint (Ray Train V2).
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "timing.json"), "w") as handle:
            json.dump({"train_s": seconds}, handle)
        ray.train.report({"train_s": seconds, "steps": timed}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_arm(args, backbone: str, dataset, steps: int, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            ray_loop,
            train_loop_config={"backbone": backbone, "batch_size": args.batch_size, "steps": steps // workers,
                               "cache_shard_rows": args.cache_shard_rows},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": args.cpus / workers}),
            run_config=RunConfig(name=f"bench-{workers}", storage_path=storage),
            datasets={"train": dataset},
        )
        start = time.perf_counter()
        result = trainer.fit()
        total = time.perf_counter() - start
    metrics = result.metrics or {}
    train_s = metrics.get("train_s")
    if train_s is None:
        raise RuntimeError("the Ray arm reported no train_s; see the worker logs")
    return {"train_s": train_s, "steps": metrics["steps"], "total_s": total, "startup_s": total - train_s,
            "workers": workers, "step_s": train_s / metrics["steps"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cache_shard_rows is None:
        from jobs._train import RayTrainConfig

        args.cache_shard_rows = RayTrainConfig().cache_shard_rows
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pyarrow.parquet as pq
    import ray

    backbone = args.backbone
    if backbone is None:
        from tmr_core.tiny_models import ensure_tiny_models

        backbone = ensure_tiny_models()["mde_backbone"]
    corpus = args.corpus
    if corpus is None:
        from tmr_core.synthetic import make_synthetic_benchmark, preset

        corpus = os.path.join(tempfile.mkdtemp(prefix="bench-train-"), "bench")
        make_synthetic_benchmark(corpus, preset("tiny", seed=0))
        corpus = os.path.join(corpus, "mde")
    rows = pq.read_table(os.path.join(corpus, "train.parquet")).to_pylist()

    # Calibrate the step count so each arm trains for >= min_train_seconds.
    probe = plain_arm(args, backbone, rows, 3)
    steps = 3 if args.smoke_test else max(4, math.ceil(args.min_train_seconds / probe["step_s"]))
    steps += steps % 2  # even, so 2 workers split it exactly
    print(f"[bench_train] {steps} steps of batch {args.batch_size} per arm (probe {probe['step_s']:.3f} s/step)")

    plain = plain_arm(args, backbone, rows, steps)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    dataset = ray.data.from_items(rows).materialize()
    one = ray_arm(args, backbone, dataset, steps, 1)
    two = ray_arm(args, backbone, dataset, steps, 2) if args.cpus >= 2 else None
    ray.shutdown()

    report = {
        "backbone": backbone, "device": args.device, "batch_size": args.batch_size, "cpus": args.cpus,
        "steps": steps, "cache_shard_rows": args.cache_shard_rows, "plain": plain, "ray_1_worker": one, "ray_2_workers": two,
        "ratio_ray1_vs_plain_train": one["train_s"] / plain["train_s"],
        "ratio_ray1_vs_plain_total": one["total_s"] / plain["train_s"],
        "ratio_ray2_vs_ray1_train": (two["train_s"] / one["train_s"]) if two else None,
        "smoke_test": args.smoke_test,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"[bench_train] plain loop      : {plain['train_s']:.1f} s train ({plain['step_s']:.3f} s/step)")
    print(f"[bench_train] Ray Train 1 wkr : {one['train_s']:.1f} s train + {one['startup_s']:.1f} s startup")
    if two:
        print(f"[bench_train] Ray Train 2 wkr : {two['train_s']:.1f} s train + {two['startup_s']:.1f} s startup "
              f"(each worker {steps // 2} steps, {args.cpus / 2:g} CPU)")
    print(f"[bench_train] ratio Ray-1 / plain (training) = {report['ratio_ray1_vs_plain_train']:.3f}  (goal <= 1.10)")
    if two:
        print(f"[bench_train] ratio Ray-2 / Ray-1 (training, same total steps) = {report['ratio_ray2_vs_ray1_train']:.3f}")
    print(f"[bench_train] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
