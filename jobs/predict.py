"""Label your own posts: batch prediction with trained TMR models, entities then relations.

    python -m jobs.predict --config configs/predict.tiny.yaml
    python -m jobs.predict --config configs/predict.yaml --input s3://bucket/posts.jsonl --output s3://bucket/labelled

One Ray Data pipeline over the input rows, each model step on its own actor pool with its own
CPU/GPU request (``<step>.compute``), every step the one the stage jobs and Serve run
(:mod:`tmr_core.inference`): phrases → back-translation (``mode: full`` generates what the cache
lacks; ``fast`` uses the cache or none, as Serve's modes; each task's v' from its own
back-translator when ``back_translation.task_models`` names one) → grounding → divergence → NER → RE.

Input (JSONL, CSV or Parquet; local or ``s3://``), one row per post:

* ``id`` (optional; default ``line-<n>``), ``text`` (raw: tokenised by
  :func:`tmr_core.readers.tokenize_with_offsets`, character offsets kept) or ``tokens``;
* ``image`` (optional): a path relative to ``--image_dir``, an absolute path or an ``s3://`` URI;
  a row without one is predicted text-only and says so (``image_used: false``);
* RE only: ``head`` and ``tail`` spans (``{start, end}``: characters with ``text``, tokens with
  ``tokens``), to classify that pair; without spans and with both models, every ordered pair of
  predicted entities is scored (end-to-end extraction);
* ``phrases`` (optional): token spans ``{text, start, end}`` as ``extract_phrases`` writes them,
  used instead of parsing (both tasks).

Output folder: ``parts/part-*.parquet`` (written as rows finish; a rerun or a resubmission skips
the input lines already there), then ``predictions.parquet``, ``predictions.jsonl``,
``predictions.conll`` (NER) and ``summary.json``. A bad row (no text, an unreadable image, a bad
span) is a row with ``error`` naming ``input:line``, never a crashed job or a missing row.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from jobs._common import StorageConfig
from jobs._config import ConfigError, opt, parse_config, print_config, run_main, save_config
from jobs._data import ComputeConfig
from jobs.generate_back_translations import GenerationConfig
from jobs.ground_phrases import DetectorConfig
from tmr_core.inference import BACK_TRANSLATION_COLUMNS

JOB = "predict"
TASKS = ("ner", "re")


@dataclass
class PhraseConfig:
    """How each post's noun phrases are found (rows with ``phrases`` keep theirs)."""

    parser: Literal["stanza", "tiny"] = opt("stanza", "stanza (the paper's parser; needs its English models) or tiny (offline heuristic).")
    stanza_dir: str | None = opt(None, "Where stanza's models are; null: stanza's default.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool of the parser.")


@dataclass
class BackTranslationConfig:
    """v' from the text-to-image model, through the shared image cache."""

    enabled: bool = opt(True, "Back-translate (false: every row without v', as --ablation no_back_translation would see).")
    cache_uri: str = opt("outputs/cache/back_translations", "Image cache shared with generate_back_translations and Serve.")
    generation: GenerationConfig = opt(GenerationConfig, "The diffusion pipeline (same settings as the batch job, or the cache misses).")
    task_models: dict[str, str] = opt(
        {}, "A back-translator per task (e.g. jobs.run_pipeline --back_translators per_task), overriding "
        "generation.model for that task: folder, s3:// or models:/tmr-t2i-re@champion; tasks not named use "
        "generation.model; every other generation setting is shared.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool of the pipeline (GPUs in full mode).")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.task_models) - set(TASKS))
        empty = sorted(task for task, model in self.task_models.items() if not model)
        problems = [f"--back_translation.task_models: unknown task(s) {', '.join(map(repr, unknown))}; "
                    f"expected keys among {', '.join(TASKS)}"] if unknown else []
        if empty:
            problems.append(f"--back_translation.task_models: an empty model for {empty}; leave the task out to "
                            "use generation.model")
        if problems:
            raise ConfigError(problems)

    def generation_for(self, task: str) -> GenerationConfig:
        """The generation settings of ``task``'s v': ``generation`` with its own model, if given."""
        import dataclasses

        model = self.task_models.get(task)
        return self.generation if model is None else dataclasses.replace(self.generation, model=model)


