"""Readers for the file formats of the paper's datasets, and their rows in the shared schema.

* Twitter-2015 / Twitter-2017 (multimodal NER): ``IMGID:<id>`` line, one ``token<TAB>tag``
  line per token, a blank line. BIO over PER/LOC/ORG and a miscellaneous type spelled
  ``OTHER`` (2015) or ``MISC`` (2017), normalised to ``MISC``. Orphan ``I-`` tags are kept as
  they are; :func:`chunk_entities` follows conlleval, so an orphan ``I-`` starts an entity.
* MNRE (multimodal RE): one Python dict literal per line with ``token``, ``h``, ``t``,
  ``img_id``, ``relation`` (spans are ``[start, end)`` token offsets) and ``ours_rel2id.json``.

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tmr_core import storage
from tmr_core.errors import DataFormatError
from tmr_core.schema import NER_TYPES

NER_FORMATS = ("twitter2015", "twitter2017")
FORMATS = ("twitter2015", "twitter2017", "mnre", "synthetic")
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


_NER_FILES = {
    "twitter2015": {"train": "train.txt", "valid": "val.txt", "test": "test.txt"},
    "twitter2017": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
    "synthetic": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
}
_MNRE_FILES = {"train": "ours_train.txt", "valid": "ours_val.txt", "test": "ours_test.txt"}
_TMR_SPLIT_DIRS = {"train": "train", "valid": "val", "test": "test"}


def task_of(format: str, task: str | None = None) -> str:
    """The task a format holds; ``synthetic`` holds both, so it needs ``task``."""
    if format in NER_FORMATS:
        return "ner"
    if format == "mnre":
        return "re"
    if format == "synthetic":
        if task not in ("ner", "re"):
            raise ValueError(f"format 'synthetic' needs task 'ner' or 're', got {task!r}")
        return task
    raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")


def split_source(format: str, task: str | None, data_dir: str | Path, image_dir: str | None, split: str) -> SplitSource:
    """The text file and image folder of ``split`` (``train``|``valid``|``test``) in a layout.

    ``image_dir`` may be ``None`` for ``synthetic`` (images are in ``<data_dir>/images``).
    """
    task = task_of(format, task)
    if split not in _MNRE_FILES:
        raise ValueError(f"unknown split {split!r}; expected train, valid or test")
    data_dir = Path(data_dir)
    if format == "synthetic":
        data_dir = data_dir / task
        image_dir = image_dir or str(data_dir.parent / "images")
    if not image_dir:
        raise ValueError(f"format {format!r} needs an image folder")
    image_dir = image_dir if storage.is_remote(image_dir) else str(Path(image_dir).expanduser().resolve())
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


def image_candidates(source: SplitSource, image_id: str) -> list[str]:
    name = image_id + source.image_suffix
    candidates = [storage.join(source.image_dir, name)]
    if source.task == "re":
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

    Sample ids: NER uses the IMGID; RE uses ``<img_id stem>-<k>`` (see :func:`re_sample_ids`).
    Both are stable across reruns and unique within the split.

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
    if source.task == "ner":
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
        raise DataFormatError(
            source.text_path, None, f"holds no samples; expected the {split} split's "
            f"{'IMGID blocks' if source.task == 'ner' else 'dict lines'} (an empty file is a failed copy or "
            "download; leave the split out of --splits to skip it)"
        )
    for _, image_id, line, _, _ in samples:
        if image_name_escapes(image_id + source.image_suffix):
            raise DataFormatError(
                source.text_path, line, f"image {_shorten(image_id)} resolves outside --image_dir "
                f"{source.image_dir}; expected a file name inside it"
            )

    checks: dict[str, ImageCheck] = {}  # MNRE has up to 21 lines per image: look once
    failures: list[tuple[int, ImageCheck]] = []
    rows: list[dict] = []
    for sample_id, image_id, line, columns, labels in samples:
        stats.rows_read += 1
        if image_id not in checks:
            checks[image_id] = check_image(image_candidates(source, image_id), storage_options)
        check = checks[image_id]
        if check.problem is not None:
            stats.images_missing += check.problem == "missing"
            stats.images_corrupt += check.problem == "corrupt"
            failures.append((line, check))
            if on_missing_image == "skip" and split == "train":  # valid and test are never thinned
                continue
        rows.append(
            {"id": sample_id, "split": split, "task": source.task, **columns, "image_id": image_id, "image_uri": check.uri}
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
