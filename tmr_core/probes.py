"""Probes that show a TMR mechanism works in the synthetic world (DESIGN.md, "Evidence").

Back-translation fidelity (Eq. 3): v' should show what the text says. In the synthetic world an
entity type is a coloured glyph (:data:`tmr_core.synthetic.TYPE_GLYPH`), so a *reader* that knows
the glyph colours can say which type an image shows, and a back-translation is faithful when, for
a text whose context decides the focus mention's type ("Just landed in Jordan"), the reader reads
that type in v'. For a text that decides nothing ("Everyone is talking about Jordan"), a faithful
back-translator can only guess, so the reader's agreement with the gold type is near chance
(1 / number of types the name allows): higher would mean v' leaks the answer from elsewhere.

The reader looks at colours, not at the largest blob: in the revised world the deciding glyph is
small (10–18 px of 64) and distractor glyphs of other kinds share the image. Each pixel goes to
the nearest colour of the world's palette (every glyph colour, black links, the light background)
when it is close enough; the type whose colour covers the most pixels, among the candidate types,
is read, provided it covers at least ``min_fraction`` of the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DECIDING_ALIGNMENTS = ("strengthen", "weaken")  # the focus mention's context is a type
UNDECIDED_ALIGNMENTS = ("complement",)  # the context is neutral


@dataclass(frozen=True)
class GlyphReader:
    """Reads the entity type a synthetic-world image shows from its glyph colours.

    Args:
        max_distance: RGB distance within which a pixel counts as a palette colour (a blurry
            generated glyph is off its exact colour).
        min_fraction: the read type must cover at least this share of the image's pixels;
            below it the reader reads nothing (``None``).
    """

    max_distance: float = 90.0
    min_fraction: float = 0.01

    def type_fractions(self, image: Any) -> dict[str, float]:
        """Share of the image's pixels nearest to each type's glyph colour (within ``max_distance``).

        Args:
            image: a PIL image or an [H, W, 3] uint8 array.
        """
        from tmr_core.synthetic import GLYPHS, TYPE_GLYPH

        pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
        pixels = pixels.reshape(-1, 3)  # [N, 3]
        names = list(GLYPHS) + ["black", "background"]
        palette = np.array([GLYPHS[k][1] for k in GLYPHS] + [(0, 0, 0), (238, 238, 238)], dtype=np.float32)  # [P, 3]
        distance = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=-1)  # [N, P]
        nearest = distance.argmin(axis=1)
        close = distance[np.arange(len(pixels)), nearest] <= self.max_distance
        counts = np.bincount(nearest[close], minlength=len(names))
        return {etype: float(counts[names.index(kind)]) / len(pixels) for etype, kind in TYPE_GLYPH.items()}

    def read(self, image: Any, candidates: Sequence[str] | None = None) -> str | None:
        """The type (among ``candidates``, default all four) whose colour covers the most pixels,
        or ``None`` when none covers ``min_fraction`` of the image."""
        fractions = self.type_fractions(image)
        pool = {t: f for t, f in fractions.items() if candidates is None or t in candidates}
        if not pool:
            return None
        best = max(pool, key=lambda t: pool[t])
        return best if pool[best] >= self.min_fraction else None

    def read_set(self, image: Any, candidates: Sequence[str], size: int) -> frozenset[str] | None:
        """The ``size`` types (among ``candidates``) whose colours cover the most pixels, each at
        least ``min_fraction`` of the image; ``None`` when fewer than ``size`` do."""
        fractions = self.type_fractions(image)
        ranked = sorted((t for t in set(candidates) if fractions[t] >= self.min_fraction),
                        key=lambda t: fractions[t], reverse=True)
        return frozenset(ranked[:size]) if len(ranked) >= size else None


def focus_mention(truth_row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A ground-truth NER row's focus mention: the one whose name is not a fixed name."""
    for mention in truth_row.get("mentions") or []:
        if mention.get("context") != "fixed":
            return mention
    return None


