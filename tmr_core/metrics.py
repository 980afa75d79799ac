"""Evaluation metrics: entity-chunk F1 (NER), relation micro F1 (RE), and the MDE's class F1.

- ``ner_scores``: precision/recall/F1 over entity chunks with conlleval semantics, the numbers
  seqeval's default mode gives (paper Table 1, MNER columns).
- ``re_scores``: micro precision/recall/F1 over relation labels other than the no-relation
  label, as the MNRE baselines report (paper Table 1, MRE columns).
- ``classification_scores``: accuracy and macro F1 over the three alignment categories for the
  divergence estimator (paper Table 3 reports "F1" without saying which average; we report the
  macro F1 over strengthen/complement/weaken, so a classifier that ignores a category is punished).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

_PREFIXES = ("B", "I", "E", "S")


def _split_tag(tag: str, where: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``."""
    if tag == "O":
        return "O", ""
    prefix, sep, entity_type = tag.partition("-")
    if not sep or prefix not in _PREFIXES or not entity_type:
        raise ValueError(f"{where}: tag {tag!r} is not 'O' or '<B|I|E|S>-<TYPE>'")
    return prefix, entity_type


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """conlleval's endOfChunk: does the chunk that ``prev`` belongs to end before this tag?"""
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", "O"):
        return True
    return prev_prefix != "O" and prev_type != entity_type


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """conlleval's startOfChunk: does a new chunk start at this tag? (an orphan I- does)."""
    if prefix in ("B", "S"):
        return True
    if prefix in ("I", "E") and prev_prefix in ("E", "S", "O"):
        return True
    return prefix != "O" and prev_type != entity_type


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks of one tag sequence as ``(type, start, end)`` with ``end`` exclusive.

    conlleval semantics (BIO and BIOES): an ``I-`` after ``O`` or after another type starts a
    chunk, a type change inside a chunk ends it and starts a new one, ``B-`` always starts one.

    Raises:
        ValueError: a tag is not ``O`` or ``<B|I|E|S>-<TYPE>``.
    """
    found: list[tuple[str, int, int]] = []
    prev_prefix, prev_type, start = "O", "", -1
    for position, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes a final chunk
        prefix, entity_type = _split_tag(tag, f"tags[{position}]")
        if start >= 0 and _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            found.append((prev_type, start, position))
            start = -1
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            start = position
        prev_prefix, prev_type = prefix, entity_type
    return found


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision/recall/F1, micro over all chunks and per entity type.

    A predicted chunk is correct when its type, start and end equal a gold chunk's in the same
    sentence (conlleval; equal to seqeval's default mode). Scores are fractions in [0, 1]; a
    zero denominator gives 0.

    Args:
        gold: one tag list per sentence.
        pred: one tag list per sentence, the same lengths as ``gold``.

    Returns:
        ``{"precision", "recall", "f1", "support", "per_type": {TYPE: {"precision", "recall",
        "f1", "support"}}}`` where ``support`` counts gold chunks; ``per_type`` covers every type
        seen in gold or pred.

    Raises:
        ValueError: the sentence counts or a sentence's lengths differ, or a tag is malformed.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    correct, predicted, expected = Counter(), Counter(), Counter()
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {index}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}"
            )
        gold_chunks, pred_chunks = set(chunks(gold_tags)), set(chunks(pred_tags))
        expected.update(c[0] for c in gold_chunks)
        predicted.update(c[0] for c in pred_chunks)
        correct.update(c[0] for c in gold_chunks & pred_chunks)
    per_type = {
        entity_type: {
            **_prf(correct[entity_type], predicted[entity_type], expected[entity_type]),
            "support": expected[entity_type],
        }
        for entity_type in sorted(set(expected) | set(predicted))
    }
    totals = _prf(sum(correct.values()), sum(predicted.values()), sum(expected.values()))
    return {**totals, "support": sum(expected.values()), "per_type": per_type}


def re_scores(gold: Sequence[str], pred: Sequence[str], none_label: str = "None") -> dict:
    """Micro precision/recall/F1 over relations other than ``none_label`` (MNRE protocol).

    correct = #(pred == gold != none_label); precision = correct / #(pred != none_label);
    recall = correct / #(gold != none_label). Predicting ``none_label`` for a real relation costs
    recall only; predicting a relation where gold is ``none_label`` costs precision only.

    Returns:
        ``{"precision", "recall", "f1", "support", "per_label": {LABEL: {"precision", "recall",
        "f1", "support"}}}`` with ``support`` = gold count; ``per_label`` covers every label but
        ``none_label`` seen in gold or pred.

    Raises:
        ValueError: ``gold`` and ``pred`` differ in length.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    correct, predicted, expected = Counter(), Counter(), Counter()
    for gold_label, pred_label in zip(gold, pred, strict=True):
        if gold_label != none_label:
            expected[gold_label] += 1
        if pred_label != none_label:
            predicted[pred_label] += 1
        if gold_label == pred_label and gold_label != none_label:
            correct[gold_label] += 1
    per_label = {
        label: {**_prf(correct[label], predicted[label], expected[label]), "support": expected[label]}
        for label in sorted(set(expected) | set(predicted))
    }
    totals = _prf(sum(correct.values()), sum(predicted.values()), sum(expected.values()))
    return {**totals, "support": sum(expected.values()), "per_label": per_label}


def classification_scores(
    gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable]
) -> dict:
    """Accuracy and macro F1 over ``labels`` (the MDE's strengthen/complement/weaken, Table 3).

    Macro F1 is the unweighted mean of the per-label F1 over every label in ``labels``, including
    a label with no gold and no predicted sample (its F1 counts as 0), so the number is
    comparable across test sets.

    Returns:
        ``{"accuracy", "macro_f1", "support", "per_label": {LABEL: {"precision", "recall", "f1",
        "support"}}}``.

    Raises:
        ValueError: lengths differ, ``labels`` is empty, or gold/pred holds a value not in ``labels``.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    if not labels:
        raise ValueError("labels: expected at least one label")
    allowed = set(labels)
    for name, values in (("gold", gold), ("pred", pred)):
        unknown = sorted({str(v) for v in values if v not in allowed})
        if unknown:
            raise ValueError(f"{name}: values {unknown} are not in labels {list(labels)}")
    correct = Counter(g for g, p in zip(gold, pred, strict=True) if g == p)
    predicted, expected = Counter(pred), Counter(gold)
    per_label = {
        label: {**_prf(correct[label], predicted[label], expected[label]), "support": expected[label]}
        for label in labels
    }
    return {
        "accuracy": sum(correct.values()) / len(gold) if gold else 0.0,
        "macro_f1": sum(scores["f1"] for scores in per_label.values()) / len(labels),
        "support": len(gold),
        "per_label": per_label,
    }
