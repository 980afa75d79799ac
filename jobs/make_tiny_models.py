"""Build the tiny, seeded models every tiny config loads (BERT, ResNet, Stable Diffusion, OWL-ViT, ViLT).

    python -m jobs.make_tiny_models --out .cache/tmr-models [--force true]
    python -m jobs.make_tiny_models --size paper --out .cache/tmr-models-paper   # full-size, random weights (~5.9 GB)

Each model is made from its library config with a fixed seed and saved with ``save_pretrained``,
so jobs load it with ``from_pretrained(path)`` exactly as they load a hub checkpoint; the
tokenizers are trained offline on the synthetic benchmark's text. A rerun with the same spec does
nothing (a stamp holds the spec's hash). See :mod:`tmr_core.tiny_models` for the table of tiny
models beside the full-size models the paper configs name. ``--size paper`` writes the same five
folders with the paper models' architectures (bert-base, ResNet-50, SD v1.5 at a small
resolution, OWL-ViT B/32, ViLT-B/32), random-initialised, for benchmarks that need real compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from jobs._config import opt, parse_config, print_config, run_main, save_config

JOB = "make_tiny_models"


@dataclass
class Config:
    """Build the tiny (or paper-size) models into a cache folder (git-ignored)."""

    size: Literal["tiny", "paper"] = opt("tiny", "tiny: seconds, 8 MB; paper: the paper models' architectures, random weights (~5.9 GB).")
    out: str = opt("", "Folder to write, one sub-folder per model; empty: .cache/tmr-models (tiny) or .cache/tmr-models-paper (paper).")
    force: bool = opt(False, "Rebuild even when the stamp says the folder matches the build spec.")
    seed: int = opt(0, "Seed of every model's initial weights.")
    scheduler: str = opt("EulerDiscreteScheduler", "diffusers scheduler class of the text-to-image pipeline (TMR: Euler).")

    def __post_init__(self) -> None:
        from pathlib import Path

        from tmr_core.tiny_models import DEFAULT_CACHE_DIRS, MODEL_SIZES

        problems = []
        if not self.scheduler.endswith("Scheduler"):
            problems.append(f"scheduler: expected a diffusers scheduler class name such as EulerDiscreteScheduler, got {self.scheduler!r}")
        if self.size not in MODEL_SIZES:
            problems.append(f"size: expected one of {list(MODEL_SIZES)}, got {self.size!r}")
        else:
            self.out = self.out or DEFAULT_CACHE_DIRS[self.size]
            # one size's build replaces the other's folders: refuse the other size's default cache
            for other, folder in DEFAULT_CACHE_DIRS.items():
                if other != self.size and Path(self.out).resolve() == Path(folder).resolve():
                    problems.append(f"out: {self.out} is the {other} models' cache; write {self.size} models to "
                                    f"{DEFAULT_CACHE_DIRS[self.size]} (or another folder)")
        if problems:
            raise ValueError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    from tmr_core.tiny_models import ensure_tiny_models, folder_size_bytes, spec_for_size

    start = time.perf_counter()
    spec = spec_for_size(cfg.size, seed=cfg.seed, scheduler=cfg.scheduler)
    paths = ensure_tiny_models(cfg.out, spec, force=cfg.force)
    save_config(cfg, cfg.out, name=f"{JOB}.yaml")
    total = 0
    for key, path in paths.items():
        size = folder_size_bytes(path)
        total += size
        print(f"[{JOB}] {key:14s} {size / 1e6:9.2f} MB  {path}")
    print(f"[{JOB}] {cfg.size} models: {total / 1e6:.1f} MB in all, ready in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
