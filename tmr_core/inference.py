"""TMR's inference steps, one implementation each, for every caller (DESIGN.md: "one
implementation of each inference step").

The stage jobs (Ray Data map_batches), ``jobs.predict`` (one Ray Data pipeline) and the Serve app
all wrap these classes, so a fix lands in one place and the three paths cannot drift. A step is a
plain class: its model is loaded once in ``__init__``; ``step(rows)`` takes a list of row dicts
in the stage tables' columns (``tmr_core.schema``) and returns the same rows with its columns
added. No Ray, no MLflow: callers resolve ``models:/`` URIs to folders first.

An image is given as ``image_uri``: a local path or ``s3://`` URI (tables, ``jobs.predict``), or
the encoded bytes of a request (Serve).

| step | paper | adds |
|---|---|---|
| :class:`PhraseStep` | §3.2 (T^p) | ``phrases`` |
| :class:`BackTranslationStep` | Eq. 3 | ``back_translation_uri``, ``back_translation_error``, ``back_translation_cached`` |
| :class:`GroundingStep` | §3.2 (V^r) | ``regions``, ``back_translation_regions``, ``image_error`` |
| :class:`DivergenceStep` | §3.4, Eq. 4 | ``divergence`` (and ``back_translation_divergence``) |
| :class:`ExtractionStep` | Eq. 7–11 | NER ``tags``, ``entities``; RE ``relation``, ``probabilities`` |
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

from tmr_core import storage

Row = dict[str, Any]
logger = logging.getLogger(__name__)


def open_image(source: bytes | bytearray | str, options: storage.StorageOptions | None = None) -> Any:
    """An RGB PIL image from encoded bytes or a storage URI.

    Raises:
        FileNotFoundError: nothing exists at the URI.
        ValueError: the bytes are not an image PIL can decode.
    """
    from PIL import Image

    from tmr_core.images import decode_error, load_image

    if isinstance(source, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(source)) as image:
                return image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"image: not a readable image ({decode_error(error)})") from error
    return load_image(str(source), options)


def has_image(source: Any) -> bool:
    """Whether a row names an image (a table's null is None, or NaN from pandas)."""
    return source is not None and source != "" and not (isinstance(source, float) and source != source)


def answer_each(run_batch: Callable[[list], list], items: list) -> list:
    """``run_batch(items)``; if it raises, each item again on its own, so one bad item cannot fail
    its batch mates. Returns a result per item, or the exception where that item failed."""
    try:
        return run_batch(items)
    except Exception as error:  # noqa: BLE001 - any failure: find the item that caused it
        if len(items) == 1:
            return [error]
        logger.warning("a batch of %d failed (%s: %s); answering its items one by one",
                       len(items), type(error).__name__, error)
        _free_accelerator_memory()  # an out-of-memory batch may fit one item at a time
    results = []
    for item in items:
        try:
            results.append(run_batch([item])[0])
        except Exception as error:  # noqa: BLE001 - this item's own failure, for its caller
            results.append(error)
    return results


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- phrases


class PhraseStep:
    """Noun phrases of each row's tokens (T^p's spans), up to ``max_phrase_len`` words.

    Args:
        parser: ``stanza`` (the paper's constituency parser; needs its English models) or ``tiny``
            (:func:`tmr_core.phrases.tiny_noun_phrases`, offline, for the demo and tests).
        max_phrase_len: longest phrase kept (4 for NER, 6 for RE in the paper).
        stanza_dir: where stanza's models are (null: stanza's default).

    A row that already has ``phrases`` (e.g. a stage table's, or parsed by a caller from gold
    trees) keeps them.
    """

    def __init__(self, parser: str = "stanza", max_phrase_len: int = 4, stanza_dir: str | None = None,
                 use_gpu: bool = False):
        if parser not in ("stanza", "tiny"):
            raise ValueError(f"parser: expected 'stanza' or 'tiny', got {parser!r}")
        self.kind, self.max_phrase_len = parser, max_phrase_len
        self.parser = None
        if parser == "stanza":
            from tmr_core.phrases import StanzaConstituencyParser

            self.parser = StanzaConstituencyParser(model_dir=stanza_dir, use_gpu=use_gpu)

    def phrases(self, sentences: list[list[str]]) -> list[list[dict]]:
        """``[{"text", "start", "end"}]`` token spans per sentence."""
        from tmr_core.phrases import noun_phrases, tiny_noun_phrases

        if self.parser is None:
            return [tiny_noun_phrases(list(tokens), self.max_phrase_len) for tokens in sentences]
        trees = self.parser.parse(sentences)
        return [[{"text": p.text, "start": p.start, "end": p.end} for p in noun_phrases(tree, self.max_phrase_len)]
                for tree in trees]

    def __call__(self, rows: list[Row]) -> list[Row]:
        todo = [i for i, row in enumerate(rows) if row.get("phrases") is None]
        for i, phrases in zip(todo, self.phrases([list(rows[i]["tokens"]) for i in todo]), strict=True):
            rows[i] = {**rows[i], "phrases": phrases}
        return rows


# --------------------------------------------------------------------------- back-translation


def prompts_and_seeds(rows: list[Row], seed: int = 0, per_sample: bool = False) -> tuple[list[str], list[int]]:
    """Each row's prompt (its tokens joined) and the seed it is sampled with (Eq. 3's cache key parts)."""
    from tmr_core.back_translation import generation_seed, prompt_from_tokens

    prompts = [prompt_from_tokens(row.get("tokens") or []) for row in rows]
    seeds = [generation_seed(row.get("id"), prompt, seed, per_sample) for row, prompt in zip(rows, prompts, strict=True)]
    return prompts, seeds


# what BackTranslationStep adds to each row
BACK_TRANSLATION_COLUMNS = ("back_translation_uri", "back_translation_error", "back_translation_cached")


class BackTranslationStep:
    """v' for each row's sentence (Eq. 3) through the content-addressed cache.

    Args:
        translator: a :class:`tmr_core.back_translation.BackTranslator` (pipeline loaded lazily).
        seed, seed_per_sample: as ``generation.seed`` / ``generation.seed_per_sample``.
        generate: False looks the cache up only (a miss leaves the row without v', as Serve's
            fast mode); True generates what is missing.
    """

    def __init__(self, translator: Any, seed: int = 0, seed_per_sample: bool = False, generate: bool = True):
        self.translator, self.seed, self.per_sample, self.generate = translator, seed, seed_per_sample, generate

    def __call__(self, rows: list[Row]) -> list[Row]:
        prompts, seeds = prompts_and_seeds(rows, self.seed, self.per_sample)
        results = (self.translator if self.generate else self.translator.look_up)(prompts, seeds)
        return [{**row,
                 "back_translation_uri": result.uri if result else None,
                 "back_translation_error": result.error if result else None,
                 "back_translation_cached": bool(result and result.cached)}
                for row, result in zip(rows, results, strict=True)]


# --------------------------------------------------------------------------- grounding


class GroundingStep:
    """The top-k regions of the image and of v' for each row's phrases (V^r).

    Args:
        grounder: a :class:`tmr_core.grounding.PhraseGrounder`.
        options: storage options for ``s3://`` images.

    An image that cannot be read leaves ``regions`` empty and says why in ``image_error`` (the
    caller's policy decides whether that is an error); a row without an image has
    ``image_error = "no image"``; an unreadable v' only leaves ``back_translation_regions`` empty.
    """

    def __init__(self, grounder: Any, options: storage.StorageOptions | None = None):
        self.grounder, self.options = grounder, options

    def regions(self, source: Any, phrases: list[str]) -> tuple[list[dict], str | None]:
        """(regions, why the image was unusable or None)."""
        if not has_image(source):
            return [], "no image"
        try:
            image = open_image(source, self.options)
        except (FileNotFoundError, ValueError, OSError) as error:
            return [], str(error)
        return [region.to_dict() for region in self.grounder(image, phrases)], None

    def ground(self, row: Row) -> tuple[list[dict], str | None, list[dict], str | None]:
        """``(regions, image error, v' regions, v' error)`` of one row."""
        texts = [p["text"] for p in row.get("phrases") or []]
        regions, error = self.regions(row.get("image_uri"), texts)
        back, back_error = self.regions(row.get("back_translation_uri"), texts)
        return regions, error, back, back_error

    def __call__(self, rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            regions, error, back, _ = self.ground(row)
            out.append({**row, "regions": regions, "back_translation_regions": back,
                        "image_error": row.get("image_error") or error})
        return out


# --------------------------------------------------------------------------- divergence


class UnscorableImage(str):
    """The ``image_error`` of a row whose image was read but that the MDE could not score (e.g. an
    image too thin for ViLT's resize). A ``str``, so tables and responses carry it as text; its own
    type, so a job's ``on_missing_image`` policy tells it from an unreadable image."""


class DivergenceStep:
    """(strengthen, complement, weaken) of each row's (text, image) from the trained MDE (Eq. 4).

    Args:
        model: a :class:`tmr_core.mde.MultimodalDivergenceEstimator` in eval mode.
        collator: its :class:`tmr_core.mde.MDECollator`.
        micro_batch_size: rows per forward; 1 keeps a row's score independent of its batch mates
            (ViLT pads a batch to its widest image), so a table, a prediction and a request agree.
        score_back_translations: also score (text, v') into ``back_translation_divergence``.

    A row whose image is missing, unreadable or flagged in ``image_error`` gets ``divergence =
    None`` (the extractor then reads α = (0, 0, 1)); the reason goes to ``image_error``.
    """

    def __init__(self, model: Any, collator: Any, device: str = "cpu", micro_batch_size: int = 1,
                 score_back_translations: bool = False, options: storage.StorageOptions | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be ≥ 1, got {micro_batch_size}")
        self.model, self.collator, self.device = model, collator, device
        self.micro_batch_size, self.score_back_translations, self.options = (
            micro_batch_size, score_back_translations, options)

    def _image(self, source: Any) -> tuple[Any, str | None]:
        if not has_image(source):
            return None, "no image"
        try:
            return open_image(source, self.options), None
        except (FileNotFoundError, ValueError, OSError) as error:
            return None, str(error)

    def _forward(self, items: list[tuple[list[str], Any]]) -> list[list[float]]:
        import torch

        inputs = self.collator([{"tokens": tokens, "image": image} for tokens, image in items])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            return self.model.score(**inputs).float().cpu().tolist()

    def scores(self, tokens: list[list[str]], images: list[Any]) -> list[list[float] | str | None]:
        """Per row: the scores, None without an image, or the error of a row the MDE cannot read
        (e.g. an image too thin for ViLT's resize), found by scoring a failed chunk row by row."""
        scored = [i for i, image in enumerate(images) if image is not None]
        out: list[list[float] | str | None] = [None] * len(images)
        for start in range(0, len(scored), self.micro_batch_size):
            chunk = scored[start:start + self.micro_batch_size]
            results = answer_each(self._forward, [(tokens[i], images[i]) for i in chunk])
            for i, result in zip(chunk, results, strict=True):
                out[i] = (UnscorableImage(f"the MDE cannot score the image ({result})") if isinstance(result, Exception)
                          else result)
        return out

    def __call__(self, rows: list[Row]) -> list[Row]:
        tokens = [list(row["tokens"]) for row in rows]
        loaded = [(None, row["image_error"]) if row.get("image_error") else self._image(row.get("image_uri"))
                  for row in rows]
        divergence = self.scores(tokens, [image for image, _ in loaded])
        back: list = [None] * len(rows)
        if self.score_back_translations:
            back_images = [self._image(row.get("back_translation_uri"))[0] for row in rows]
            back = [s if isinstance(s, list) else None for s in self.scores(tokens, back_images)]
        out = []
        for row, (_, error), score, back_score in zip(rows, loaded, divergence, back, strict=True):
            failed = score if isinstance(score, str) else None
            out.append({**row, "divergence": score if isinstance(score, list) else None,
                        "back_translation_divergence": back_score, "image_error": error or failed})
        return out


# --------------------------------------------------------------------------- extraction


class ExtractionStep:
    """The trained TMR extractor on rows with every stage's columns: entities (NER, Eq. 7–9) or
    the relation of each row's head/tail pair (RE, Eq. 10–11).

    Args:
        model: a :class:`tmr_core.extractor.TMRExtractor` (eval mode is set here).
        collator: its :class:`tmr_core.collate.TMRCollator` (images by URI or bytes).

    Adds, NER: ``tags`` (one BIO tag per token, Viterbi) and ``entities``: ``{type, start, end,
    score}`` token spans, ``score`` the mean softmax probability of the span's Viterbi tags under
    the emission scores. RE: ``relation`` and ``probabilities`` ``{label: p}``.
    """

    def __init__(self, model: Any, collator: Any, device: str = "cpu"):
        self.model, self.collator, self.device = model.eval(), collator, device
        self.task = model.config.task

    def __call__(self, rows: list[Row]) -> list[Row]:
        import torch

        from tmr_core.training import move_to_device

        batch = move_to_device(self.collator(rows), self.device)
        with torch.inference_mode():
            if self.task == "re":
                return [{**row, "relation": relation, "probabilities": probabilities}
                        for row, (relation, probabilities) in zip(rows, self.model.predict(batch), strict=True)]
            output = self.model({k: v for k, v in batch.items() if k != "labels"})
            paths = self.model.head.decode(output.logits, output.word_mask)
        probabilities = output.logits.float().softmax(dim=-1).cpu()
        labels = self.model.config.labels
        out = []
        for index, (row, path, length) in enumerate(zip(rows, paths, batch["num_tokens"].tolist(), strict=True)):
            tags = [labels[i] for i in path[:length]]
            out.append({**row, "tags": tags, "entities": _entities(tags, path, probabilities[index])})
        return out


def _entities(tags: Sequence[str], path: Sequence[int], probabilities: Any) -> list[dict]:
    from tmr_core.metrics import chunks

    entities = []
    for kind, start, end in chunks(list(tags)):
        score = sum(float(probabilities[i, path[i]]) for i in range(start, end)) / (end - start)
        entities.append({"type": kind, "start": start, "end": end, "score": score})
    return entities
