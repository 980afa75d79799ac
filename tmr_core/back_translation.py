"""Generative back-translation (Eq. 3): an image v' generated from the text t.

TMR treats the sentence as a translation of its image and back-translates it with a text-to-image
diffusion model, v' = argmax_v̂ p(v̂ | t) approximated by one sample of Stable Diffusion prompted
with ``' '.join(tokens)``. This module holds everything except the cluster wiring, so the Ray Data
job (``jobs.generate_back_translations``) and the server share one code path and one image cache:

- :func:`generation_seed` picks each prompt's seed: by default the base seed for every prompt, so
  v' depends on the text alone (Eq. 3's p(v̂ | t)): identical texts share one cached image and the
  server's back-translation of a sentence is the batch job's. Per-sample seeds
  (:func:`sample_seed`, from the sample id) are an option; they add per-sample noise the text does
  not explain, which an extractor can memorise (an untrained tiny pipeline's images differ almost
  only by their seed);
- :func:`cache_key` hashes (pipeline identity, scheduler, steps, guidance, size, seed, prompt); the
  pipeline's identity (:func:`pipeline_identity`) is a content hash of a local pipeline folder's
  files, so a pipeline retrained into the same folder (``jobs.finetune_text_to_image``) never
  reuses the old pipeline's images, and a hub name with its revision otherwise; the image lives
  at ``<cache_uri>/<key[:2]>/<key>.png`` and an existing file that decodes
  (:func:`cached_image_decodes`) is reused, never regenerated; one that does not (a truncated
  upload, a disk full mid-copy) is a miss and is regenerated over, atomically;
- :class:`BackTranslator` loads a diffusers pipeline by name or path and turns a batch of
  (prompt, seed) into per-sample :class:`BackTranslation` results; a sample that fails (bad prompt,
  out of memory) gets an ``error`` and no image, the rest of the batch still comes out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tmr_core import storage

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class GenerationSettings:
    """What determines a generated image, besides its prompt and seed.

    Args:
        model: diffusers pipeline name on the hub or a local/remote folder (``model_index.json``).
        revision: hub revision (branch, tag or commit); part of the cache key.
        scheduler: a diffusers scheduler class name (e.g. ``EulerDiscreteScheduler``) built with
            ``from_config`` from the pipeline's own scheduler config; ``None`` keeps the pipeline's.
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale (≤ 1 disables guidance).
        height, width: output size in pixels (multiples of 8 for Stable Diffusion).
        dtype, device: where the pipeline runs; not part of the cache key (fp16 and fp32 images
            of one prompt are the same back-translation for the method).
        model_identity: what the cache key holds for the pipeline (:func:`pipeline_identity`);
            ``None``: computed from ``model`` by :class:`BackTranslator` (once) or :func:`cache_key`.
            A caller that resolved ``model`` from elsewhere (``models:/``) passes the identity of
            the files it resolved to.

    Raises:
        ValueError: naming the field that is out of range.
    """

    model: str
    revision: str | None = None
    scheduler: str | None = None
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    model_identity: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("model: must name a diffusers pipeline (hub name or folder)")
        if self.steps < 1:
            problems.append(f"steps: must be ≥ 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                problems.append(f"{name}: must be a positive multiple of 8, got {value}")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype: must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("invalid GenerationSettings: " + "; ".join(problems))


@dataclass
class BackTranslation:
    """One sample's outcome: the image's URI, or an error; ``cached`` when a decodable file
    existed; ``regenerated_corrupt`` when the cached file did not decode and was replaced."""

    uri: str | None
    error: str | None
    cached: bool
    regenerated_corrupt: bool = False


def prompt_from_tokens(tokens: Sequence[str]) -> str:
    """The prompt TMR feeds to the diffusion model: the sentence's tokens joined by spaces."""
    return " ".join(str(t) for t in tokens)


