"""Generate the back-translation v' of every sentence with a text-to-image diffusion model (Eq. 3).

    python -m jobs.generate_back_translations --config configs/generate_back_translations.yaml \\
        --input outputs/phrases --output outputs/back_translations

Reads each split table, prompts the pipeline with ``' '.join(tokens)`` and the base seed (or, with
``generation.seed_per_sample``, a seed derived from the sample id), and adds
``back_translation_uri`` / ``back_translation_error``. Images are content-addressed under
``cache_uri`` (see :mod:`tmr_core.back_translation`), so a rerun, a resumed job and the server
reuse what exists. The pipeline is a hub name, a folder (e.g. ``jobs.finetune_text_to_image``'s
``<output>/model``) or ``models:/tmr-t2i@champion``; its identity (a content hash of its files, see
:func:`tmr_core.back_translation.pipeline_identity`) is in every cache key and in the stage's
fingerprint, computed once here in the driver, so a retrained pipeline never reuses the old one's
images or output. A cached file that does not decode (truncated, half-copied) is not reused: it
is regenerated over and counted in the summary as ``regenerated_corrupt``.

Two passes: Ray tasks first look every row up in the cache (no model); only when some image is
missing does a pool of actors (one pipeline each) generate them. The pool grows and shrinks with
the cluster's GPUs; a killed actor restarts and its batch is retried. A fully cached rerun starts
no actor and loads no pipeline.
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
    worker_env,
    write_splits,
    write_success_marker,
)

JOB = "generate_back_translations"
# rows per cache look-up task: existence checks are cheap, so fewer, larger tasks
LOOK_UP_ROWS_PER_TASK = 1024


@dataclass
class GenerationConfig:
    """The diffusion pipeline and its sampling settings (all but dtype/device are in the cache key)."""

    model: str = opt(
        "stabilityai/stable-diffusion-2",
        "diffusers pipeline: hub name, folder with model_index.json, or models:/tmr-t2i@champion (jobs.finetune_text_to_image).",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    scheduler: str | None = opt("EulerDiscreteScheduler", "diffusers scheduler class; null keeps the pipeline's.")
    steps: int = opt(50, "Denoising steps.")
    guidance_scale: float = opt(7.5, "Classifier-free guidance scale.")
    height: int = opt(768, "Image height in pixels (multiple of 8).")
    width: int = opt(768, "Image width in pixels (multiple of 8).")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "Pipeline dtype (float16 on GPUs).")
    device: str = opt("cpu", "torch device of each actor: cpu or cuda.")
    seed: int = opt(0, "Base seed: every prompt's, or the one per-sample seeds derive from.")
    seed_per_sample: bool = opt(
        False, "Derive each sample's seed from its id; default: one seed, so the image depends on the text alone."
    )


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
    tracking_uri: str | None = opt(
        None, "MLflow tracking URI for a models:/ generation.model; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )


CONTENT_HASH_TAG = "tmr.content_hash"  # set by jobs.finetune_text_to_image on the registered version


def resolve_registered(uri: str, tracking_uri: str | None) -> str:
    """A ``models:/`` pipeline downloaded to a local folder (``jobs._tracking.resolve_model_uri``)."""
    import mlflow

    from jobs._tracking import resolve_model_uri, resolve_tracking_uri

    resolved = resolve_tracking_uri(tracking_uri)
    # download_artifacts resolves models:/ with the global registry URI, not its tracking_uri argument
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolve_model_uri(uri, tracking_uri=resolved)


def model_identity(generation: GenerationConfig, tracking_uri: str | None) -> str:
    """The pipeline's cache identity, once per job: a folder's content hash, a hub name@revision, or
    for ``models:/`` the registered version's ``tmr.content_hash`` tag (the files' hash, no
    download), else the hash of its downloaded files."""
    from tmr_core.back_translation import pipeline_identity

    if not generation.model.startswith("models:/"):
        return pipeline_identity(generation.model, generation.revision)
    from mlflow import MlflowClient

    from jobs._tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    name_ref = generation.model[len("models:/"):]
    if "@" in name_ref:
        version = client.get_model_version_by_alias(*name_ref.split("@", 1))
    else:
        version = client.get_model_version(*name_ref.split("/", 1))
    tag = (version.tags or {}).get(CONTENT_HASH_TAG)
    return tag or pipeline_identity(resolve_registered(generation.model, tracking_uri))


def _settings(generation: GenerationConfig, identity: str | None = None, model: str | None = None) -> Any:
    from tmr_core.back_translation import GenerationSettings

    return GenerationSettings(
        model=model or generation.model,
        model_identity=identity,
        revision=generation.revision,
        scheduler=generation.scheduler,
        steps=generation.steps,
        guidance_scale=generation.guidance_scale,
        height=generation.height,
        width=generation.width,
        dtype=generation.dtype,
        device=generation.device,
    )


def _prompts_and_seeds(batch: Any, generation: GenerationConfig) -> tuple[list[str], list[int]]:
    """As jobs.predict and Serve derive them (:func:`tmr_core.inference.prompts_and_seeds`)."""
    from tmr_core.inference import prompts_and_seeds

    rows = [{"id": i, "tokens": t} for i, t in zip(batch.column("id").to_pylist(), batch.column("tokens").to_pylist(),
                                                    strict=True)]
    return prompts_and_seeds(rows, generation.seed, generation.seed_per_sample)


def _with_results(batch: Any, results: list, node_id: str | None = None) -> Any:
    """The batch plus this stage's columns. From the look-up (``node_id`` None), ``None`` results
    are rows still to generate; from a generating actor, ``node_id`` says where the rows ran."""
    counts = {"_stat_to_generate": [int(r is None) for r in results]} if node_id is None else {
        "_stat_rows_per_node": [node_id] * len(results)}
    return add_columns(batch, JOB, {
        "back_translation_uri": [r.uri if r else None for r in results],
        "back_translation_error": [r.error if r else None for r in results],
        "_stat_generated": [int(r is not None and r.uri is not None and not r.cached) for r in results],
        "_stat_cached": [int(r is not None and r.cached) for r in results],
        "_stat_failed": [int(r is not None and r.error is not None) for r in results],
        "_stat_regenerated_corrupt": [int(r is not None and r.regenerated_corrupt) for r in results],
        **counts,
    })


def look_up_cached(batch: Any, generation: GenerationConfig, cache_uri: str, storage: StorageConfig,
                   identity: str, tracking_uri: str | None = None) -> Any:
    """Ray Data task: fill in the rows whose image is already cached and decodes (or whose prompt
    is bad); a cached file that does not decode leaves its row to the generators."""
    from tmr_core.back_translation import BackTranslator

    translator = BackTranslator(_settings(generation, identity), cache_uri, storage.options())
    return _with_results(batch, translator.look_up(*_prompts_and_seeds(batch, generation)))


def _count_to_generate(looked_up: Any) -> int:
    """Rows the look-up left for the generators: one number per block comes back to the driver
    (``Dataset.sum`` would start a hash-shuffle aggregation, ~3 s on a small cluster)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def count(block: Any) -> Any:
        return pa.table({"n": [pc.sum(block.column("_stat_to_generate")).as_py() or 0]})

    return sum(row["n"] for row in looked_up.map_batches(count, batch_format="pyarrow", batch_size=None).take_all())