@dataclass
class GroundingConfig:
    """Top-k regions of the image and of v' for the phrases."""

    detector: DetectorConfig = opt(DetectorConfig, "The zero-shot detector (a folder or models:/tmr-grounder@champion).")
    top_k: int = opt(3, "Regions kept per image (paper: 3).")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool of the detector.")


@dataclass
class DivergenceConfig:
    """The trained MDE's (strengthen, complement, weaken)."""

    checkpoint: str = opt("models:/tmr-mde@champion", "MDE folder or MLflow URI.")
    processor: str | None = opt(None, "ViLT processor folder or hub name; null: the checkpoint's, else its backbone's.")
    max_length: int = opt(40, "Word pieces per sentence (what pretrain_mde trained with).")
    device: str = opt("cpu", "torch device of each actor.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool of the MDE.")


@dataclass
class ExtractorConfig:
    """One task's extractor actors."""

    device: str = opt("cpu", "torch device of each actor.")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool of the extractor.")


@dataclass
class Config:
    """Predict entities (NER) and/or relations (RE) for the posts of a file, on Ray Data."""

    input: str = opt("posts.jsonl", "Posts: .jsonl, .csv or .parquet (local or s3://); see the module doc for the columns.")
    output: str = opt("outputs/predictions", "Folder for parts/, predictions.{parquet,jsonl,conll}, summary.json.")
    image_dir: str | None = opt(None, "Folder (or s3:// prefix) relative image paths are read from; null: the input's folder.")
    ner_model: str | None = opt(None, "NER extractor: folder or models:/tmr-ner@champion; null: no NER.")
    re_model: str | None = opt(None, "RE extractor: folder or models:/tmr-re@champion; null: no RE.")
    mode: Literal["fast", "full"] = opt("fast", "full: generate missing back-translations; fast: cached ones or none.")
    tracking_uri: str | None = opt(None, "MLflow tracking URI for models:/ URIs; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    force: bool = opt(False, "Start over: remove the output's parts instead of resuming.")
    phrases: PhraseConfig = opt(PhraseConfig, "Noun phrases.")
    back_translation: BackTranslationConfig = opt(BackTranslationConfig, "Back-translation (Eq. 3).")
    grounding: GroundingConfig = opt(GroundingConfig, "Grounding.")
    divergence: DivergenceConfig = opt(DivergenceConfig, "Divergence scores.")
    ner: ExtractorConfig = opt(ExtractorConfig, "NER extractor actors.")
    re: ExtractorConfig = opt(ExtractorConfig, "RE extractor actors.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")

    @property
    def tasks(self) -> list[str]:
        """The tasks whose model is given, NER first (RE may use its entities)."""
        return [task for task, model in (("ner", self.ner_model), ("re", self.re_model)) if model]


# --------------------------------------------------------------------------- input rows


class RowError(ValueError):
    """One input row that cannot be predicted; its message names ``input:line``."""


def read_records(uri: str, options: Any = None) -> list[dict]:
    """The input's rows as dicts, in file order (JSONL line by line, so a bad line is that row's error)."""
    import csv
    import io

    import pyarrow.parquet as pq

    from tmr_core import storage

    lower = uri.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        records = []
        for number, line in enumerate(storage.read_bytes(uri, options).decode("utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = {"_error": f"not valid JSON ({error.msg} at column {error.colno})"}
            if not isinstance(record, dict):
                record = {"_error": f"expected a JSON object, found {type(record).__name__}"}
            records.append({**record, "_line": number})
        return records
    if lower.endswith(".csv"):
        # every cell as written, in one pass: ids like 007 and all-number texts stay strings
        text = storage.read_bytes(uri, options).decode("utf-8-sig")
        return [{**row, "_line": 2 + i} for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")))]
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))
        return [{**row, "_line": 1 + i} for i, row in enumerate(table.to_pylist())]  # row numbers
    raise ConfigError([f"--input {uri!r}: expected a .jsonl, .csv or .parquet file"])


def _parsed(value: Any) -> Any:
    """CSV cells hold JSON for the nested columns (tokens, head, tail, phrases)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        return json.loads(value)
    return value


def _token_span(span: Any, offsets: list[tuple[int, int]] | None, n_tokens: int, name: str) -> dict:
    """A ``{start, end}`` span in tokens: character offsets are mapped through ``offsets``."""
    if not isinstance(span, dict) or not isinstance(span.get("start"), int) or not isinstance(span.get("end"), int):
        raise RowError(f"{name}: expected {{\"start\": int, \"end\": int}}, found {span!r}")
    start, end = span["start"], span["end"]
    if offsets is not None:
        starts = [i for i, (s, _) in enumerate(offsets) if s == start]
        ends = [i for i, (_, e) in enumerate(offsets) if e == end]
        if not starts or not ends or ends[0] < starts[0]:
            raise RowError(f"{name}: characters [{start}, {end}) do not start and end on token boundaries")
        start, end = starts[0], ends[0] + 1
    if not 0 <= start < end <= n_tokens:
        raise RowError(f"{name}: token span [{start}, {end}) is outside the {n_tokens} tokens")
    return {"start": start, "end": end}


def normalize(record: dict, cfg: Config, image_root: str) -> dict:
    """An input record as a pipeline row (``id, line, tokens, offsets, image_uri, head, tail, phrases``).

    Raises:
        RowError: what is wrong with the row.
    """
    from tmr_core import storage
    from tmr_core.readers import tokenize_with_offsets

    if record.get("_error"):
        raise RowError(record["_error"])
    text, tokens = record.get("text"), _parsed(record.get("tokens"))
    offsets = None
    if isinstance(text, str) and text.strip():
        pieces = tokenize_with_offsets(text)
        tokens, offsets = [t for t, _, _ in pieces], [(s, e) for _, s, e in pieces]
    elif isinstance(tokens, list) and tokens and all(isinstance(t, str) and t.strip() for t in tokens):
        text = None
    else:
        raise RowError("no text: give 'text' (a non-empty string) or 'tokens' (a non-empty list of strings)")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise RowError(f"image: expected a path or URI string, found {image!r}")
    image_uri = None
    if image:
        image_uri = image if storage.is_remote(image) or image.startswith("/") else storage.join(image_root, image)
    head, tail = _parsed(record.get("head")), _parsed(record.get("tail"))
    if (head is None) != (tail is None):
        raise RowError("head/tail: give both spans or neither")
    if head is not None:
        if "re" not in cfg.tasks:
            raise RowError("head/tail spans need --re_model")
        head = _token_span(head, offsets, len(tokens), "head")
        tail = _token_span(tail, offsets, len(tokens), "tail")
    elif cfg.tasks == ["re"]:
        raise RowError("head/tail: RE without --ner_model needs the pair's spans")
    phrases = _parsed(record.get("phrases"))
    if phrases is not None:
        phrases = [{"text": str(p["text"]), "start": int(p["start"]), "end": int(p["end"])} for p in phrases]
    row_id = record.get("id")
    return {"id": str(row_id) if row_id is not None else f"line-{record['_line']}", "line": record["_line"],
            "text": text, "tokens": [str(t) for t in tokens], "offsets": offsets, "image": image,
            "image_uri": image_uri, "head": head, "tail": tail, "given_phrases": phrases, "error": None}


def input_rows(cfg: Config, records: list[dict], image_root: str) -> list[dict]:
    """Every record as a row; a bad one keeps its place with ``error`` = ``input:line: why``."""
    rows, seen = [], {}
    for record in records:
        try:
            row = normalize(record, cfg, image_root)
            if row["id"] in seen:
                raise RowError(f"id {row['id']!r} repeats line {seen[row['id']]}")
            seen[row["id"]] = row["line"]
        except (RowError, KeyError, TypeError, ValueError) as error:
            row = {"id": str(record.get("id") or f"line-{record['_line']}"), "line": record["_line"], "text": None,
                   "tokens": [], "offsets": None, "image": None, "image_uri": None, "head": None, "tail": None,
                   "given_phrases": None, "error": f"{cfg.input}:{record['_line']}: {error}"}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- actors


def _rows(batch: Any) -> list[dict]:
    return batch.to_pylist()


def _table(rows: list[dict]) -> Any:
    """Rows as a table over the union of their keys: a failed row lacks the columns its step adds,
    and ``from_pylist`` would take the columns from the first row alone."""
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])


def _run_isolated(step: Any, rows: list[dict], name: str, source: str) -> list[dict]:
    """``step`` on the rows without an error; a row that fails alone gets ``error`` instead."""
    from tmr_core.inference import answer_each

    todo = [i for i, row in enumerate(rows) if not row.get("error")]
    if not todo:
        return rows
    results = answer_each(step, [rows[i] for i in todo])
    for i, result in zip(todo, results, strict=True):
        rows[i] = ({**rows[i], "error": f"{source}:{rows[i]['line']}: {name}: {result}"}
                   if isinstance(result, Exception) else result)
    return rows


def _as_task(row: dict, task: str) -> dict:
    """The row with ``task``'s phrases, v' and regions under the column names the steps read."""
    return {**row, "phrases": row.get(f"phrases_{task}"), "regions": row.get(f"regions_{task}"),
            "back_translation_regions": row.get(f"back_translation_regions_{task}"),
            **{column: row.get(f"{column}_{task}") for column in BACK_TRANSLATION_COLUMNS}}


class Phrases:
    """Noun phrases for each task's length limit (one parse; given phrases are kept)."""

    def __init__(self, cfg: Config):
        from tmr_core.inference import PhraseStep
        from tmr_core.phrases import PHRASE_LENGTHS

        self.cfg = cfg
        self.steps = {task: PhraseStep(cfg.phrases.parser, PHRASE_LENGTHS[task], cfg.phrases.stanza_dir)
                      for task in cfg.tasks}

    def _parse(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            row = dict(row)
            for task, step in self.steps.items():
                row[f"phrases_{task}"] = row["given_phrases"] if row["given_phrases"] is not None else \
                    step.phrases([row["tokens"]])[0]
            out.append(row)
        return out

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._parse, _rows(batch), "phrases", self.cfg.input))


def back_translation_identities(cfg: Config) -> dict[str, str]:
    """The cache identity of each distinct back-translator ``cfg.tasks`` use, by model
    (:func:`jobs.generate_back_translations.model_identity`, once per job: a folder's hash…)."""
    from jobs.generate_back_translations import model_identity

    identities: dict[str, str] = {}
    for task in cfg.tasks:
        generation = cfg.back_translation.generation_for(task)
        if generation.model not in identities:
            identities[generation.model] = model_identity(generation, cfg.tracking_uri)
    return identities


class BackTranslate:
    """Each task's v' (``back_translation_{uri,error,cached}_<task>``) through the cache, from the
    task's back-translator (``back_translation.task_models``, else ``generation.model``); generated
    on a miss in full mode. Tasks that share a model share its images (made once).

    Args:
        identities: each model's cache identity (:func:`back_translation_identities`, computed
            once on the driver); ``None``: computed here.
    """

    def __init__(self, cfg: Config, identities: dict[str, str] | None = None):
        from jobs._tracking import resolve_model_uri
        from jobs.generate_back_translations import _settings
        from tmr_core.back_translation import BackTranslator
        from tmr_core.inference import BackTranslationStep

        identities = back_translation_identities(cfg) if identities is None else identities
        self.cfg = cfg
        self.steps: dict[str, Any] = {}  # model -> its step, one per distinct model
        self.task_model: dict[str, str] = {}
        for task in cfg.tasks:
            generation = cfg.back_translation.generation_for(task)
            self.task_model[task] = generation.model
            if generation.model in self.steps:
                continue
            model = resolve_model_uri(generation.model, tracking_uri=cfg.tracking_uri)
            translator = BackTranslator(_settings(generation, identities[generation.model], model),
                                        cfg.back_translation.cache_uri, cfg.storage.options())
            self.steps[generation.model] = BackTranslationStep(translator, generation.seed, generation.seed_per_sample,
                                                               generate=cfg.mode == "full")

    def _translate(self, rows: list[dict]) -> list[dict]:
        made = {model: step(rows) for model, step in self.steps.items()}
        return [{**row, **{f"{column}_{task}": made[model][i][column]
                           for task, model in self.task_model.items() for column in BACK_TRANSLATION_COLUMNS}}
                for i, row in enumerate(rows)]

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._translate, _rows(batch), "back-translation", self.cfg.input))


