"""Generate the back-translation v' of every sentence with a text-to-image diffusion model (Eq. 3).

    python -m jobs.generate_back_translations --config configs/generate_back_translations.yaml \\
        --input outputs/phrases --output outputs/back_translations

Reads each split table, prompts the pipeline with ``' '.join(tokens)`` and a seed derived from the
sample id, and adds ``back_translation_uri`` / ``back_translation_error``. Images are
content-addressed under ``cache_uri`` (see :mod:`tmr_core.back_translation`), so a rerun, a resumed
job and the server reuse what exists. A pool of actors (one pipeline each) grows and shrinks with
the cluster's GPUs; a killed actor restarts and its batch is retried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from jobs._common import StorageConfig
from jobs._config import opt, parse_config, print_config, run_main, save_config
from jobs._data import (
    ComputeConfig,
    actor_pool_args,
    add_columns,
    fingerprint,
    init_ray,
    is_up_to_date,
    present_splits,
    read_splits,
    write_splits,
    write_success_marker,
)

JOB = "generate_back_translations"


@dataclass
class GenerationConfig:
    """The diffusion pipeline and its sampling settings (all but dtype/device are in the cache key)."""

    model: str = opt("stabilityai/stable-diffusion-2", "diffusers pipeline: hub name or folder with model_index.json.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    scheduler: str | None = opt("EulerDiscreteScheduler", "diffusers scheduler class; null keeps the pipeline's.")
    steps: int = opt(50, "Denoising steps.")
    guidance_scale: float = opt(7.5, "Classifier-free guidance scale.")
    height: int = opt(768, "Image height in pixels (multiple of 8).")
    width: int = opt(768, "Image width in pixels (multiple of 8).")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "Pipeline dtype (float16 on GPUs).")
    device: str = opt("cpu", "torch device of each actor: cpu or cuda.")
    seed: int = opt(0, "Base seed; each sample's seed is derived from it and the sample id.")


@dataclass
class Config:
    """Diffusion back-translation of every sentence (TMR Eq. 3)."""

    input: str = opt("outputs/phrases", "Dataset folder (local or s3://) with <split>.parquet or <split>/.")
    output: str = opt("outputs/back_translations", "Dataset folder to write <split>/, config.yaml, _SUCCESS.json.")
    cache_uri: str = opt("outputs/cache/back_translations", "Image cache: <cache_uri>/<key[:2]>/<key>.png.")
    splits: list[str] = opt(["train", "valid", "test"], "Splits to process (those present are read).")
    force: bool = opt(False, "Run even when the output's _SUCCESS.json matches this config and input.")
    generation: GenerationConfig = opt(GenerationConfig, "The diffusion pipeline.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool, batch size and accelerators.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")


class GenerateBackTranslations:
    """Ray Data callable: one pipeline per actor, a batch of rows in, the same rows plus
    ``back_translation_uri``/``back_translation_error`` out."""

    def __init__(self, generation: GenerationConfig, cache_uri: str, storage: StorageConfig):
        import ray

        from tmr_core.back_translation import BackTranslator, GenerationSettings

        settings = GenerationSettings(
            model=generation.model,
            revision=generation.revision,
            scheduler=generation.scheduler,
            steps=generation.steps,
            guidance_scale=generation.guidance_scale,
            height=generation.height,
            width=generation.width,
            dtype=generation.dtype,
            device=generation.device,
        )
        self.base_seed = generation.seed
        # the pipeline loads on the first cache miss, once per actor: a fully cached rerun loads nothing
        self.translator = BackTranslator(settings, cache_uri, storage.options())
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Any) -> Any:
        from tmr_core.back_translation import prompt_from_tokens, sample_seed

        prompts = [prompt_from_tokens(tokens or []) for tokens in batch.column("tokens").to_pylist()]
        seeds = [sample_seed(sample_id, self.base_seed) for sample_id in batch.column("id").to_pylist()]
        results = self.translator(prompts, seeds)
        return add_columns(batch, JOB, {
            "back_translation_uri": [r.uri for r in results],
            "back_translation_error": [r.error for r in results],
            "_stat_generated": [int(r.uri is not None and not r.cached) for r in results],
            "_stat_cached": [int(r.cached) for r in results],
            "_stat_failed": [int(r.error is not None) for r in results],
            "_stat_rows_per_node": [self.node_id] * len(results),
        })


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    options = cfg.storage.options()
    splits = present_splits(cfg.input, cfg.splits, options)
    stage_fingerprint = fingerprint(JOB, cfg, cfg.input, splits, options)
    if not cfg.force and is_up_to_date(cfg.output, stage_fingerprint, options):
        print(f"[{JOB}] {cfg.output} is up to date (same config and input); nothing to do. --force true reruns it.")
        return 0

    init_ray()
    start = time.perf_counter()
    ds = read_splits(cfg.input, splits, options, rows_per_block=cfg.compute.batch_size).map_batches(
        GenerateBackTranslations,
        fn_constructor_kwargs={"generation": cfg.generation, "cache_uri": cfg.cache_uri, "storage": cfg.storage},
        **actor_pool_args(cfg.compute, cfg.input, cfg.output, cfg.cache_uri),
    )
    rows, stats = write_splits(ds, cfg.output, splits, options)
    seconds = time.perf_counter() - start

    summary = {**stats, "seconds": round(seconds, 3), "images_per_s": round(stats.get("generated", 0) / seconds, 3)}
    save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, rows, stage_fingerprint, summary, options)
    print(
        f"[{JOB}] rows {rows} | generated {stats.get('generated', 0)} | cached {stats.get('cached', 0)} | "
        f"failed {stats.get('failed', 0)} | {summary['images_per_s']:.2f} images/s over {seconds:.1f}s | "
        f"rows per node {stats.get('rows_per_node', {})}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