@dataclass(frozen=True)
class ProbeItem:
    """One text of the probe: its id, the gold focus type, the types its name allows, the type its
    context decides (``None`` when neutral) and its alignment label."""

    id: str
    gold_type: str
    allowed: tuple[str, ...]
    decided_type: str | None
    alignment: str


def probe_items(truth_rows: Iterable[Mapping[str, Any]], split: str | None = None) -> list[ProbeItem]:
    """The NER rows of ``split`` (all splits if None) with a focus mention, as :class:`ProbeItem`."""
    from tmr_core.schema import NER_TYPES
    from tmr_core.synthetic import AMBIGUOUS_NAMES

    items = []
    for row in truth_rows:
        if row.get("task") != "ner" or (split is not None and row.get("split") != split):
            continue
        mention = focus_mention(row)
        if mention is None:
            continue
        context = mention.get("context")
        items.append(ProbeItem(
            id=row["id"], gold_type=mention["type"],
            allowed=tuple(AMBIGUOUS_NAMES.get(mention["text"], NER_TYPES)),
            decided_type=context if context in NER_TYPES else None, alignment=row.get("alignment", ""),
        ))
    return items


def relation_probe_items(truth_rows: Iterable[Mapping[str, Any]], split: str | None = None) -> list[tuple[ProbeItem, ProbeItem]]:
    """The RE rows of ``split`` (all splits if None) whose relation names argument types, as a
    (head, tail) pair of :class:`ProbeItem`.

    An RE text decides its relation (``context``) or is neutral; a relation decides both argument
    types (:data:`tmr_core.synthetic.RELATIONS`), which is what v' can show. ``None`` relations
    (types drawn at random, not recorded) and the reverse pairs (``-1``: the same text and v') are
    left out.
    """
    from tmr_core.schema import NER_TYPES
    from tmr_core.synthetic import AMBIGUOUS_NAMES, RELATIONS

    pairs = []
    for row in truth_rows:
        if row.get("task") != "re" or (split is not None and row.get("split") != split):
            continue
        if row.get("relation") not in RELATIONS or not str(row.get("id", "")).endswith("-0"):
            continue
        decided = RELATIONS.get(row.get("context"))  # None when the context is neutral
        pairs.append(tuple(
            ProbeItem(id=row["id"], gold_type=gold, allowed=tuple(AMBIGUOUS_NAMES.get(row[role], NER_TYPES)),
                      decided_type=decided[index] if decided else None, alignment=row.get("alignment", ""))
            for index, (role, gold) in enumerate(zip(("head", "tail"), RELATIONS[row["relation"]], strict=True))
        ))
    return pairs


def relation_back_translation_fidelity(pairs: Sequence[tuple[ProbeItem, ProbeItem]], images: Mapping[str, Any],
                                       reader: GlyphReader | None = None) -> dict[str, float]:
    """:func:`back_translation_fidelity` for RE: a v' is faithful to a text that decides its
    relation when the types the reader reads most (as many as the relation has distinct argument
    types, among the types the two names allow) are the relation's; on neutral texts, agreement
    with the gold types is compared with chance (1 / the number of such sets). Same keys."""
    from math import comb

    reader = reader or GlyphReader()
    outcomes = []
    for head, tail in pairs:
        if head.id not in images:
            continue
        candidates = set(head.allowed) | set(tail.allowed)
        decided = head.decided_type is not None
        wanted = frozenset((head.decided_type, tail.decided_type) if decided else (head.gold_type, tail.gold_type))
        read = reader.read_set(images[head.id], sorted(candidates), len(wanted))
        outcomes.append(_Outcome(read is None, decided, read == wanted, 1.0 / comb(len(candidates), len(wanted))))
    return _fidelity_summary(outcomes)


@dataclass(frozen=True)
class _Outcome:
    """One probe text: did the reader read nothing, does the text decide, did v' show what it
    should, and the chance of that for a neutral text."""

    unread: bool
    deciding: bool
    hit: bool
    chance: float