class Ground:
    """Regions of the image and of v' for each task's phrases; an unreadable image is the row's error."""

    def __init__(self, cfg: Config):
        from jobs.ground_phrases import build_step

        detector = cfg.grounding.detector
        if cfg.tracking_uri and not detector.tracking_uri:
            detector.tracking_uri = cfg.tracking_uri
        self.cfg, self.step = cfg, build_step(detector, cfg.grounding.top_k, cfg.storage.options())

    def _ground(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            row = dict(row)
            for task in self.cfg.tasks:
                regions, error, back, _ = self.step.ground(_as_task(row, task))
                if error and row["image_uri"] is not None:
                    raise ValueError(f"image {row['image']!r}: {error}")
                row[f"regions_{task}"], row[f"back_translation_regions_{task}"] = regions, back
            row["image_error"] = None if row["image_uri"] is not None else "no image"
            out.append(row)
        return out

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._ground, _rows(batch), "grounding", self.cfg.input))


class Divergence:
    """α of (text, image); a row without an image gets none (the extractor reads α = (0, 0, 1))."""

    def __init__(self, cfg: Config):
        from jobs.score_divergence import build_step

        d = cfg.divergence
        self.cfg = cfg
        self.step = build_step(_local_model(d.checkpoint, cfg.tracking_uri), d.processor, d.max_length, d.device,
                               options=cfg.storage.options())

    def _score(self, rows: list[dict]) -> list[dict]:
        scored = self.step(rows)
        for row in scored:
            if row["image_uri"] is not None and row["divergence"] is None:
                raise ValueError(f"image {row['image']!r}: {row['image_error']}")
        return scored

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._score, _rows(batch), "divergence", self.cfg.input))


