"""Build the tiny, seeded models every tiny config loads (BERT, ResNet, Stable Diffusion, OWL-ViT, ViLT).

    python -m jobs.make_tiny_models --out .cache/tmr-models [--force true]

Each model is made from its library config with a fixed seed and saved with ``save_pretrained``,
so jobs load it with ``from_pretrained(path)`` exactly as they load a hub checkpoint; the
tokenizers are trained offline on the synthetic benchmark's text. A rerun with the same spec does
nothing (a stamp holds the spec's hash). See :mod:`tmr_core.tiny_models` for the table of tiny
models beside the full-size models the paper configs name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from jobs._config import opt, parse_config, print_config, run_main, save_config

JOB = "make_tiny_models"


@dataclass
class Config:
    """Build the tiny models into a cache folder (git-ignored)."""

    out: str = opt(".cache/tmr-models", "Folder to write; one sub-folder per model.")
    force: bool = opt(False, "Rebuild even when the stamp says the folder matches the build spec.")
    seed: int = opt(0, "Seed of every model's initial weights.")
    scheduler: str = opt("EulerDiscreteScheduler", "diffusers scheduler class of the text-to-image pipeline (TMR: Euler).")

    def __post_init__(self) -> None:
        if not self.scheduler.endswith("Scheduler"):
            raise ValueError(f"scheduler: expected a diffusers scheduler class name such as EulerDiscreteScheduler, got {self.scheduler!r}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    from tmr_core.tiny_models import TinyModelSpec, ensure_tiny_models, folder_size_bytes

    start = time.perf_counter()
    paths = ensure_tiny_models(cfg.out, TinyModelSpec(seed=cfg.seed, scheduler=cfg.scheduler), force=cfg.force)
    save_config(cfg, cfg.out, name=f"{JOB}.yaml")
    total = 0
    for key, path in paths.items():
        size = folder_size_bytes(path)
        total += size
        print(f"[{JOB}] {key:14s} {size / 1e6:6.2f} MB  {path}")
    print(f"[{JOB}] {total / 1e6:.1f} MB in all, ready in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
