"""The model deployments of the TMR application, one per step of the composite model.

Each deployment wraps one ``tmr_core`` component and loads it once, in ``__init__`` (never at
import time). Model-holding deployments group concurrent requests with ``@serve.batch``; the batch
size and wait come from the app args (``set_max_batch_size`` / ``set_batch_wait_timeout_s``).
Each batched step is ``<step>`` (one request, what handles call) → ``_<step>_batch`` (Serve's
batching) → ``<step>_many`` (plain code on a list, what the in-process baseline calls).
One bad request never fails its batch mates, in two ways: a request's own problems (too long
for the model, an image the models cannot take) are found before it joins a batch (here and in
the ingress) and come back as :class:`serve.schemas.InputError`; and whatever still fails inside
a batch is isolated by :func:`tmr_core.inference.answer_each` (the batch again item by item), so every good item gets
its answer and the bad one's exception is raised to its own caller only.

Each wraps the step of :mod:`tmr_core.inference` that ``jobs.predict`` and the stage jobs wrap
too, so a request, a prediction and a table row get the same answer.

Models load from an MLflow model URI (``models:/tmr-ner@champion``), a checkpoint folder or an
``s3://`` prefix, always through ``from_pretrained`` (config + safetensors, nothing unpickled).

| deployment          | wraps                                   | paper          |
|---------------------|-----------------------------------------|----------------|
| PhraseParser        | tmr_core.inference.PhraseStep           | §3.2, T^p      |
| Grounder            | tmr_core.inference.GroundingStep        | §3.2, V^r      |
| BackTranslator      | tmr_core.back_translation.BackTranslator| Eq. 3          |
| DivergenceEstimator | tmr_core.inference.DivergenceStep       | Eq. 4-6        |
| Extractor (NER, RE) | tmr_core.inference.ExtractionStep       | Eq. 1-2, 7-11  |
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve.schemas import InputError
from tmr_core.inference import answer_each, open_image

logger = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------- loading


def resolve_model(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``(folder or s3:// URI that from_pretrained reads, registry version or None)``.

    MLflow URIs are downloaded by ``jobs._tracking.resolve_model_uri``; a path or ``s3://`` URI
    is returned unchanged.
    """
    from jobs._tracking import resolve_model_uri, resolve_tracking_uri

    version = None
    if uri.startswith("models:/"):
        import mlflow

        resolved = resolve_tracking_uri(tracking_uri)
        # download_artifacts resolves models:/ with a client on the *global* tracking and registry
        # URIs, not its tracking_uri argument (it would open ./mlflow.db); a replica owns its process
        mlflow.set_tracking_uri(resolved)
        mlflow.set_registry_uri(resolved)
        version = _registry_version(uri[len("models:/"):], resolved)
    return resolve_model_uri(uri, tracking_uri=tracking_uri), version