def _local_model(uri: str, tracking_uri: str | None) -> str:
    from jobs._tracking import resolve_model_uri

    return resolve_model_uri(uri, tracking_uri=tracking_uri)


def _extraction_step(uri: str, task: str, device: str, cfg: Config) -> Any:
    from tmr_core.extractor import TMRExtractor
    from tmr_core.inference import ExtractionStep

    options = cfg.storage.options()
    model = TMRExtractor.from_pretrained(_local_model(uri, cfg.tracking_uri), device=device, options=options)
    if model.config.task != task:
        raise ConfigError([f"--{task}_model {uri!r}: a {model.config.task!r} model"])
    if model.config.use_mde and model.config.back_translation_alpha != "image":
        # predict scores (text, image) only, as Serve does: such a model would get α' it never saw
        raise ConfigError([f"--{task}_model {uri!r}: trained with back_translation_alpha="
                           f"{model.config.back_translation_alpha!r}; predict with a model trained with "
                           "back_translation_alpha=image"])
    return ExtractionStep(model, model.collator(options), device=device)


class RecognizeEntities:
    """NER (Eq. 7–9): entities with token and character spans, text, type and score."""

    def __init__(self, cfg: Config):
        self.cfg, self.step = cfg, _extraction_step(cfg.ner_model, "ner", cfg.ner.device, cfg)

    def _predict(self, rows: list[dict]) -> list[dict]:
        predicted = self.step([_as_task(row, "ner") for row in rows])
        return [{**row, "entities": [_entity(e, row) for e in p["entities"]]} for row, p in zip(rows, predicted, strict=True)]

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._predict, _rows(batch), "ner", self.cfg.input))