def sample_seed(sample_id: str, base_seed: int = 0) -> int:
    """A seed in [0, 2**31) from a sample id: stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{base_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def generation_seed(sample_id: str | None, prompt: str, base_seed: int = 0, per_sample: bool = False) -> int:
    """The seed one prompt is sampled with: ``base_seed``, or a per-sample one (the id, else the prompt)."""
    return sample_seed(sample_id or prompt, base_seed) if per_sample else int(base_seed)


# the files of a diffusers pipeline folder that shape its images (weights, configs, tokenizer)
_PIPELINE_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth", ".msgpack")


def pipeline_identity(model: str, revision: str | None = None) -> str:
    """What a pipeline is, for the cache key: ``sha256:<hex>`` over a local folder's weight,
    config and tokenizer files (relative path and content of each), or ``hub:<name>@<revision>``.

    A folder's content, not its path, names it: retraining into the same folder gives new keys,
    and the same weights reached by another path (a ``models:/`` download) share the cached
    images. Hashing reads every file once (~1 s per GB); call it once per process.

    Raises:
        ValueError: a local folder holds no pipeline file.
    """
    if not os.path.isdir(model):
        return f"hub:{model}@{revision}"
    digest = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(root, name), model).replace(os.sep, "/")
                   for root, _, names in os.walk(model) for name in names
                   if name.endswith(_PIPELINE_FILE_SUFFIXES) and not name.startswith("."))
    if not files:
        raise ValueError(f"model: {model} holds no pipeline file (model_index.json, *.safetensors, …)")
    for relative in files:
        file_digest = hashlib.sha256()
        with open(os.path.join(model, relative), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(f"{relative}\0{file_digest.hexdigest()}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def with_identity(settings: GenerationSettings) -> GenerationSettings:
    """``settings`` with ``model_identity`` filled in (computed from ``model`` when missing)."""
    if settings.model_identity is not None:
        return settings
    return dataclasses.replace(settings, model_identity=pipeline_identity(settings.model, settings.revision))


def cache_key(settings: GenerationSettings, seed: int, prompt: str) -> str:
    """The content address of one generated image: sha256 over everything that shapes it.

    The pipeline enters by its identity (:func:`pipeline_identity`), not its path; settings
    without ``model_identity`` hash the folder on every call (use :func:`with_identity` first).
    """
    fields = {
        "model": settings.model_identity or pipeline_identity(settings.model, settings.revision),
        "scheduler": settings.scheduler,
        "steps": settings.steps,
        "guidance_scale": float(settings.guidance_scale),
        "size": [settings.height, settings.width],
        "seed": int(seed),
        "prompt": prompt,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def cache_uri_for(cache_uri: str, key: str) -> str:
    """``<cache_uri>/<key[:2]>/<key>.png``: a two-character fan-out keeps folders small."""
    return storage.join(cache_uri, key[:2], f"{key}.png")


def image_decodes(data: bytes) -> bool:
    """Whether encoded image bytes decode completely (a truncated PNG opens but fails to load)."""
    from tmr_core.images import check_decodes

    try:
        check_decodes(data, "cached image")
    except ValueError:
        return False
    return True


def cached_image_decodes(uri: str, options: storage.StorageOptions | None = None) -> bool:
    """Whether the cached file at ``uri`` can be read and decodes: only such a file is a cache hit.

    Reading and decoding the whole file costs a few milliseconds for a 512 px PNG, little next to
    the model steps that would otherwise fail on it (and far less than a generation).
    """
    try:
        data = storage.read_bytes(uri, options)
    except (OSError, ValueError):  # vanished since it was listed, or not a file
        return False
    return image_decodes(data)


def load_pipeline(settings: GenerationSettings) -> Any:
    """A diffusers pipeline by name or path, on ``settings.device`` in ``settings.dtype``.

    Raises:
        ValueError: when ``settings.scheduler`` is not a diffusers scheduler class.
    """
    import diffusers
    import torch

    pipeline = diffusers.DiffusionPipeline.from_pretrained(
        settings.model, revision=settings.revision, dtype=getattr(torch, settings.dtype)
    )
    if settings.scheduler:
        scheduler_cls = getattr(diffusers, settings.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise ValueError(
                f"scheduler: {settings.scheduler!r} is not a diffusers scheduler class "
                "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler)"
            )
        pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(settings.device)


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image (lossless, so a cached image equals the generated one)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class BackTranslator:
    """Back-translates batches of prompts into cached PNG files (Eq. 3).

    Args:
        settings: the pipeline and sampling settings (part of every cache key); a missing
            ``model_identity`` is computed here, once.
        cache_uri: folder (local or ``s3://``) holding ``<key[:2]>/<key>.png``.
        storage_options: endpoint for S3-compatible stores.
        pipeline: an already-built diffusers pipeline (tests, the server); loaded lazily from
            ``settings`` on the first cache miss otherwise, so a fully cached rerun loads nothing.
    """

    def __init__(
        self,
        settings: GenerationSettings,
        cache_uri: str,
        storage_options: storage.StorageOptions | None = None,
        pipeline: Any = None,
    ):
        self.settings = with_identity(settings)
        self.cache_uri = cache_uri
        self.storage_options = storage_options
        self._pipeline = pipeline

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.settings)
        return self._pipeline

    def uri_for(self, prompt: str, seed: int) -> str:
        return cache_uri_for(self.cache_uri, cache_key(self.settings, seed, prompt))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        """Run the pipeline once on a batch; one ``torch.Generator`` per sample keeps each image
        independent of its batch mates. Returns PIL images, one per prompt."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"prompts and seeds differ in length: {len(prompts)} vs {len(seeds)}")
        generator_device = "cpu" if self.settings.device == "mps" else self.settings.device
        generators = [torch.Generator(generator_device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            output = self.pipeline(
                prompt=list(prompts),
                num_inference_steps=self.settings.steps,
                guidance_scale=self.settings.guidance_scale,
                height=self.settings.height,
                width=self.settings.width,
                generator=generators,
                output_type="pil",
            )
        return list(output.images)

    def look_up(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[BackTranslation | None]:
        """What a batch would give without running the pipeline: the cached image, an error for a
        bad prompt, or ``None`` where an image must be generated.

        Raises:
            ValueError: ``prompts`` and ``seeds`` differ in length.
        """
        return self._look_up_with_corrupt(prompts, seeds)[0]

    def _look_up_with_corrupt(self, prompts: Sequence[str], seeds: Sequence[int]
                              ) -> tuple[list[BackTranslation | None], list[bool]]:
        """:meth:`look_up`'s results, and per sample whether a cached file existed but did not decode."""
        if len(prompts) != len(seeds):
            raise ValueError(f"prompts and seeds differ in length: {len(prompts)} vs {len(seeds)}")
        results: list[BackTranslation | None] = []
        corrupt: list[bool] = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            if not isinstance(prompt, str) or not prompt.strip():
                results.append(BackTranslation(None, f"bad prompt: expected a non-empty sentence, got {prompt!r}", False))
                corrupt.append(False)
                continue
            uri = self.uri_for(prompt, seed)
            present = storage.exists(uri, self.storage_options)
            hit = present and cached_image_decodes(uri, self.storage_options)
            results.append(BackTranslation(uri, None, True) if hit else None)
            corrupt.append(present and not hit)
        return results, corrupt

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[BackTranslation]:
        """Back-translate a batch: reuse cached images, generate the rest, write them atomically.

        Args:
            prompts: B sentences (``prompt_from_tokens``).
            seeds: B per-sample seeds (``sample_seed``).

        Returns:
            B results in input order; a failed sample has ``uri=None`` and an ``error``.
        """
        results, corrupt = self._look_up_with_corrupt(prompts, seeds)
        todo = [i for i, result in enumerate(results) if result is None]
        outcomes = self._generate_isolating_failures([prompts[i] for i in todo], [seeds[i] for i in todo])
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, str):
                results[i] = BackTranslation(None, outcome, False)
                continue
            uri = self.uri_for(prompts[i], seeds[i])
            # temp file + rename: a reader sees the corrupt file or the new one, never half of it
            storage.write_bytes_atomic(uri, encode_png(outcome), self.storage_options)
            results[i] = BackTranslation(uri, None, False, regenerated_corrupt=corrupt[i])
        return results  # type: ignore[return-value]

    def _generate_isolating_failures(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        """Images for a batch; if the batch fails, retry one by one so only the culprit fails.

        Returns a PIL image or an error string per sample.
        """
        if not prompts:
            return []
        try:
            return self.generate(prompts, seeds)
        except Exception as exc:  # a bad sample or OOM must not sink its batch mates
            _free_accelerator_memory()
            if len(prompts) == 1:
                return [f"{type(exc).__name__}: {exc}"[:500]]
        outcomes: list[Any] = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            outcomes.extend(self._generate_isolating_failures([prompt], [seed]))
        return outcomes


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