def _registry_version(name_ref: str, tracking_uri: str) -> str | None:
    """The version number ``tmr-ner@champion`` or ``tmr-ner/3`` points at."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if "@" in name_ref:
        name, alias = name_ref.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = name_ref.partition("/")
    return version or None


def _storage_options(storage: dict | None):
    from tmr_core.storage import StorageOptions

    return StorageOptions(**(storage or {}))


def raise_if_failed(result: Any) -> Any:
    """A batched item's result, or its exception raised (to this item's caller only)."""
    if isinstance(result, BaseException):
        raise result
    return result


def _configure_batching(method: Any, batching: dict) -> None:
    method.set_max_batch_size(int(batching.get("max_batch_size", 8)))
    method.set_batch_wait_timeout_s(float(batching.get("batch_wait_timeout_s", 0.01)))


# ----------------------------------------------------------------------------- phrases


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PhraseParser:
    """Noun phrases of a sentence (T^p's spans), up to ``max_phrase_len`` words each.

    Args:
        parser: ``stanza`` (the paper's constituency parser; needs its downloaded English models)
            or ``tiny`` (:func:`tmr_core.phrases.tiny_noun_phrases`, an offline stand-in for tests and the demo).
        stanza_dir: where stanza's models are (null: stanza's default).
        max_phrase_len: longest phrase kept, in words (4 for NER, 6 for RE in the paper).
    """

    def __init__(self, parser: str = "stanza", stanza_dir: str | None = None, max_phrase_len: int = 4,
                 device: str = "cpu"):
        from tmr_core.inference import PhraseStep

        try:
            self.step = PhraseStep(parser, max_phrase_len, stanza_dir, use_gpu=device.startswith("cuda"))
        except ValueError as error:
            raise ValueError(f"phrase_parser: {error}") from error

    async def parse(self, tokens: list[str]) -> list[dict]:
        """``[{"text", "start", "end"}]`` token spans of the noun phrases."""
        return self.step.phrases([tokens])[0]

    async def info(self) -> dict:
        parser = self.step.parser
        return {"name": "phrases", "version": None, "source_uri": self.step.kind,
                "kind": type(parser).__name__ if parser else "tiny_noun_phrases"}


# ----------------------------------------------------------------------------- grounding


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class Grounder:
    """The top-k regions of an image for the sentence's phrases (V^r), batched per image.

    Args:
        model: zero-shot detector name or folder (OWL-ViT, OWLv2, Grounding DINO), or the MLflow URI
            of a fine-tuned one (``models:/tmr-grounder@champion``, jobs.finetune_grounder).
        top_k, threshold: regions kept and the detector's score threshold.
        batching: ``{"max_batch_size", "batch_wait_timeout_s"}``.
        tracking_uri: MLflow tracking URI for ``models:/`` URIs; null: ``$MLFLOW_TRACKING_URI``.
    """

    def __init__(self, model: str, top_k: int = 3, threshold: float = 0.0, device: str = "cpu",
                 dtype: str = "float32", batching: dict | None = None, storage: dict | None = None,
                 tracking_uri: str | None = None):
        from tmr_core.grounding import PhraseGrounder
        from tmr_core.inference import GroundingStep

        self.source, self.version = model, None
        if model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
            model, self.version = resolve_model(model, tracking_uri)
        self.grounder = PhraseGrounder(model, top_k=top_k, threshold=threshold, device=device, dtype=dtype)
        self.step = GroundingStep(self.grounder, _storage_options(storage))
        _configure_batching(self._ground_batch, batching or {})

    async def ground(self, image: bytes | str, phrases: list[str]) -> list[dict]:
        """``[{"box", "score", "phrase"}]`` for one image (bytes, or a cache URI)."""
        return raise_if_failed(await self._ground_batch((image, phrases)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _ground_batch(self, items: list[tuple]) -> list[list[dict] | Exception]:
        return self.ground_many(items)

    def ground_many(self, items: list[tuple]) -> list[list[dict] | Exception]:
        """Regions per (image, phrases) item; an item that fails gets its exception instead."""
        return answer_each(self._ground_all, items)

    def _ground_all(self, items: list[tuple]) -> list[list[dict]]:
        # The detector takes one image with its own phrase list: a batch saves queueing, not FLOPs.
        results = []
        for image, phrases in items:
            regions, error = self.step.regions(image, phrases)
            if error:
                raise ValueError(error)
            results.append(regions)
        return results

    async def info(self) -> dict:
        return {"name": "grounder", "version": self.version, "source_uri": self.source,
                "kind": type(self.grounder.model).__name__}


# ----------------------------------------------------------------------------- back-translation


@serve.deployment(
    # The heavy step: in configs/serve.yaml it gets a GPU and scales on its own queue.
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class BackTranslator:
    """v' = a text-to-image sample for the sentence (Eq. 3), through the batch job's cache.

    The cache key is (model, scheduler, steps, size, seed, prompt), so an image the
    ``generate_back_translations`` job made for a sample is reused here, and one made here is
    reused by the next request with the same text.

    Args:
        generation: :class:`tmr_core.back_translation.GenerationSettings` fields; ``model`` may be
            ``models:/tmr-t2i@champion`` (jobs.finetune_text_to_image), downloaded here. The cache
            key holds the pipeline's content hash, not its path, so the job's images are reused.
        cache_uri: the shared image cache (local folder or ``s3://``).
        batching: ``{"max_batch_size", "batch_wait_timeout_s"}``.
        tracking_uri: MLflow tracking URI for ``models:/`` URIs; null: ``$MLFLOW_TRACKING_URI``.
    """

    def __init__(self, generation: dict, cache_uri: str, batching: dict | None = None, storage: dict | None = None,
                 tracking_uri: str | None = None):
        from tmr_core.back_translation import BackTranslator as Core
        from tmr_core.back_translation import GenerationSettings

        self.version = None
        if str(generation.get("model", "")).startswith("models:/"):
            folder, self.version = resolve_model(generation["model"], tracking_uri)
            generation = {**generation, "model": folder}
        self.settings = GenerationSettings(**generation)
        self.core = Core(self.settings, cache_uri, _storage_options(storage))  # hashes the pipeline's files once
        _ = self.core.pipeline  # load now: the first request should not pay for it
        _configure_batching(self._generate_batch, batching or {})

    async def generate(self, prompt: str, seed: int) -> dict:
        """``{"uri", "error", "cached"}``; a failed generation has an error and no uri."""
        return raise_if_failed(await self._generate_batch((prompt, seed)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, items: list[tuple[str, int]]) -> list[dict | Exception]:
        return self.generate_many(items)

    def generate_many(self, items: list[tuple[str, int]]) -> list[dict | Exception]:
        """``{"uri", "error", "cached"}`` per (prompt, seed); the core already turns a failed
        generation into an ``error``, this isolates the rest (e.g. a cache write that fails)."""
        return answer_each(self._generate_all, items)

    def _generate_all(self, items: list[tuple[str, int]]) -> list[dict]:
        results = self.core([p for p, _ in items], [s for _, s in items])
        return [{"uri": r.uri, "error": r.error, "cached": r.cached} for r in results]

    async def identity(self) -> str:
        """The pipeline's identity in the cache key (its content hash), for fast-mode lookups."""
        return self.core.settings.model_identity

    async def info(self) -> dict:
        return {"name": "back_translator", "version": self.version or self.settings.revision, "source_uri": self.settings.model,
                "kind": type(self.core.pipeline).__name__}


# ----------------------------------------------------------------------------- divergence


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class DivergenceEstimator:
    """(strengthen, complement, weaken) scores of a (text, image) pair from the trained MDE (Eq. 4-6).

    Args:
        model_uri: ``models:/tmr-mde@champion``, a checkpoint folder or ``s3://`` prefix.
        max_length: word pieces per caption (ViLT has 40 text positions).
    """

    def __init__(self, model_uri: str, max_length: int = 40, device: str = "cpu", batching: dict | None = None,
                 storage: dict | None = None, tracking_uri: str | None = None):
        from transformers import ViltProcessor

        from tmr_core.inference import DivergenceStep
        from tmr_core.mde import MDECollator, MultimodalDivergenceEstimator

        options = _storage_options(storage)
        self.source = model_uri
        folder, self.version = resolve_model(model_uri, tracking_uri)
        self.model = MultimodalDivergenceEstimator.from_pretrained(folder, device=device, options=options).eval()
        processor = ViltProcessor.from_pretrained(_processor_folder(folder, self.model.config.backbone))
        collate = MDECollator(processor, max_length=max_length, storage_options=options)
        # one row per forward, as score_divergence's tables: a request's α does not depend on its batch mates
        self.step = DivergenceStep(self.model, collate, device=device, micro_batch_size=1, options=options)
        _configure_batching(self._score_batch, batching or {})

    async def score(self, tokens: list[str], image: bytes) -> list[float]:
        """``[strengthen, complement, weaken]`` of one (text, image) pair."""
        return raise_if_failed(await self._score_batch((tokens, image)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[list[str], bytes]]) -> list[list[float] | Exception]:
        return self.score_many(items)

    def score_many(self, items: list[tuple[list[str], bytes]]) -> list[list[float] | Exception]:
        """Scores per (tokens, image) item; an item that fails gets its exception instead."""
        return answer_each(self._score_all, items)

    def _score_all(self, items: list[tuple[list[str], bytes]]) -> list[list[float]]:
        scores = self.step.scores([tokens for tokens, _ in items], [open_image(image) for _, image in items])
        for score in scores:
            if isinstance(score, str):
                raise ValueError(score)
        return scores

    async def info(self) -> dict:
        return {"name": "mde", "version": self.version, "source_uri": self.source, "kind": type(self.model).__name__}


def _processor_folder(folder: str, backbone: str) -> str:
    """The checkpoint folder when it holds the ViLT processor files, else the backbone's name/path."""
    import os

    from tmr_core import storage

    if not storage.is_remote(folder) and any(
        os.path.isfile(os.path.join(folder, name)) for name in ("processor_config.json", "preprocessor_config.json")
    ):
        return folder
    return backbone


# ----------------------------------------------------------------------------- extractors


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class Extractor:
    """The trained TMR extractor for one task: entities (NER, Eq. 7-9) or a relation (RE, Eq. 10-11).

    Deployed twice, as ``NERExtractor`` and ``REExtractor``.

    Args:
        model_uri: ``models:/tmr-ner@champion``, a checkpoint folder or ``s3://`` prefix.
        task: ``ner`` or ``re``; must match the checkpoint.
        batching: ``{"max_batch_size", "batch_wait_timeout_s"}``.
    """

    def __init__(self, model_uri: str, task: str, device: str = "cpu", batching: dict | None = None,
                 storage: dict | None = None, tracking_uri: str | None = None):
        from tmr_core.extractor import TMRExtractor
        from tmr_core.inference import ExtractionStep

        options = _storage_options(storage)
        self.source, self.task = model_uri, task
        folder, self.version = resolve_model(model_uri, tracking_uri)
        self.model = TMRExtractor.from_pretrained(folder, device=device, options=options)
        if self.model.config.task != task:
            raise ValueError(f"{model_uri}: a {self.model.config.task!r} model was given where {task!r} is served")
        if self.model.config.use_mde and self.model.config.back_translation_alpha != "image":
            # the ingress scores (t, v) only; serving such a model would feed it α it never saw
            raise ValueError(
                f"{model_uri}: trained with back_translation_alpha={self.model.config.back_translation_alpha!r}; "
                "the server scores (text, image) only: serve a model trained with back_translation_alpha=image"
            )
        self.step = ExtractionStep(self.model, self.model.collator(options), device=device)
        _configure_batching(self._predict_batch, batching or {})

    async def check(self, tokens: list[str]) -> None:
        """Raise :class:`InputError` when the sentence is longer than the model reads."""
        pieces = len(self.model.tokenizer(tokens, is_split_into_words=True)["input_ids"])
        room = self.model.config.max_length - (4 if self.task == "re" else 0)  # RE: <h> </h> <t> </t>
        if pieces > room:
            field = "text"
            raise InputError(field, f"text is {pieces} word pieces, over the model's maximum of {room}", 422,
                             "too_long")

    async def predict(self, row: dict) -> dict:
        """NER: ``{"entities": [{type, start, end, score}]}``; RE: ``{"relation", "probabilities"}``."""
        return raise_if_failed(await self._predict_batch(row))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, rows: list[dict]) -> list[dict | Exception]:
        return self.predict_many(rows)

    def predict_many(self, rows: list[dict]) -> list[dict | Exception]:
        """A prediction per row; a row that fails gets its exception instead."""
        return answer_each(self._predict_all, rows)

    def _predict_all(self, rows: list[dict]) -> list[dict]:
        predicted = self.step([self._row(row) for row in rows])
        if self.task == "re":
            return [{"relation": row["relation"], "probabilities": row["probabilities"]} for row in predicted]
        return [{"entities": row["entities"]} for row in predicted]

    def _row(self, row: dict) -> dict:
        """The ingress's row in the collator's columns (``tmr_core.schema``): the request's image
        bytes stand where a table has ``image_uri``; a request without an image (so without MDE
        scores) gets α = (0, 0, 1) from the collator, as such a row did in training."""
        out = {k: v for k, v in row.items() if k != "image"}
        out["image_uri"] = row.get("image")
        return out

    async def info(self) -> dict:
        return {"name": self.task, "version": self.version, "source_uri": self.source,
                "kind": type(self.model).__name__}