def _entity(entity: dict, row: dict) -> dict:
    start, end = entity["start"], entity["end"]
    offsets = row.get("offsets")
    char_start, char_end = (offsets[start][0], offsets[end - 1][1]) if offsets else (None, None)
    text = row["text"][char_start:char_end] if offsets else " ".join(row["tokens"][start:end])
    return {"start": start, "end": end, "char_start": char_start, "char_end": char_end, "text": text,
            "type": entity["type"], "score": float(entity["score"])}


class ClassifyRelations:
    """RE (Eq. 10–11) for the row's given pair, or every ordered pair of its predicted entities."""

    def __init__(self, cfg: Config):
        self.cfg, self.step = cfg, _extraction_step(cfg.re_model, "re", cfg.re.device, cfg)

    def _pairs(self, row: dict) -> list[tuple[dict, dict]]:
        if row.get("head"):
            return [(row["head"], row["tail"])]
        entities = row.get("entities") or []
        return [(h, t) for h in entities for t in entities if h is not t]

    def _predict(self, rows: list[dict]) -> list[dict]:
        pairs = [(index, head, tail) for index, row in enumerate(rows) for head, tail in self._pairs(row)]
        queries = [{**_as_task(rows[i], "re"), "head": {"start": h["start"], "end": h["end"]},
                    "tail": {"start": t["start"], "end": t["end"]}} for i, h, t in pairs]
        predicted = self.step(queries) if queries else []
        relations: list[list[dict]] = [[] for _ in rows]
        for (index, head, tail), result in zip(pairs, predicted, strict=True):
            row = rows[index]
            relations[index].append({
                "head": _span_text(head, row), "tail": _span_text(tail, row), "relation": result["relation"],
                "probability": float(result["probabilities"][result["relation"]]),
            })
        return [{**row, "relations": found} for row, found in zip(rows, relations, strict=True)]

    def __call__(self, batch: Any) -> Any:
        return _table(_run_isolated(self._predict, _rows(batch), "re", self.cfg.input))