class GenerateBackTranslations:
    """Ray Data callable: one pipeline per actor, a batch of rows in, the same rows plus
    ``back_translation_uri``/``back_translation_error`` out."""

    def __init__(self, generation: GenerationConfig, cache_uri: str, storage: StorageConfig, identity: str,
                 tracking_uri: str | None = None):
        import ray

        from tmr_core.back_translation import BackTranslator

        self.generation = generation
        # a registered pipeline is downloaded by each actor (the pool only starts when an image is
        # missing); the cache key keeps the driver's identity, so it does not depend on the path
        model = resolve_registered(generation.model, tracking_uri) if generation.model.startswith("models:/") else None
        # the pipeline loads on the first cache miss, once per actor
        self.translator = BackTranslator(_settings(generation, identity, model), cache_uri, storage.options())
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Any) -> Any:
        # every row again, not only the misses: an image another actor wrote since the look-up
        # is a cache hit, and the stats then describe this run's final outcome per row
        results = self.translator(*_prompts_and_seeds(batch, self.generation))
        return _with_results(batch, results, self.node_id)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    options = cfg.storage.options()
    splits = present_splits(cfg.input, cfg.splits, options, output=cfg.output)
    identity = model_identity(cfg.generation, cfg.tracking_uri)
    print(f"[{JOB}] pipeline {cfg.generation.model}: identity {identity}")
    stage_fingerprint = fingerprint(JOB, cfg, cfg.input, splits, options, extra={"pipeline": identity})
    if not cfg.force and is_up_to_date(cfg.output, stage_fingerprint, options):
        print(f"[{JOB}] {cfg.output} is up to date (same config and input); nothing to do. --force true reruns it.")
        return 0

    init_ray()
    start = time.perf_counter()
    worker_kwargs = {"generation": cfg.generation, "cache_uri": cfg.cache_uri, "storage": cfg.storage,
                     "identity": identity, "tracking_uri": cfg.tracking_uri}
    looked_up = read_splits(cfg.input, splits, options, rows_per_block=LOOK_UP_ROWS_PER_TASK).map_batches(
        look_up_cached, fn_kwargs=worker_kwargs, batch_format="pyarrow", batch_size=None,
        **worker_env(cfg.input, cfg.cache_uri),
    ).materialize()
    to_generate = _count_to_generate(looked_up)
    print(f"[{JOB}] {to_generate} of {looked_up.count()} rows need an image (the others are cached or have no "
          "usable prompt; a cached image that does not decode counts as needed)")
    ds = looked_up
    if to_generate:
        ds = looked_up.repartition(target_num_rows_per_block=cfg.compute.batch_size).map_batches(
            GenerateBackTranslations, fn_constructor_kwargs=worker_kwargs,
            **actor_pool_args(cfg.compute, cfg.input, cfg.output, cfg.cache_uri),
        )
    rows, stats = write_splits(ds, cfg.output, splits, options)
    seconds = time.perf_counter() - start

    summary = {**stats, "seconds": round(seconds, 3), "images_per_s": round(stats.get("generated", 0) / seconds, 3)}
    save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, rows, stage_fingerprint, summary, options)
    print(
        f"[{JOB}] rows {rows} | generated {stats.get('generated', 0)} | cached {stats.get('cached', 0)} | "
        f"failed {stats.get('failed', 0)} | regenerated corrupt {stats.get('regenerated_corrupt', 0)} | "
        f"{summary['images_per_s']:.2f} images/s over {seconds:.1f}s | "
        f"rows per node {stats.get('rows_per_node', {})}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