def _fidelity_summary(outcomes: Sequence[_Outcome]) -> dict[str, float]:
    deciding = [o for o in outcomes if o.deciding]
    undecided = [o for o in outcomes if not o.deciding]
    # a v' the reader reads nothing in guesses nothing: leaking (or hiding) the gold type is judged
    # on the neutral texts whose v' shows a type, against those texts' own chance
    guessed = [o for o in undecided if not o.unread]

    def share(items: Sequence[Any], value: Any) -> float:
        return sum(map(value, items)) / len(items) if items else float("nan")

    low, high = wilson_interval(sum(o.hit for o in guessed), len(guessed))
    return {
        "deciding": share(deciding, lambda o: o.hit),
        "undecided_gold_match": share(undecided, lambda o: o.hit),
        "undecided_chance": share(undecided, lambda o: o.chance),
        "undecided_read_gold_match": share(guessed, lambda o: o.hit),
        "undecided_read_chance": share(guessed, lambda o: o.chance),
        "undecided_read_gold_match_low": low,
        "undecided_read_gold_match_high": high,
        "unread": share(outcomes, lambda o: o.unread),
        "deciding_n": float(len(deciding)),
        "undecided_n": float(len(undecided)),
        "undecided_read_n": float(len(guessed)),
    }


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (scipy's); ``(nan, nan)`` without trials."""
    if trials == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def back_translation_fidelity(items: Sequence[ProbeItem], images: Mapping[str, Any],
                              reader: GlyphReader | None = None) -> dict[str, float]:
    """How often v' shows the type its text decides (Eq. 3 fidelity).

    Args:
        items: probe texts (:func:`probe_items`).
        images: back-translation per item id (PIL image or array); items without one are skipped.
        reader: the glyph reader; a default one if None.

    Returns:
        ``deciding``: share of deciding texts (strengthen/weaken) whose v' reads as the decided type;
        ``undecided_gold_match``: share of neutral texts (complement) whose v' reads as the gold type
        (``undecided_chance``: the mean of 1/|allowed types|);
        ``undecided_read_gold_match``: the same share among the neutral texts whose v' the reader
        reads (an unread v' guesses nothing), its 95 % Wilson interval ``…_low``/``…_high`` and
        ``undecided_read_chance``: faithful when the interval holds that chance, leaking when above;
        ``unread``: share of all v' the reader reads nothing in; and the counts ``deciding_n``,
        ``undecided_n``, ``undecided_read_n``.
    """
    reader = reader or GlyphReader()
    outcomes = []
    for item in items:
        if item.id not in images:
            continue
        read = reader.read(images[item.id], item.allowed)
        decided = item.decided_type is not None
        outcomes.append(_Outcome(read is None, decided, read == (item.decided_type if decided else item.gold_type),
                                 1.0 / len(item.allowed)))
    return _fidelity_summary(outcomes)


def alpha_alignment_scores(rows: Iterable[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Probe of the estimator's transfer (§3.4): argmax α of each pair against the benchmark's
    alignment label (macro F1; chance ≈ 0.33, always *weaken* ≈ 0.15–0.22).

    Args:
        rows: stage rows with ``id`` and ``divergence`` (α = strengthen, complement, weaken).
        truth: ground-truth rows by id (``ground_truth.jsonl``); read only here, never by a model.

    Returns:
        ``macro_f1``, ``accuracy`` and ``support``; {} when no row has both α and a label.
    """
    from tmr_core.metrics import classification_scores
    from tmr_core.schema import ALIGNMENT_CATEGORIES

    pairs = [(truth[row["id"]]["alignment"], row["divergence"]) for row in rows
             if row.get("id") in truth and row.get("divergence") is not None and len(row["divergence"]) == 3]
    if not pairs:
        return {}
    guessed = [ALIGNMENT_CATEGORIES[max(range(3), key=lambda i: alpha[i])] for _, alpha in pairs]
    scores = classification_scores([gold for gold, _ in pairs], guessed, labels=list(ALIGNMENT_CATEGORIES))
    return {"macro_f1": float(scores["macro_f1"]), "accuracy": float(scores["accuracy"]), "support": float(len(pairs))}