def _span_text(span: dict, row: dict) -> dict:
    start, end = span["start"], span["end"]
    return {"start": start, "end": end, "text": " ".join(row["tokens"][start:end])}


# --------------------------------------------------------------------------- output

OUTPUT_COLUMNS = ("id", "line", "text", "tokens", "image", "image_used", "back_translation_used",
                  "back_translation_cached", "divergence", "entities", "relations", "error")


def output_schema() -> Any:
    import pyarrow as pa

    span = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("text", pa.string())])
    entity = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("char_start", pa.int32()),
                        ("char_end", pa.int32()), ("text", pa.string()), ("type", pa.string()),
                        ("score", pa.float32())])
    relation = pa.struct([("head", span), ("tail", span), ("relation", pa.string()), ("probability", pa.float32())])
    return pa.schema([
        ("id", pa.string()), ("line", pa.int64()), ("text", pa.string()), ("tokens", pa.list_(pa.string())),
        ("image", pa.string()), ("image_used", pa.bool_()), ("back_translation_used", pa.bool_()),
        ("back_translation_cached", pa.bool_()), ("divergence", pa.list_(pa.float32())),
        ("entities", pa.list_(entity)), ("relations", pa.list_(relation)), ("error", pa.string()),
    ])


def output_row(row: dict, tasks: list[str]) -> dict:
    """A finished row in the output's columns (``entities``/``relations`` null for a task not run):
    ``back_translation_used`` when every task had its v', ``back_translation_cached`` when every
    v' used came from the cache."""
    ok = not row.get("error")
    used = [task for task in tasks if row.get(f"back_translation_uri_{task}")]
    return {
        "id": row["id"], "line": row["line"], "text": row.get("text"), "tokens": row.get("tokens") or [],
        "image": row.get("image"), "image_used": bool(ok and row.get("image_uri")),
        "back_translation_used": bool(ok and tasks and len(used) == len(tasks)),
        "back_translation_cached": bool(ok and used and all(row.get(f"back_translation_cached_{t}") for t in used)),
        "divergence": row.get("divergence") if ok else None,
        "entities": row.get("entities") if ok and "ner" in tasks else None,
        "relations": row.get("relations") if ok and "re" in tasks else None,
        "error": row.get("error"),
    }


def _parts_uri(cfg: Config) -> str:
    from tmr_core import storage

    return storage.join(cfg.output, "parts")


def check_same_input(cfg: Config) -> None:
    """Parts are keyed by input line: resuming over another input (or another edit of it) would mix
    rows. The input's (path, size, mtime) and every setting but compute, output and storage are
    recorded beside the parts and must match."""
    from jobs._config import config_to_dict
    from jobs._data import file_infos
    from tmr_core import storage

    options = cfg.storage.options()
    marker = storage.join(cfg.output, "input.json")
    settings = _without_compute(config_to_dict(cfg))
    for key in ("output", "force", "storage"):
        settings.pop(key, None)
    identity = json.loads(json.dumps({**settings, "input_files": file_infos(cfg.input, options)}))
    if storage.exists(marker, options) and storage.exists(_parts_uri(cfg), options) and storage.list_files(_parts_uri(cfg), options):
        recorded = json.loads(storage.read_bytes(marker, options))
        if recorded != identity:
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise ConfigError([f"--output {cfg.output}: holds parts of another run ({', '.join(changed)} changed); "
                               "--force true starts over, or choose another --output"])
    storage.write_text_atomic(marker, json.dumps(identity), options)


