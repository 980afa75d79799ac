"""The demo page's examples: one test-split item per alignment category and task, with gold labels.

The demo models know only the synthetic world of ``jobs.make_synthetic_benchmark``, so the page
offers its sentences rather than real posts. :func:`load_examples` reads a benchmark folder in
the real file formats (Twitter-2017 NER ``ner/test.txt``, MNRE ``re/ours_test.txt``, read with
:mod:`tmr_core.readers`) and its ``ground_truth.jsonl`` (each item's alignment, ambiguity and
gold boxes), and picks, for NER and for RE and for each alignment (strengthen, complement,
weaken), the first test item in file order, preferring one whose label the text alone leaves
open (``ambiguous``: there the image decides) and, for RE, a related pair (an MNRE sentence's
second line is the reverse pair, always ``None``). The pick depends on the files alone.

The image travels inside the example as a ``data:image/png;base64,`` URL, which the page both
shows and posts back, so the folder need not lie under the server's ``image_uri_prefixes``.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from tmr_core.readers import (
    chunk_entities,
    image_candidates,
    re_sample_ids,
    read_mnre,
    read_twitter_ner,
    split_source,
)
from tmr_core.schema import ALIGNMENT_CATEGORIES
from tmr_core.synthetic import read_ground_truth

SPLIT = "test"


@functools.cache
def load_examples(folder: str | Path) -> list[dict]:
    """The examples of a synthetic benchmark folder: NER first, then RE, each in alignment order.
    Read once per folder and process (a failed read is not kept, so a later call retries).

    Args:
        folder: a local ``make_synthetic_benchmark`` output (``ner/``, ``re/``, ``images/``,
            ``ground_truth.jsonl``).

    Returns:
        Dicts in the shape of :class:`serve.schemas.Example`; a category the split lacks is left out.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (the message says which and
            how to make it).
        tmr_core.errors.DataFormatError: a file is malformed (``path:line``).
    """
    folder = Path(folder)
    truth_path = folder / "ground_truth.jsonl"
    if not truth_path.is_file():
        raise FileNotFoundError(f"examples_dir: {truth_path} does not exist; run `make demo` (or "
                                "python -m jobs.make_synthetic_benchmark) to write the benchmark there")
    truth = {row["id"]: row for row in read_ground_truth(truth_path) if row["split"] == SPLIT}
    return [_with_image(example) for example in _ner_examples(folder, truth) + _re_examples(folder, truth)]


def _ner_examples(folder: Path, truth: dict[str, dict]) -> list[dict]:
    source = split_source("synthetic", "ner", folder, None, SPLIT)
    candidates = []
    for sentence in read_twitter_ner(source.text_path):
        row = truth.get(sentence.image_id)
        if row is None or row["task"] != "ner":
            continue
        boxes = {(m["start"], m["end"]): m.get("box") for m in row["mentions"]}
        entities = [{"text": " ".join(sentence.tokens[start:end]), "type": kind, "start": start, "end": end,
                     "box": boxes.get((start, end))} for kind, start, end in chunk_entities(sentence.tags)]
        ambiguous = any(m["ambiguous"] for m in row["mentions"])
        example = _example(sentence.image_id, "ner", row["alignment"], sentence.tokens,
                           image_candidates(source, sentence.image_id), {"entities": entities})
        candidates.append((not ambiguous, example))
    return _pick(candidates)


def _re_examples(folder: Path, truth: dict[str, dict]) -> list[dict]:
    source = split_source("synthetic", "re", folder, None, SPLIT)
    instances = read_mnre(source.text_path)
    candidates = []
    for sample_id, inst in zip(re_sample_ids(instances, source.text_path), instances, strict=True):
        row = truth.get(sample_id)
        if row is None or row["task"] != "re":
            continue
        gold = {
            "head": {"text": inst.head.name, "start": inst.head.start, "end": inst.head.end, "box": row.get("head_box")},
            "tail": {"text": inst.tail.name, "start": inst.tail.start, "end": inst.tail.end, "box": row.get("tail_box")},
            "relation": inst.relation,
        }
        example = _example(sample_id, "re", row["alignment"], inst.tokens,
                           image_candidates(source, inst.image_id), gold)
        candidates.append(((inst.relation == "None", not row["ambiguous"]), example))
    return _pick(candidates)


def _pick(candidates: list[tuple[object, dict]]) -> list[dict]:
    """Per alignment category, the candidate with the smallest preference key, then the first in file order."""
    picked = []
    for alignment in ALIGNMENT_CATEGORIES:
        ranked = [(key, i) for i, (key, example) in enumerate(candidates) if example["alignment"] == alignment]
        if ranked:
            picked.append(candidates[min(ranked)[1]][1])
    return picked


def _example(sample_id: str, task: str, alignment: str, tokens: list[str], image_paths: list[str],
             gold: dict) -> dict:
    """A candidate example; its image is read only once it is picked (:func:`_with_image`)."""
    return {"id": sample_id, "task": task, "alignment": alignment, "text": " ".join(tokens), "tokens": list(tokens),
            "image_paths": image_paths, "gold": gold}


def _with_image(example: dict) -> dict:
    """The picked example with its image as a data URL in place of the paths it may be at."""
    paths = example.pop("image_paths")
    path = next((Path(p) for p in paths if Path(p).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"examples_dir: no image for {example['id']} (looked for {', '.join(paths)})")
    return {**example, "image": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")}
