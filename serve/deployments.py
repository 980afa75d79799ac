"""The model deployments of the TMR application, one per step of the composite model.

Each deployment wraps one ``tmr_core`` component and loads it once, in ``__init__`` (never at
import time). Model-holding deployments group concurrent requests with ``@serve.batch``; the batch
size and wait come from the app args (``set_max_batch_size`` / ``set_batch_wait_timeout_s``).
Each batched step is ``<step>`` (one request, what handles call) → ``_<step>_batch`` (Serve's
batching) → ``<step>_many`` (plain code on a list, what the in-process baseline calls).
One bad request never fails its batch mates, in two ways: a request's own problems (too long
for the model, an image the models cannot take) are found before it joins a batch (here and in
the ingress) and come back as :class:`serve.schemas.InputError`; and whatever still fails inside
a batch is isolated by :func:`answer_each` (the batch again item by item), so every good item gets
its answer and the bad one's exception is raised to its own caller only.

Models load from an MLflow model URI (``models:/tmr-ner@champion``), a checkpoint folder or an
``s3://`` prefix, always through ``from_pretrained`` (config + safetensors, nothing unpickled).

| deployment          | wraps                                   | paper          |
|---------------------|-----------------------------------------|----------------|
| PhraseParser        | tmr_core.phrases (stanza / tiny parser) | §3.2, T^p      |
| Grounder            | tmr_core.grounding.PhraseGrounder       | §3.2, V^r      |
| BackTranslator      | tmr_core.back_translation.BackTranslator| Eq. 3          |
| DivergenceEstimator | tmr_core.mde (MDE)                      | Eq. 4-6        |
| Extractor (NER, RE) | tmr_core.extractor.TMRExtractor         | Eq. 1-2, 7-11  |
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

from ray import serve

from serve.schemas import InputError

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


def open_image(source: bytes | str, storage_options: Any = None):
    """An RGB PIL image from encoded bytes (checked by the ingress) or a storage URI (the cache)."""
    from PIL import Image

    from tmr_core import storage

    data = source if isinstance(source, (bytes, bytearray)) else storage.read_bytes(source, storage_options)
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _storage_options(storage: dict | None):
    from tmr_core.storage import StorageOptions

    return StorageOptions(**(storage or {}))


def answer_each(run_batch: Callable[[list], list], items: list) -> list:
    """``run_batch(items)``; if it raises, each item again on its own, so one bad item cannot
    fail its batch mates. Returns a result per item, or the exception where that item failed
    (a batched step's ``<step>`` method raises it to the item's own caller: :func:`raise_if_failed`).
    """
    try:
        return run_batch(items)
    except Exception as error:  # noqa: BLE001 - any failure: find the item that caused it
        if len(items) == 1:
            return [error]
        logger.warning("a batch of %d failed (%s: %s); answering its items one by one",
                       len(items), type(error).__name__, error)
        _free_accelerator_memory()  # an out-of-memory batch may fit one item at a time
    return [_answer_one(run_batch, item) for item in items]


def _answer_one(run_batch: Callable[[list], list], item: Any) -> Any:
    try:
        return run_batch([item])[0]
    except Exception as error:  # noqa: BLE001 - this item's own failure, for its caller
        return error


def raise_if_failed(result: Any) -> Any:
    """A batched item's result, or its exception raised (to this item's caller only)."""
    if isinstance(result, BaseException):
        raise result
    return result


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _configure_batching(method: Any, batching: dict) -> None:
    method.set_max_batch_size(int(batching.get("max_batch_size", 8)))
    method.set_batch_wait_timeout_s(float(batching.get("batch_wait_timeout_s", 0.01)))


# ----------------------------------------------------------------------------- phrases


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PhraseParser:
    """Noun phrases of a sentence (T^p's spans), up to ``max_phrase_len`` words each.

    Args:
        parser: ``stanza`` (the paper's constituency parser; needs its downloaded English models)
            or ``tiny`` (:func:`tiny_noun_phrases`, an offline stand-in for tests and the demo).
        stanza_dir: where stanza's models are (null: stanza's default).
        max_phrase_len: longest phrase kept, in words (4 for NER, 6 for RE in the paper).
    """

    def __init__(self, parser: str = "stanza", stanza_dir: str | None = None, max_phrase_len: int = 4,
                 device: str = "cpu"):
        self.kind, self.max_phrase_len = parser, max_phrase_len
        self.parser = None
        if parser == "stanza":
            from tmr_core.phrases import StanzaConstituencyParser

            self.parser = StanzaConstituencyParser(model_dir=stanza_dir, use_gpu=device.startswith("cuda"))
        elif parser != "tiny":
            raise ValueError(f"phrase_parser: expected 'stanza' or 'tiny', got {parser!r}")

    async def parse(self, tokens: list[str]) -> list[dict]:
        """``[{"text", "start", "end"}]`` token spans of the noun phrases."""
        if self.parser is None:
            return tiny_noun_phrases(tokens, self.max_phrase_len)
        from tmr_core.phrases import noun_phrases

        (tree,) = self.parser.parse([tokens])
        return [{"text": p.text, "start": p.start, "end": p.end} for p in noun_phrases(tree, self.max_phrase_len)]

    async def info(self) -> dict:
        return {"name": "phrases", "version": None, "source_uri": self.kind,
                "kind": type(self.parser).__name__ if self.parser else "tiny_noun_phrases"}


_FUNCTION_WORDS = frozenset(
    "a an the this that these those of in on at to for with by from and or but is are was were be been "
    "i you he she it we they me him her us them my your his its our their rt".split()
)


def tiny_noun_phrases(tokens: list[str], max_len: int) -> list[dict]:
    """TINY-MODE PARSER: a parser-free stand-in for stanza's noun phrases, for offline tests and
    the demo only (configs/serve.tiny.yaml). It keeps runs of capitalised words (names, which is
    what grounding mostly needs) and a determiner followed by content words ("the red car"),
    each cut to ``max_len`` words. Real deployments use ``phrase_parser: stanza``.
    """
    spans: set[tuple[int, int]] = set()

    def add_run(start: int, end: int) -> None:
        if end > start:
            spans.add((start, min(end, start + max_len)))

    start = None
    for i, token in enumerate(tokens + [""]):
        capitalised = token[:1].isupper() and token.lower() not in _FUNCTION_WORDS
        if capitalised and start is None:
            start = i
        elif not capitalised and start is not None:
            add_run(start, i)
            start = None
    for i, token in enumerate(tokens):
        if token.lower() in ("a", "an", "the"):
            end = i + 1
            while end < len(tokens) and tokens[end].isalpha() and tokens[end].lower() not in _FUNCTION_WORDS:
                end += 1
            add_run(i, end if end > i + 1 else i)
    return [{"text": " ".join(tokens[s:e]), "start": s, "end": e} for s, e in sorted(spans)]


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

        self.source, self.version = model, None
        if model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
            model, self.version = resolve_model(model, tracking_uri)
        self.grounder = PhraseGrounder(model, top_k=top_k, threshold=threshold, device=device, dtype=dtype)
        self.storage_options = _storage_options(storage)
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
            regions = self.grounder(open_image(image, self.storage_options), phrases)
            results.append([r.to_dict() for r in regions])
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
        import torch
        from transformers import ViltProcessor

        from tmr_core.mde import MDECollator, MultimodalDivergenceEstimator

        options = _storage_options(storage)
        self.source = model_uri
        folder, self.version = resolve_model(model_uri, tracking_uri)
        self.model = MultimodalDivergenceEstimator.from_pretrained(folder, device=device, options=options)
        self.device = device
        processor = ViltProcessor.from_pretrained(_processor_folder(folder, self.model.config.backbone))
        self.collate = MDECollator(processor, max_length=max_length, storage_options=options)
        self._torch = torch
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
        batch = self.collate([{"tokens": tokens, "image": image} for tokens, image in items])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._torch.inference_mode():
            scores = self.model.score(**batch)
        return scores.float().cpu().tolist()

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
        import torch

        from tmr_core.extractor import TMRExtractor

        options = _storage_options(storage)
        self.source, self.task, self.device = model_uri, task, device
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
        self.collate = _serving_collator(self.model, options)
        self._torch = torch
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
        batch = self.collate([self._row(row) for row in rows])
        batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with self._torch.inference_mode():
            if self.task == "re":
                return [{"relation": r, "probabilities": p} for r, p in self.model.predict(batch)]
            return self._entities(batch)

    def _entities(self, batch: dict) -> list[dict]:
        """Viterbi tags per token (as ``TMRExtractor.predict``) and a score per entity: the mean
        softmax probability of its tags under the emission scores."""
        from tmr_core.metrics import chunks

        output = self.model(batch)
        paths = self.model.head.decode(output.logits, output.word_mask)
        probabilities = output.logits.float().softmax(dim=-1).cpu()
        labels = self.model.config.labels
        results = []
        for row, (path, length) in enumerate(zip(paths, batch["num_tokens"].tolist(), strict=True)):
            tags = [labels[i] for i in path[:length]]
            entities = []
            for kind, start, end in chunks(tags):
                score = sum(float(probabilities[row, i, path[i]]) for i in range(start, end)) / (end - start)
                entities.append({"type": kind, "start": start, "end": end, "score": score})
            results.append({"entities": entities})
        return results

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


def _serving_collator(model: Any, storage_options: Any):
    """The extractor's collator, reading the request's image from memory as well as by URI."""
    from tmr_core.collate import TMRCollator

    class ServingCollator(TMRCollator):
        # *args: whatever else TMRCollator._load takes (where, cache, a stage's error column)
        def _load(self, uri: Any, *args: Any, **kwargs: Any):
            if isinstance(uri, (bytes, bytearray)):
                return open_image(uri)
            return super()._load(uri, *args, **kwargs)

    return ServingCollator(model.tokenizer, model.image_processor, model.config, storage_options=storage_options)
