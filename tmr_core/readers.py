"""Readers for the file formats of the paper's datasets, and their rows in the shared schema.

* Twitter-2015 / Twitter-2017 (multimodal NER): ``IMGID:<id>`` line, one ``token<TAB>tag``
  line per token, a blank line. BIO over PER/LOC/ORG and a miscellaneous type spelled
  ``OTHER`` (2015) or ``MISC`` (2017), normalised to ``MISC``. Orphan ``I-`` tags are kept as
  they are; :func:`chunk_entities` follows conlleval, so an orphan ``I-`` starts an entity.
* MNRE (multimodal RE): one Python dict literal per line with ``token``, ``h``, ``t``,
  ``img_id``, ``relation`` (spans are ``[start, end)`` token offsets) and ``ours_rel2id.json``.
* JSONL (a user's own NER or RE data): one JSON object per line, spans as character offsets into
  ``text`` (tokenised by :func:`tokenize_with_offsets`) or token offsets into ``tokens``; see
  :func:`read_jsonl`.

The readers are lenient where real files vary (CRLF, a UTF-8 BOM, a missing final blank line)
and strict where a line is wrong: every problem is a :class:`~tmr_core.errors.DataFormatError`
whose message starts with ``path:line`` and says what was found and what was expected.
The exact rules and full-file counts are in the project's notes on the TMR data (FORMATS.md).
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tmr_core import storage
from tmr_core.errors import DataFormatError
from tmr_core.schema import NER_TAGS, NER_TYPES

NER_FORMATS = ("twitter2015", "twitter2017")
FORMATS = ("twitter2015", "twitter2017", "mnre", "synthetic", "jsonl")
RE_KEYS = ("token", "h", "t", "img_id", "relation")
ImagePolicy = Literal["error", "skip", "keep"]


@dataclass
class Span:
    """A token span ``[start, end)`` and its surface text ``' '.join(tokens[start:end])``."""

    name: str
    start: int
    end: int


@dataclass
class NerSentence:
    """One sentence of a Twitter NER file; ``line`` is the 1-based line of its ``IMGID:``."""

    image_id: str
    tokens: list[str]
    tags: list[str]
    line: int


@dataclass
class ReInstance:
    """One MNRE line: an entity pair in a sentence and its relation; ``line`` is 1-based."""

    tokens: list[str]
    head: Span
    tail: Span
    image_id: str
    relation: str
    line: int


# --------------------------------------------------------------------------- text lines


def _read_lines(path: str | Path) -> list[str]:
    """The file's lines without line endings; a BOM and CRLF endings are accepted."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"not UTF-8 (byte {raw[exc.start]:#04x}); expected UTF-8 text") from None
    # split("\n") and not splitlines(): tokens may hold U+2028 and friends, which are not line ends here.
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return lines


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _shown(value: object, limit: int = 80) -> str:
    """A value as an error quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------- Twitter NER


def ner_tag_set(misc_alias: str | None = None) -> dict[str, str]:
    """Accepted tag spellings -> normalised tag. ``misc_alias`` is the file's miscellaneous type
    (``OTHER`` in Twitter-2015); ``None`` accepts both ``OTHER`` and ``MISC``."""
    aliases = {"MISC": "MISC"}
    for alias in ("OTHER",) if misc_alias is None else (misc_alias,):
        aliases[alias] = "MISC"
    types = {t: t for t in NER_TYPES} | aliases
    tags = {"O": "O"}
    for spelled, normal in types.items():
        for prefix in ("B-", "I-"):
            tags[prefix + spelled] = prefix + normal
    return tags


def read_twitter_ner(path: str | Path, misc_alias: str | None = None) -> list[NerSentence]:
    """Read a Twitter-2015/2017 NER file into sentences with normalised BIO tags.

    Args:
        path: a ``train.txt``/``val.txt``/``valid.txt``/``test.txt`` file.
        misc_alias: how the file spells the miscellaneous type besides ``MISC`` (``OTHER`` in
            Twitter-2015); ``None`` accepts ``OTHER``. Either way it becomes ``MISC``.

    Returns:
        The sentences in file order. Tokens are kept exactly, including ones a BERT tokenizer
        reduces to nothing (U+FE0F, U+200B, …): their tags stay aligned, one tag per token.

    Raises:
        DataFormatError: ``path:line`` for a token line before any ``IMGID:``, an empty or
            repeated image id, an ``IMGID:`` line with no blank line before it, a sentence
            without tokens, a token line that is not ``token<TAB>tag``, or a tag outside the
            label set.
    """
    tag_set = ner_tag_set(misc_alias)
    sentences: list[NerSentence] = []
    first_seen: dict[str, int] = {}
    current: NerSentence | None = None

    def close(at_line: int) -> None:
        nonlocal current
        if current is not None and not current.tokens:
            raise DataFormatError(
                path, current.line, f"sentence IMGID:{current.image_id} has no token lines; "
                f"expected 'token<TAB>tag' lines before the blank line at line {at_line}"
            )
        if current is not None:
            sentences.append(current)
        current = None

    lines = _read_lines(path)
    for number, line in enumerate(lines, start=1):
        if line.strip() == "":
            close(number)  # repeated blank lines between sentences are harmless
            continue
        if line.startswith("IMGID:"):
            if current is not None:
                raise DataFormatError(
                    path, number, f"found {_shorten(line)} inside the sentence of line {current.line}; "
                    "expected a blank line before the next IMGID"
                )
            image_id = line[len("IMGID:"):].strip()
            if not image_id:
                raise DataFormatError(path, number, "found an empty image id; expected 'IMGID:<id>'")
            if image_id in first_seen:
                raise DataFormatError(
                    path, number, f"image id '{image_id}' repeats line {first_seen[image_id]}; "
                    "expected each IMGID once per file"
                )
            first_seen[image_id] = number
            current = NerSentence(image_id=image_id, tokens=[], tags=[], line=number)
            continue
        if current is None:
            raise DataFormatError(
                path, number, f"found token line {_shorten(line)} before any IMGID; expected 'IMGID:<id>'"
            )
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise DataFormatError(
                path, number, f"found {_shorten(line)}; expected one 'token<TAB>tag' with a non-empty token and tag"
            )
        token, tag = parts[0], parts[1].strip()
        if tag not in tag_set:
            raise DataFormatError(
                path, number, f"found tag '{tag}' (token {_shorten(token)}); expected one of {' '.join(tag_set)}"
            )
        current.tokens.append(token)
        current.tags.append(tag_set[tag])
    close(len(lines) + 1)  # lenient: the last sentence may lack its blank line
    return sentences


def chunk_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity chunks ``(type, start, end)`` (end exclusive) under conlleval rules.

    An entity starts at ``B-X``, or at ``I-X`` after ``O`` or after another type (an orphan
    ``I-``, as in Twitter-2015); it continues over ``I-X`` of the same type. This is the lenient
    chunking of conlleval and seqeval's default, which TMR scores with.
    """
    chunks: list[tuple[str, int, int]] = []
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, tag_type = tag.partition("-")
        continues = prefix == "I" and tag_type == kind
        if start is not None and not continues:
            chunks.append((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_type
    return chunks


# --------------------------------------------------------------------------- MNRE


def read_rel2id(path: str | Path) -> dict[str, int]:
    """Read ``ours_rel2id.json``: relation label -> class id (ids 0..n-1, ``None`` = no relation)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "no such file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"not valid JSON ({exc.msg}); expected {{\"label\": id, ...}}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in mapping.items()
    ):
        raise DataFormatError(path, 1, "expected a JSON object of relation label -> integer id")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise DataFormatError(path, 1, f"found ids {sorted(mapping.values())}; expected each of 0..{len(mapping) - 1} once")
    return mapping


def _read_span(path: Path, number: int, key: str, value: object, tokens: list[str]) -> Span:
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and "pos" in value):
        raise DataFormatError(
            path, number, f"found '{key}': {_shorten(repr(value))}; expected {{'name': str, 'pos': [start, end]}}"
        )
    pos = value["pos"]
    if not (
        isinstance(pos, (list, tuple)) and len(pos) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) for p in pos)
    ):
        raise DataFormatError(path, number, f"found '{key}' pos {pos!r}; expected [start, end] of two integers")
    start, end = pos
    if not 0 <= start < end <= len(tokens):
        raise DataFormatError(
            path, number, f"'{key}' span [{start}, {end}) lies outside the sentence of {len(tokens)} tokens; "
            f"expected 0 <= start < end <= {len(tokens)}"
        )
    text = " ".join(tokens[start:end])
    if value["name"] != text:
        raise DataFormatError(
            path, number, f"'{key}' name {value['name']!r} disagrees with its span [{start}, {end}) = {text!r}; "
            "expected name == ' '.join(token[start:end])"
        )
    return Span(name=value["name"], start=start, end=end)


def _parse_mnre_line(path: Path, number: int, line: str, relations: set[str] | None) -> ReInstance:
    try:
        record = ast.literal_eval(line)  # a literal parser: the file is Python repr, and eval would run code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataFormatError(path, number, f"found {_shorten(line)}; expected a Python dict literal") from None
    if not isinstance(record, dict):
        raise DataFormatError(path, number, f"found a {type(record).__name__} literal; expected a dict")
    missing = [key for key in RE_KEYS if key not in record]
    if missing:
        raise DataFormatError(
            path, number, f"missing key {', '.join(repr(k) for k in missing)}; expected keys {', '.join(RE_KEYS)}"
        )
    tokens = record["token"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise DataFormatError(path, number, f"found 'token': {_shorten(repr(tokens))}; expected a list of non-empty strings")
    head = _read_span(path, number, "h", record["h"], tokens)
    tail = _read_span(path, number, "t", record["t"], tokens)
    image_id, relation = record["img_id"], record["relation"]
    if not (isinstance(image_id, str) and image_id):
        raise DataFormatError(path, number, f"found 'img_id': {image_id!r}; expected a non-empty file name")
    if not isinstance(relation, str) or (relations is not None and relation not in relations):
        expected = "a string" if relations is None else f"one of the {len(relations)} labels of rel2id"
        raise DataFormatError(path, number, f"found relation {relation!r}; expected {expected}")
    return ReInstance(tokens=tokens, head=head, tail=tail, image_id=image_id, relation=relation, line=number)


def read_mnre(path: str | Path, relations: set[str] | dict[str, int] | None = None) -> list[ReInstance]:
    """Read an MNRE ``ours_{train,val,test}.txt`` file: every line, in order, none resampled.

    TMR resamples the training split with replacement even at ratio 1.0 (about a third of the
    lines are lost); this reader keeps every line.

    Args:
        path: the text file, one Python dict literal per line (parsed with ``ast.literal_eval``).
        relations: the accepted relation labels (e.g. :func:`read_rel2id`'s keys); ``None``
            accepts any string.

    Raises:
        DataFormatError: ``path:line`` for a line that is not a dict literal, a missing key, a
            span outside the sentence or whose ``name`` disagrees with it, or an unknown relation.
    """
    path = Path(path)
    allowed = set(relations) if relations is not None else None
    instances = []
    for number, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            instances.append(_parse_mnre_line(path, number, line, allowed))
    return instances


# --------------------------------------------------------------------------- JSONL (a user's own data)

JSONL_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
# The keys that say which task a JSONL row holds; a row holds one task's keys, never both.
JSONL_TASK_KEYS = {"ner": ("entities", "tags"), "re": ("head", "tail", "relation")}
_JSONL_COMMON_KEYS = ("id", "text", "tokens", "image")


@dataclass
class JsonlSample:
    """One row of a JSONL file in the shared schema's terms; ``line`` is 1-based.

    ``columns`` holds ``tokens`` and ``tags`` (NER) or ``tokens, head, tail, relation`` (RE);
    ``image`` is the row's image as written (``None``: the sample has no image).
    """

    id: str
    columns: dict
    image: str | None
    line: int
    labels: list[str]


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def _is_word_char(char: str) -> bool:
    # Combining marks belong to the word they modify: Devanagari vowel signs and a decomposed "é"
    # would otherwise split a word in two.
    return char.isalnum() or char == "_" or _is_mark(char)


# a URL, an @handle or a #hashtag: the tweet files' tokens that contain punctuation
_SOCIAL_TOKEN = re.compile(r"https?://\S+|[@#]\w+")


def tokenize_with_offsets(text: str) -> list[tuple[str, int, int]]:
    """Split ``text`` into ``(token, start, end)`` with character offsets (``end`` exclusive).

    The one tokeniser of the JSONL format: a token is a maximal run of letters, digits and
    underscores, or any other single non-space character; combining marks (accents, vowel signs,
    the emoji selector U+FE0F) stay with the character before them; whitespace separates tokens
    and is dropped. So ``"Obama's visit to New-York!"`` gives ``Obama ' s visit to New - York !``.
    URLs, ``@handles`` and ``#hashtags`` stay one token each, as the Twitter-2015/2017 and MNRE files
    tokenise them (``"RT @nba: #Finals"`` gives ``RT @nba : #Finals``), so a model trained on those
    files reads raw tweets split its way.
    Offsets count Python ``str`` characters (Unicode code points), not bytes or UTF-16 units.
    """
    tokens = []
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        social = _SOCIAL_TOKEN.match(text, position)
        if social:  # as the Twitter-2015/2017 and MNRE files keep them: one token each
            tokens.append((social.group(), position, social.end()))
            position = social.end()
            continue
        start = position
        position += 1
        continues = _is_word_char if _is_word_char(text[start]) else _is_mark
        while position < len(text) and continues(text[position]):
            position += 1
        tokens.append((text[start:position], start, position))
    return tokens


def _parse_json_object(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            path, number, f"not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise DataFormatError(path, number, f"found a JSON {type(record).__name__}; expected one JSON object per line")
    return record


def jsonl_row_task(path: Path, number: int, record: dict) -> str:
    """``ner`` or ``re``, from which task's keys the row holds (``entities``/``tags`` or ``head``/``tail``)."""
    found = {task: [key for key in keys if key in record] for task, keys in JSONL_TASK_KEYS.items()}
    if found["ner"] and found["re"]:
        raise DataFormatError(
            path, number, f"found NER keys {found['ner']} and RE keys {found['re']} in one row; "
            "expected a row of one task: 'entities' or 'tags' (NER), or 'head', 'tail', 'relation' (RE)"
        )
    if not (found["ner"] or found["re"]):
        raise DataFormatError(
            path, number, f"found keys {sorted(record)}; expected 'entities' or 'tags' (NER), "
            "or 'head', 'tail', 'relation' (RE)"
        )
    return "ner" if found["ner"] else "re"


def _check_keys(path: Path, number: int, record: dict, task: str) -> None:
    """Unknown keys are errors: a misspelt ``image`` would otherwise silently mean "no image"."""
    allowed = _JSONL_COMMON_KEYS + JSONL_TASK_KEYS[task]
    unknown = sorted(key for key in record if key not in allowed)
    if unknown:
        raise DataFormatError(path, number, f"found unknown key(s) {unknown}; expected only {', '.join(allowed)}")
    if ("text" in record) == ("tokens" in record):
        found = "both 'text' and 'tokens'" if "text" in record else "neither 'text' nor 'tokens'"
        raise DataFormatError(
            path, number, f"found {found}; expected exactly one: 'text' (character spans) or 'tokens' (token spans)"
        )


def _row_tokens(path: Path, number: int, record: dict) -> tuple[list[str], list[tuple[int, int]] | None]:
    """The row's tokens, and each token's character span when they come from ``text``."""
    if "text" in record:
        text = record["text"]
        pieces = tokenize_with_offsets(text) if isinstance(text, str) else []
        if not pieces:
            raise DataFormatError(path, number, f"found 'text': {_shown(text)}; expected a string with words")
        return [token for token, _, _ in pieces], [(start, end) for _, start, end in pieces]
    tokens = record["tokens"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise DataFormatError(path, number, f"found 'tokens': {_shown(tokens)}; expected a list of non-empty strings")
    return tokens, None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_span(
    path: Path, number: int, what: str, value: object, record: dict,
    tokens: list[str], offsets: list[tuple[int, int]] | None, extra_keys: tuple[str, ...] = (),
) -> tuple[int, int]:
    """A ``{"start", "end"}`` span of the row as a token span ``[start, end)``.

    With ``text`` (``offsets`` given) the span is in characters and must start at a token's
    start and end at a token's end; with ``tokens`` it is already in tokens. An optional
    ``"text"`` key must equal the span's text, which catches offsets counted in another unit.
    """
    unit = "characters" if offsets is not None else "tokens"
    keys = ("start", "end", "text") + extra_keys
    if not (isinstance(value, dict) and _is_int(value.get("start")) and _is_int(value.get("end"))
            and all(key in keys for key in value)):
        shape = ", ".join(['"start": int', '"end": int'] + [f'"{key}": str' for key in extra_keys] + ['"text"?: str'])
        raise DataFormatError(
            path, number, f"found {what} {_shown(value)}; expected {{{shape}}} in {unit}, end exclusive"
        )
    start, end = value["start"], value["end"]
    limit = len(record["text"]) if offsets is not None else len(tokens)
    if not 0 <= start < end <= limit:
        raise DataFormatError(
            path, number, f"{what} span [{start}, {end}) is empty or outside the sentence of {limit} {unit}; "
            f"expected 0 <= start < end <= {limit}"
        )
    surface = record["text"][start:end] if offsets is not None else " ".join(tokens[start:end])
    if "text" in value and value["text"] != surface:
        raise DataFormatError(
            path, number, f"{what} text {_shown(value['text'])} disagrees with its span [{start}, {end}) = "
            f"{_shorten(surface)}; expected "
            + ("the character offsets of that text (Python str indices: Unicode code points)" if offsets is not None
               else "the token offsets of that text (its tokens joined by one space)")
        )
    if offsets is None:
        return start, end
    starts = {s: i for i, (s, _) in enumerate(offsets)}
    ends = {e: i + 1 for i, (_, e) in enumerate(offsets)}
    if start not in starts or end not in ends:
        around = ", ".join(f"{token!r} [{s}, {e})" for token, (s, e) in zip(tokens, offsets, strict=True)
                           if s < end and e > start)
        raise DataFormatError(
            path, number, f"{what} span [{start}, {end}) = {_shorten(surface)} does not fall on token boundaries "
            f"(tokens there: {around}); expected a span from a token's start to a token's end (tokens are runs of "
            "letters, digits, _ and marks, or single other characters), or give 'tokens' instead of 'text'"
        )
    return starts[start], ends[end]


def _ner_columns(path: Path, number: int, record: dict) -> tuple[dict, list[str]]:
    """``{tokens, tags}`` of a NER row, and its entity types."""
    tokens, offsets = _row_tokens(path, number, record)
    if offsets is None:
        if "entities" in record:
            raise DataFormatError(
                path, number, "found 'entities' with 'tokens'; expected 'entities' with 'text' or 'tags' with 'tokens'"
            )
        tags = record.get("tags")
        if not (isinstance(tags, list) and len(tags) == len(tokens)):
            raise DataFormatError(
                path, number, f"found 'tags': {_shown(tags)}; expected a list of {len(tokens)} BIO tags, one per token"
            )
        for i, tag in enumerate(tags):
            if tag not in NER_TAGS:
                raise DataFormatError(
                    path, number, f"found tag {tag!r} at token {i} ({tokens[i]!r}); expected one of {' '.join(NER_TAGS)}"
                )
        return {"tokens": tokens, "tags": list(tags)}, [chunk[0] for chunk in chunk_entities(tags)]
    if "tags" in record:
        raise DataFormatError(
            path, number, "found 'tags' with 'text'; expected 'entities' with 'text' or 'tags' with 'tokens'"
        )
    entities = record.get("entities")
    if not isinstance(entities, list):
        raise DataFormatError(
            path, number, f"found 'entities': {_shown(entities)}; expected a list of {{start, end, type}} objects"
        )
    tags = ["O"] * len(tokens)
    owner: dict[int, int] = {}  # token -> the entity that tagged it, to name both in an overlap
    for k, entity in enumerate(entities):
        what = f"entity {k}"
        start, end = _row_span(path, number, what, entity, record, tokens, offsets, extra_keys=("type",))
        kind = entity.get("type")
        if kind not in NER_TYPES:
            raise DataFormatError(path, number, f"{what} has type {kind!r}; expected one of {', '.join(NER_TYPES)}")
        clash = next((owner[i] for i in range(start, end) if i in owner), None)
        if clash is not None:
            raise DataFormatError(
                path, number, f"{what} [{entity['start']}, {entity['end']}) overlaps entity {clash} "
                f"[{entities[clash]['start']}, {entities[clash]['end']}); expected entities that do not overlap (BIO)"
            )
        for i in range(start, end):
            tags[i] = ("B-" if i == start else "I-") + kind
            owner[i] = k
    return {"tokens": tokens, "tags": tags}, [entity["type"] for entity in entities]


def _re_columns(path: Path, number: int, record: dict) -> tuple[dict, list[str]]:
    """``{tokens, head, tail, relation}`` of an RE row (spans as the MNRE reader gives them)."""
    tokens, offsets = _row_tokens(path, number, record)
    spans = {}
    for key in ("head", "tail"):
        if key not in record:
            raise DataFormatError(path, number, f"missing '{key}'; expected 'head', 'tail' and 'relation'")
        start, end = _row_span(path, number, f"'{key}'", record[key], record, tokens, offsets)
        spans[key] = vars(Span(name=" ".join(tokens[start:end]), start=start, end=end))
    relation = record.get("relation")
    if not (isinstance(relation, str) and relation):
        raise DataFormatError(path, number, f"found 'relation': {relation!r}; expected a non-empty label string")
    return {"tokens": tokens, **spans, "relation": relation}, [relation]


def _row_image(path: Path, number: int, record: dict) -> str | None:
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise DataFormatError(
            path, number, f"found 'image': {_shown(image)}; expected a file name, path or s3:// URI, or null"
        )
    return image


def _row_id(path: Path, number: int, record: dict) -> str:
    sample_id = record.get("id")
    if sample_id is None:
        return f"{path.stem}-{number}"  # stable across reruns while the line stays where it is
    if not (isinstance(sample_id, str) and sample_id):
        raise DataFormatError(path, number, f"found 'id': {_shown(sample_id)}; expected a non-empty string or no id")
    return sample_id


def read_jsonl(path: str | Path, task: str) -> list[JsonlSample]:
    """Read a JSONL file of a user's own NER or RE data: every row, in order.

    One JSON object per line (blank lines are skipped):

    * NER: ``{"id"?, "text", "entities": [{"start", "end", "type"}], "image"?}`` with character
      offsets (``end`` exclusive) and types PER|LOC|ORG|MISC, or ``{"id"?, "tokens", "tags",
      "image"?}`` with one BIO tag per token.
    * RE: ``{"id"?, "text" | "tokens", "head": {"start", "end"}, "tail": {...}, "relation",
      "image"?}``: character offsets with ``text``, token offsets with ``tokens``.

    ``text`` is split by :func:`tokenize_with_offsets`, and a character span must fall on its
    token boundaries. A span may carry ``"text"``, which must equal the text it covers. ``id``
    defaults to ``<file stem>-<line>``; ``image`` (a name under the image folder, an absolute
    path or a URI) may be absent or null for a sample without an image.

    Args:
        task: ``ner`` or ``re``; a row of the other task is an error.

    Raises:
        DataFormatError: ``path:line`` for the first line that is not a JSON object, holds an
            unknown key or the other task, has a span off the sentence or off token boundaries,
            overlapping entities, an unknown type or tag, or an id an earlier line holds.
    """
    if task not in JSONL_TASK_KEYS:
        raise ValueError(f"task must be 'ner' or 're', got {task!r}")
    path = Path(path)
    samples: list[JsonlSample] = []
    first_seen: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        record = _parse_json_object(path, number, line)
        row_task = jsonl_row_task(path, number, record)
        if row_task != task:
            raise DataFormatError(
                path, number, f"found a {row_task} row (keys {sorted(record)}); expected a {task} row: the dataset's "
                "task is set by --task or by the first row of the first split, and every row holds it"
            )
        _check_keys(path, number, record, task)
        sample_id = _row_id(path, number, record)
        if sample_id in first_seen:
            raise DataFormatError(
                path, number, f"id {sample_id!r} repeats line {first_seen[sample_id]}; expected each id once per file"
            )
        first_seen[sample_id] = number
        columns, labels = (_ner_columns if task == "ner" else _re_columns)(path, number, record)
        samples.append(JsonlSample(sample_id, columns, _row_image(path, number, record), number, labels))
    return samples


def infer_jsonl_task(data_dir: str | Path, split: str) -> str:
    """The task (``ner`` or ``re``) of the first row of ``split``'s JSONL file, for a dataset
    read without ``--task``; :func:`read_jsonl` then holds every row of every split to it.

    Raises:
        DataFormatError: the file is missing or empty, or its first row is malformed.
    """
    path = Path(data_dir) / JSONL_FILES[split]
    for number, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            return jsonl_row_task(path, number, _parse_json_object(path, number, line))
    raise DataFormatError(
        path, None, "holds no samples; expected one JSON object per line (the first row sets the task unless "
        "--task is given)"
    )


# --------------------------------------------------------------------------- dataset layouts


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a dataset lives on disk."""

    task: Literal["ner", "re"]
    text_path: Path
    image_dir: str
    image_suffix: str  # NER: appended to the IMGID; RE: "" (img_id is a file name)
    split_dir: str  # TMR keeps MNRE images in img_org/{train,val,test}/
    misc_alias: str | None = None
    rel2id_path: Path | None = None
    format: str = ""  # jsonl rows name their own image (or none); the other formats derive it from an id


_NER_FILES = {
    "twitter2015": {"train": "train.txt", "valid": "val.txt", "test": "test.txt"},
    "twitter2017": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
    "synthetic": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
}
_MNRE_FILES = {"train": "ours_train.txt", "valid": "ours_val.txt", "test": "ours_test.txt"}
_TMR_SPLIT_DIRS = {"train": "train", "valid": "val", "test": "test"}


def task_of(format: str, task: str | None = None) -> str:
    """The task a format holds; ``synthetic`` and ``jsonl`` may hold either, so they need ``task``
    (for ``jsonl``, :func:`infer_jsonl_task` reads it from the data)."""
    if format in NER_FORMATS:
        return "ner"
    if format == "mnre":
        return "re"
    if format in ("synthetic", "jsonl"):
        if task not in ("ner", "re"):
            raise ValueError(f"format {format!r} needs task 'ner' or 're', got {task!r}")
        return task
    raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")


def split_source(format: str, task: str | None, data_dir: str | Path, image_dir: str | None, split: str) -> SplitSource:
    """The text file and image folder of ``split`` (``train``|``valid``|``test``) in a layout.

    ``image_dir`` may be ``None`` for ``synthetic`` (images are in ``<data_dir>/images``) and
    for ``jsonl`` (image names are relative to ``<data_dir>``).
    """
    task = task_of(format, task)
    if split not in _MNRE_FILES:
        raise ValueError(f"unknown split {split!r}; expected train, valid or test")
    data_dir = Path(data_dir)
    if format == "synthetic":
        data_dir = data_dir / task
        image_dir = image_dir or str(data_dir.parent / "images")
    if format == "jsonl":
        image_dir = image_dir or str(data_dir)
    if not image_dir:
        raise ValueError(f"format {format!r} needs an image folder")
    image_dir = image_dir if storage.is_remote(image_dir) else str(Path(image_dir).expanduser().resolve())
    if format == "jsonl":
        return SplitSource(task=task, text_path=data_dir / JSONL_FILES[split], image_dir=image_dir, image_suffix="",
                           split_dir=split, format="jsonl")
    if task == "ner":
        return SplitSource(
            task="ner",
            text_path=data_dir / _NER_FILES[format][split],
            image_dir=image_dir,
            image_suffix=".png" if format == "synthetic" else ".jpg",
            split_dir=_TMR_SPLIT_DIRS[split],
            misc_alias="OTHER" if format == "twitter2015" else "MISC",
        )
    return SplitSource(
        task="re",
        text_path=data_dir / _MNRE_FILES[split],
        image_dir=image_dir,
        image_suffix="",
        split_dir=_TMR_SPLIT_DIRS[split],
        rel2id_path=data_dir / "ours_rel2id.json",
    )


# --------------------------------------------------------------------------- images


@dataclass
class ImageCheck:
    """The outcome of looking for one image: its URI, or why there is none."""

    uri: str | None
    problem: Literal["missing", "corrupt"] | None = None
    detail: str = ""


def check_image(candidates: list[str], options: storage.StorageOptions | None = None) -> ImageCheck:
    """The first candidate URI that exists; it must decode as the later stages will load it
    (:func:`tmr_core.images.check_decodes`), so a broken image meets the policy here."""
    from tmr_core.images import check_decodes  # PIL, only when images are checked

    for uri in candidates:
        if not storage.exists(uri, options):
            continue
        try:
            check_decodes(storage.read_bytes(uri, options), uri)
        except ValueError as exc:
            return ImageCheck(uri=None, problem="corrupt", detail=str(exc))
        return ImageCheck(uri=uri)
    return ImageCheck(uri=None, problem="missing", detail=f"no image at {' or '.join(candidates)}")


def image_name_escapes(name: str) -> bool:
    """Whether a file name from a data line would resolve outside the image folder once joined
    to it: an absolute path, or ``..`` above its start (either separator). Symlinks inside the
    folder are the folder owner's choice and are followed."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return True
    normal = posixpath.normpath(name.replace("\\", "/"))
    return normal == ".." or normal.startswith("../")


def names_own_location(source: SplitSource, image: str) -> bool:
    """Whether a jsonl row's image is an absolute path or a URI, used as written: the user chose
    that location. Any other name is relative to the image folder and must stay inside it."""
    return source.format == "jsonl" and (storage.is_remote(image) or Path(image).is_absolute())


def image_candidates(source: SplitSource, image_id: str) -> list[str]:
    if names_own_location(source, image_id):
        return [image_id]
    name = image_id + source.image_suffix
    candidates = [storage.join(source.image_dir, name)]
    if source.task == "re" and source.format != "jsonl":
        candidates.append(storage.join(source.image_dir, source.split_dir, name))
    return candidates


# --------------------------------------------------------------------------- rows


@dataclass
class SplitStats:
    """What one split held and what was written, for the job's summary."""

    split: str
    source: str
    rows_read: int = 0
    rows_written: int = 0
    labels: Counter = field(default_factory=Counter)  # NER: entities per type; RE: rows per relation
    images_missing: int = 0
    images_corrupt: int = 0


def re_sample_ids(instances: list[ReInstance], path: str | Path) -> list[str]:
    """``<img stem>-<k>``, k counting the consecutive lines of one image from 0.

    Raises:
        DataFormatError: when an image's lines are not consecutive, so an id would repeat.
    """
    ids, seen = [], {}
    previous, k = None, 0
    for inst in instances:
        k = k + 1 if inst.image_id == previous else 0
        previous = inst.image_id
        sample_id = f"{Path(inst.image_id).stem}-{k}"
        if sample_id in seen:
            raise DataFormatError(
                path, inst.line, f"sample id '{sample_id}' repeats line {seen[sample_id]}: the lines of image "
                f"'{inst.image_id}' are not consecutive; expected all lines of an image together"
            )
        seen[sample_id] = inst.line
        ids.append(sample_id)
    return ids


def rows_for_split(
    format: str,
    task: str | None,
    data_dir: str | Path,
    image_dir: str | None,
    split: str,
    on_missing_image: ImagePolicy = "error",
    storage_options: storage.StorageOptions | None = None,
) -> tuple[list[dict], SplitStats]:
    """Read one split into rows of :func:`tmr_core.schema.base_schema` and count what happened.

    Sample ids: NER uses the IMGID; RE uses ``<img_id stem>-<k>`` (see :func:`re_sample_ids`);
    jsonl uses the row's ``id`` or ``<file stem>-<line>``. All are stable across reruns and unique
    within the split. A jsonl row without an image gets ``image_id`` ``""`` and a null ``image_uri``,
    and is not counted as missing.

    Args:
        on_missing_image: a missing or unreadable image raises (``error``), drops the row
            (``skip``; training rows only: a valid or test row is kept as with ``keep``, so
            scores stay comparable) or keeps it with a null ``image_uri`` (``keep``).

    Raises:
        DataFormatError: a malformed line (``path:line``), or with ``error``, the first sample
            whose image is missing or corrupt, with the counts of all such samples.
    """
    if on_missing_image not in ("error", "skip", "keep"):
        raise ValueError(f"on_missing_image must be error, skip or keep, got {on_missing_image!r}")
    source = split_source(format, task, data_dir, image_dir, split)
    stats = SplitStats(split=split, source=str(source.text_path))
    if source.format == "jsonl":
        samples = [(s.id, s.image, s.line, s.columns, s.labels) for s in read_jsonl(source.text_path, source.task)]
    elif source.task == "ner":
        sentences = read_twitter_ner(source.text_path, source.misc_alias)
        samples = [
            (s.image_id, s.image_id, s.line, {"tokens": s.tokens, "tags": s.tags}, [c[0] for c in chunk_entities(s.tags)])
            for s in sentences
        ]
    else:
        relations = read_rel2id(source.rel2id_path)
        instances = read_mnre(source.text_path, relations)
        samples = [
            (
                sample_id,
                inst.image_id,
                inst.line,
                {"tokens": inst.tokens, "head": vars(inst.head), "tail": vars(inst.tail), "relation": inst.relation},
                [inst.relation],
            )
            for sample_id, inst in zip(re_sample_ids(instances, source.text_path), instances, strict=True)
        ]

    if not samples:
        what = "JSON lines" if source.format == "jsonl" else "IMGID blocks" if source.task == "ner" else "dict lines"
        raise DataFormatError(
            source.text_path, None, f"holds no samples; expected the {split} split's {what} (an empty file is a "
            "failed copy or download; leave the split out of --splits to skip it)"
        )
    for _, image_id, line, _, _ in samples:
        if image_id is None or names_own_location(source, image_id):
            continue
        if image_name_escapes(image_id + source.image_suffix):
            raise DataFormatError(
                source.text_path, line, f"image {_shorten(image_id)} resolves outside --image_dir "
                f"{source.image_dir}; expected a file name inside it"
                + (", an absolute path or a URI" if source.format == "jsonl" else "")
            )

    checks: dict[str, ImageCheck] = {}  # MNRE has up to 21 lines per image: look once
    failures: list[tuple[int, ImageCheck]] = []
    rows: list[dict] = []
    for sample_id, image_id, line, columns, labels in samples:
        stats.rows_read += 1
        if image_id is None:  # a jsonl sample without an image: text only, by design
            check = ImageCheck(uri=None)
        elif image_id not in checks:
            checks[image_id] = check = check_image(image_candidates(source, image_id), storage_options)
        else:
            check = checks[image_id]
        if check.problem is not None:
            stats.images_missing += check.problem == "missing"
            stats.images_corrupt += check.problem == "corrupt"
            failures.append((line, check))
            if on_missing_image == "skip" and split == "train":  # valid and test are never thinned
                continue
        rows.append(
            {"id": sample_id, "split": split, "task": source.task, **columns, "image_id": image_id or "",
             "image_uri": check.uri}
        )
        stats.labels.update(labels)
    if failures and on_missing_image == "error":
        line, check = failures[0]
        raise DataFormatError(
            source.text_path, line, f"{check.detail}; {stats.images_missing} sample(s) of split '{split}' have a "
            f"missing image and {stats.images_corrupt} a corrupt one (use on_missing_image skip or keep to go on)"
        )
    stats.rows_written = len(rows)
    return rows, stats


# --------------------------------------------------------------------------- across splits


@dataclass
class SplitOverlap:
    """Sample ids that two splits share; ``ids`` sorted."""

    first: str
    second: str
    ids: list[str]


def cross_split_overlaps(ids_by_split: dict[str, list[str]]) -> list[SplitOverlap]:
    """Every pair of splits that shares sample ids, in split order.

    A sample in both training and evaluation data leaks the test answers into training and
    inflates every reported score, so the job treats any overlap as an error by default.
    """
    splits = list(ids_by_split)
    overlaps = []
    for i, first in enumerate(splits):
        for second in splits[i + 1:]:
            shared = set(ids_by_split[first]) & set(ids_by_split[second])
            if shared:
                overlaps.append(SplitOverlap(first, second, sorted(shared)))
    return overlaps