def _without_compute(settings: Any) -> Any:
    """The config without its ``compute`` sections (how fast, not what comes out)."""
    if isinstance(settings, dict):
        return {k: _without_compute(v) for k, v in settings.items() if k != "compute"}
    return settings


def finished_lines(cfg: Config) -> set[int]:
    """Input lines a previous run already wrote (a part that does not read is removed: its rows rerun)."""
    import io

    import pyarrow.parquet as pq

    from tmr_core import storage

    done: set[int] = set()
    parts = _parts_uri(cfg)
    options = cfg.storage.options()
    if not storage.exists(parts, options):
        return done
    for uri in storage.list_files(parts, options):
        try:
            done.update(pq.read_table(io.BytesIO(storage.read_bytes(uri, options)), columns=["line"])
                        .column("line").to_pylist())
        except Exception:  # noqa: BLE001 - a torn part: its rows are predicted again
            storage.remove(uri, options)
    return done


def make_sink(cfg: Config) -> Any:
    """A Ray Data ``Datasink`` writing each finished block to ``parts/part-<lines>.parquet``
    (atomically; named after its lines, so a retried write replaces its own file)."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    from tmr_core import storage

    parts, options, tasks, schema = _parts_uri(cfg), cfg.storage.options(), list(cfg.tasks), output_schema()

    class PredictionSink(Datasink):
        def get_name(self) -> str:
            return "Predictions"

        def write(self, blocks: Any, ctx: Any) -> int:
            rows = [output_row(r, tasks) for block in blocks for r in BlockAccessor.for_block(block).to_arrow().to_pylist()]
            if not rows:
                return 0
            table = pa.Table.from_pylist(rows, schema=schema)
            name = hashlib.sha1(",".join(str(r["line"]) for r in rows).encode()).hexdigest()[:20]
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            storage.write_bytes_atomic(storage.join(parts, f"part-{name}.parquet"), buffer.getvalue(), options)
            return len(rows)

    return PredictionSink()


def read_parts(cfg: Config) -> Any:
    """Every written row, in input order."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmr_core import storage

    options = cfg.storage.options()
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri, options)), schema=output_schema())
              for uri in storage.list_files(_parts_uri(cfg), options)]
    table = pa.concat_tables(tables) if tables else output_schema().empty_table()
    return table.sort_by("line")


def conll_lines(rows: list[dict]) -> list[str]:
    """CoNLL (``token\\tBIO-tag``, a blank line between posts, ``# id = …`` before each) of the NER rows."""
    lines = []
    for row in rows:
        if row["entities"] is None:
            continue
        tags = ["O"] * len(row["tokens"])
        for entity in row["entities"]:
            tags[entity["start"]] = f"B-{entity['type']}"
            for i in range(entity["start"] + 1, entity["end"]):
                tags[i] = f"I-{entity['type']}"
        lines += [f"# id = {row['id']}", *(f"{t}\t{g}" for t, g in zip(row["tokens"], tags, strict=True)), ""]
    return lines


def write_outputs(cfg: Config, table: Any) -> None:
    import io

    import pyarrow.parquet as pq

    from tmr_core import storage

    options = cfg.storage.options()
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(storage.join(cfg.output, "predictions.parquet"), buffer.getvalue(), options)
    rows = table.to_pylist()
    jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    storage.write_bytes_atomic(storage.join(cfg.output, "predictions.jsonl"), jsonl.encode("utf-8"), options)
    if "ner" in cfg.tasks:
        conll = "\n".join(conll_lines(rows)) + "\n"
        storage.write_bytes_atomic(storage.join(cfg.output, "predictions.conll"), conll.encode("utf-8"), options)


def summarize(cfg: Config, table: Any, predicted_now: int, seconds: float) -> dict:
    """Rows, rows/s, rows without image, failed rows and why (the first words of each error)."""
    from collections import Counter

    rows = table.to_pylist()
    errors = [r["error"] for r in rows if r["error"]]
    reasons = Counter(e.split(": ", 2)[-1].split(" (")[0][:80] for e in errors)
    return {
        "rows": len(rows), "predicted_this_run": predicted_now, "seconds": round(seconds, 2),
        "rows_per_s": round(predicted_now / seconds, 2) if seconds > 0 else None,
        "rows_without_image": sum(1 for r in rows if not r["error"] and not r["image_used"]),
        "rows_failed": len(errors), "failures": dict(reasons.most_common(10)),
        "entities": sum(len(r["entities"] or []) for r in rows),
        "relations": sum(len(r["relations"] or []) for r in rows),
    }


# --------------------------------------------------------------------------- driver


def pipeline(cfg: Config, rows: list[dict]) -> Any:
    """The Ray Data pipeline: each model step on its own actor pool."""
    import ray

    from jobs._data import actor_pool_args

    uris = (cfg.input, cfg.output, cfg.back_translation.cache_uri)
    # input blocks of the smallest step batch (up to 1,000): Ray Data bundles them up to the larger
    # batches downstream, and each written block is a part, what a rerun skips or redoes
    smallest = min(c.batch_size for c in (cfg.phrases.compute, cfg.back_translation.compute, cfg.grounding.compute,
                                          cfg.divergence.compute, cfg.ner.compute, cfg.re.compute))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // smallest, 1000)))
    ds = ds.map_batches(Phrases, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.phrases.compute, *uris))
    if cfg.back_translation.enabled:
        import dataclasses

        identities = back_translation_identities(cfg)  # each back-translator's, once per job
        compute = cfg.back_translation.compute
        if cfg.mode == "fast":  # cache look-ups only: the pool must not wait for a GPU it will not use
            compute = dataclasses.replace(compute, num_gpus=0.0, accelerator_resource=None)
        ds = ds.map_batches(BackTranslate, fn_constructor_kwargs={"cfg": cfg, "identities": identities},
                            **actor_pool_args(compute, *uris))
    ds = ds.map_batches(Ground, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.grounding.compute, *uris))
    ds = ds.map_batches(Divergence, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.divergence.compute, *uris))
    if "ner" in cfg.tasks:
        ds = ds.map_batches(RecognizeEntities, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.ner.compute, *uris))
    if "re" in cfg.tasks:
        ds = ds.map_batches(ClassifyRelations, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.re.compute, *uris))
    return ds


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    if not cfg.tasks:
        raise ConfigError(["--ner_model / --re_model: give at least one model to predict with"])
    print_config(cfg, JOB)
    from jobs._data import init_ray
    from tmr_core import storage

    options = cfg.storage.options()
    if not storage.exists(cfg.input, options):
        raise ConfigError([f"--input {cfg.input!r}: no such file"])
    if cfg.force and storage.exists(_parts_uri(cfg), options):
        storage.remove(_parts_uri(cfg), options)
    storage.makedirs(cfg.output, options)
    check_same_input(cfg)
    image_root = cfg.image_dir or storage.parent(cfg.input)
    rows = input_rows(cfg, read_records(cfg.input, options), image_root)
    done = finished_lines(cfg)
    todo = [row for row in rows if row["line"] not in done]
    print(f"[{JOB}] {len(rows)} rows in {cfg.input}: {len(done)} already predicted, {len(todo)} to go "
          f"({', '.join(cfg.tasks)}; mode {cfg.mode})", flush=True)
    start = time.perf_counter()
    if todo:
        init_ray()
        storage.makedirs(_parts_uri(cfg), options)
        pipeline(cfg, todo).write_datasink(make_sink(cfg))
    seconds = time.perf_counter() - start
    table = read_parts(cfg)
    write_outputs(cfg, table)
    summary = summarize(cfg, table, len(todo), seconds)
    storage.write_text_atomic(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2), options)
    save_config(cfg, cfg.output, options=options)
    print(f"[{JOB}] rows {summary['rows']} | predicted now {summary['predicted_this_run']} in {summary['seconds']}s "
          f"({summary['rows_per_s']} rows/s) | without image {summary['rows_without_image']} | "
          f"failed {summary['rows_failed']} | entities {summary['entities']} | relations {summary['relations']}")
    for reason, count in summary["failures"].items():
        print(f"[{JOB}]   failed: {count} × {reason}")
    print(f"[{JOB}] wrote {storage.join(cfg.output, 'predictions.jsonl')} (and .parquet"
          f"{', .conll' if 'ner' in cfg.tasks else ''}, summary.json)")
    return 0


if __name__ == "__main__":
    run_main(main)
