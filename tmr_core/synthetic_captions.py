"""An MDE caption corpus in the words of the NER/RE texts (paper §3.4, Eq. 5–6, Table 3).

The estimator is pretrained on caption-image pairs and then scores the tasks' (sentence, image)
pairs (Eq. 4). Real captions and tweets share everyday vocabulary; a corpus whose captions name
glyphs ("a red circle") while the tweets never do gives an estimator that transfers nothing. Here a
caption is about the synthetic world's *names* (:data:`~tmr_core.synthetic.AMBIGUOUS_NAMES`,
:data:`~tmr_core.synthetic.FIXED_NAMES`) in typed or neutral contexts built from the NER/RE
templates' words, so what the estimator learns (which words decide which object, whether the image
shows it) is what it needs on the tasks.

Labels follow the tasks' alignment semantics, with the objects a caption *decides*: a fixed name
decides its type's glyph, an ambiguous name decides one only in a typed context.

* *strengthen*: the caption decides every mention and the image shows every decided object;
* *complement*: the caption leaves an ambiguous name undecided (neutral context) and the image
  shows an object of one of the types that name allows (plus the decided objects): the image adds
  the missing information;
* *weaken*: a caption that decides every mention, with the image of another pair that shows none
  of the decided objects.

Two caption forms, half each: a *single* mention (as in NER) with 0–2 fixed-name suffixes, and a
*pair* in a relation context (as in MNRE; head glyph left, tail glyph right, a black link when
related). Three styles: ``coco_like`` (fine-grained description) and ``laion_like`` (web title) in
domain, ``sbu_like`` (personal post) out of domain (Table 3); every style supplies every label in
the same proportion, so the style tells nothing about the label. Images follow the benchmark's
version-2 style: small glyphs (about 10–18 px of 64) at random places plus 0–2 distractors
(purple cross, orange bar) that no caption decides.

No template equals a benchmark template, and no caption equals a benchmark sentence (tested).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tmr_core.schema import NER_TYPES
from tmr_core.synthetic import (
    AMBIGUOUS_NAMES,
    FIXED_NAMES,
    GLYPHS,
    MDE_SOURCE_OUT_OF_DOMAIN,
    MDE_SOURCES_IN_DOMAIN,
    MDE_SPLITS,
    RELATIONS,
    TYPE_GLYPH,
    Glyph,
    MDERow,
    Scene,
    SyntheticConfig,
)

DISTRACTOR_KINDS = tuple(kind for kind in sorted(GLYPHS) if kind not in TYPE_GLYPH.values())
GLYPH_SIZE_RANGE = (10 / 64, 18 / 64)  # glyph side as a share of the image side (version-2 style)
PAIR_SHARE = 0.5  # share of captions with two mentions in a relation context (the rest: one mention)
SUFFIX_PROBS = (0.55, 0.35, 0.10)  # P(0, 1, 2 fixed-name suffixes), as the NER sentences
COMPLEMENT_LINK_PROB = 0.75  # a neutral pair's image shows a link as often as an MNRE pair is related

# --------------------------------------------------------------------------- templates
# ``{E}`` one mention; ``{H}``/``{T}`` a head and a tail; suffixes hold ``{F}``, a fixed name.
# Typed templates use the words that decide the type in the tasks' templates (birthday, final,
# landed, snow, CEO, merger, tickets, ceremony, ...); neutral ones the words that decide nothing.

SINGLE_TYPED: dict[str, dict[str, tuple[str, ...]]] = {
    "coco_like": {
        "PER": (
            "a photo of {E} with her fans after the final",
            "{E} signed autographs for fans at the gym",
            "a selfie of {E} with her teammate",
            "{E} at an interview about her new album",
            "{E} scored in the final and fans celebrate",
            "the new mayor {E} at her birthday",
        ),
        "LOC": (
            "the old streets of {E} in heavy snow",
            "a photo of {E} at sunset , the weather is perfect",
            "flights just landed in {E} in heavy snow",
            "the old town of {E} at sunset",
            "heavy snow in the streets of {E}",
            "cheap flights to {E} landed at sunset",
        ),
        "ORG": (
            "the board of {E} met in the new office",
            "engineers at the new office of {E} downtown",
            "the CEO of {E} announced the merger",
            "a statement from the board of {E}",
            "the headquarters of {E} opened downtown",
            "{E} shares fell after the merger",
        ),
        "MISC": (
            "fans at the opening ceremony of {E}",
            "the music at {E} was amazing",
            "sold out tickets for {E}",
            "friends watching {E} tonight",
            "the opening ceremony of {E} with friends",
            "{E} starts next week and tickets are sold out",
        ),
    },
    "laion_like": {
        "PER": (
            "{E} Birthday Selfie | Fans",
            "{E} Interview - New Album",
            "{E} Signed Autographs | Final",
            "Mayor {E} Elected - Big News",
            "{E} Scored Twice | Final Photo",
            "{E} And Her Teammate - Gym Selfie",
        ),
        "LOC": (
            "Heavy Snow In {E} | Weather News",
            "{E} Streets At Sunset - Photo",
            "Cheap Flights To {E} | This Week",
            "{E} Old Town - Sunset Photo",
            "Living In {E} | Perfect Weather",
            "{E} Weather - Heavy Snow Expected",
        ),
        "ORG": (
            "{E} Shares Fell | Big News",
            "{E} CEO Statement - Merger News",
            "{E} Is Hiring Engineers | Office",
            "{E} Board Met - New CEO",
            "{E} Headquarters | Downtown Office",
            "{E} Merger Statement - News",
        ),
        "MISC": (
            "{E} Tickets | Sold Out",
            "{E} Opening Ceremony - Photo",
            "{E} Music | Amazing Night",
            "Watching {E} With Friends - Tonight",
            "{E} Starts Next Week | Tickets",
            "Ready For {E} ? | Tickets",
        ),
    },
    "sbu_like": {
        "PER": (
            "i met {E} at the gym today !",
            "{E} signed autographs for my kid !",
            "my selfie with {E} after the final",
            "{E} , happy birthday from my kid !",
            "my interview with {E} about her album",
            "{E} scored twice and my fans celebrate",
        ),
        "LOC": (
            "just moved to {E} , the weather is perfect",
            "my flights to {E} landed at sunset",
            "heavy snow on my street in {E}",
            "living in {E} since last year",
            "my old town {E} at sunset",
            "snow again in {E} tonight",
        ),
        "ORG": (
            "my CEO at {E} announced a merger",
            "{E} is hiring engineers , i joined !",
            "just joined the board of {E} this season",
            "my office at {E} opened downtown",
            "the board of {E} met with my engineers",
            "{E} shares fell again this morning",
        ),
        "MISC": (
            "my tickets for {E} are sold out",
            "watching {E} with friends tonight !",
            "my favourite part of {E} was the music",
            "ready for {E} next week !",
            "the opening ceremony of {E} , amazing",
            "my kid is watching {E} with friends",
        ),
    },
}
SINGLE_NEUTRAL: dict[str, tuple[str, ...]] = {
    "coco_like": (
        "a photo of {E}",
        "a new photo of {E} today",
        "this is {E} again",
        "a big photo of {E} this week",
        "{E} in a new post",
        "a photo of {E} from last year",
    ),
    "laion_like": (
        "{E} | Photo Of The Day",
        "{E} - New Post",
        "{E} Photo | Trending",
        "{E} - Big News Today",
        "Throwback : {E} | Photo",
        "{E} | Thoughts ?",
    ),
    "sbu_like": (
        "my photo of {E} today",
        "i saw {E} again",
        "look , {E} !",
        "my new post about {E}",
        "still thinking about {E} today",
        "guess what , {E} again",
    ),
}
PAIR_TYPED: dict[str, dict[str, tuple[str, ...]]] = {
    "coco_like": {
        "/per/per/peer": ("{H} and her teammate {T} after the final", "{H} played with {T} in the final"),
        "/per/org/member_of": ("{H} signed a new contract with {T} this season", "{H} joined the board of {T}"),
        "/per/loc/place_of_residence": ("{H} moved to the old town of {T}", "{H} , living in {T} since 2010"),
        "/org/loc/locate_at": ("the headquarters of {H} in {T}", "the new office of {H} opened in {T}"),
        "/loc/loc/contain": ("the old town of {T} in the region of {H}", "the region of {H} and its old town {T}"),
        "/per/misc/present_in": ("{H} performed at the opening ceremony of {T}", "{H} spotted at {T} with fans"),
    },
    "laion_like": {
        "/per/per/peer": ("{H} And Teammate {T} | Final", "{H} Played Alongside {T} - Photo"),
        "/per/org/member_of": ("{H} Joined {T} | Big News", "{H} Signs With {T} - Contract News"),
        "/per/loc/place_of_residence": ("{H} Moved To {T} | News", "{H} Lives In {T} - Photo"),
        "/org/loc/locate_at": ("{H} Headquarters In {T} | Office", "{H} Opens Office In {T} - News"),
        "/loc/loc/contain": ("{H} Region Includes {T} | Old Town", "{H} Region - {T} Old Town Photo"),
        "/per/misc/present_in": ("{H} Performed At {T} | Photo", "{H} At {T} Opening Ceremony - Photo"),
    },
    "sbu_like": {
        "/per/per/peer": ("my photo of {H} with her teammate {T}", "saw {H} and her teammate {T} at the gym"),
        "/per/org/member_of": ("{H} just joined {T} , my fans celebrate", "my kid saw {H} sign with {T}"),
        "/per/loc/place_of_residence": ("{H} moved to {T} , my town !", "{H} lives in my town , {T}"),
        "/org/loc/locate_at": ("my office at {H} is in {T}", "{H} opened an office in my town , {T}"),
        "/loc/loc/contain": ("my old town {T} in {H}", "from {H} , the old town of {T}"),
        "/per/misc/present_in": ("i saw {H} perform at {T}", "{H} at {T} last night , amazing !"),
    },
}
PAIR_NEUTRAL: dict[str, tuple[str, ...]] = {
    "coco_like": ("a photo of {H} and {T}", "{H} and {T} in a new photo", "{H} with {T} this week"),
    "laion_like": ("{H} And {T} | Photo Of The Day", "{H} x {T} - Trending", "{H} And {T} - Big News"),
    "sbu_like": ("my photo of {H} and {T}", "i saw {H} and {T} today", "{H} and {T} again !"),
}
SUFFIXES: dict[str, dict[str, tuple[str, ...]]] = {  # a fixed name decides its type by itself
    "coco_like": {"PER": ("with {F}",), "LOC": ("in {F}",), "ORG": ("for {F}",), "MISC": ("at {F}",)},
    "laion_like": {"PER": ("| {F}",), "LOC": ("| {F}",), "ORG": ("- {F}",), "MISC": ("- {F}",)},
    "sbu_like": {"PER": ("with {F}",), "LOC": ("in {F}",), "ORG": ("via {F}",), "MISC": ("at {F}",)},
}
ENDINGS = {"coco_like": " .", "laion_like": "", "sbu_like": ""}


# --------------------------------------------------------------------------- captions


@dataclass
class _Caption:
    text: str
    decided: list[str]  # entity types the caption decides (one per decided mention)
    undecided: list[tuple[str, ...]]  # allowed types of each undecided mention
    pair: bool  # a head and a tail in a relation context
    related: bool  # the context states a relation (a link in the image)


def _names_allowing(etype: str) -> list[str]:
    return [name for name, types in sorted(AMBIGUOUS_NAMES.items()) if etype in types]


def _with_suffixes(rng: random.Random, source: str, body: str, decided: list[str]) -> str:
    n_fixed = rng.choices((0, 1, 2), weights=SUFFIX_PROBS)[0]
    for etype in rng.sample(NER_TYPES, n_fixed):
        suffix = rng.choice(SUFFIXES[source][etype]).replace("{F}", rng.choice(FIXED_NAMES[etype]))
        body += (" , " if source == "coco_like" else " ") + suffix
        decided.append(etype)
    return body + ENDINGS[source]


def _single_caption(rng: random.Random, source: str, decide_all: bool) -> _Caption:
    name = rng.choice(sorted(AMBIGUOUS_NAMES))
    if decide_all:
        etype = rng.choice(AMBIGUOUS_NAMES[name])
        body, decided, undecided = rng.choice(SINGLE_TYPED[source][etype]).replace("{E}", name), [etype], []
    else:
        body, decided, undecided = rng.choice(SINGLE_NEUTRAL[source]).replace("{E}", name), [], [AMBIGUOUS_NAMES[name]]
    return _Caption(_with_suffixes(rng, source, body, decided), decided, undecided, pair=False, related=decide_all)


def _pair_caption(rng: random.Random, source: str, decide_all: bool) -> _Caption:
    if decide_all:
        relation = rng.choice(sorted(RELATIONS))
        head_type, tail_type = RELATIONS[relation]
        head = rng.choice(_names_allowing(head_type))
        tail = rng.choice([n for n in _names_allowing(tail_type) if n != head])
        template = rng.choice(PAIR_TYPED[source][relation])
        text = template.replace("{H}", head).replace("{T}", tail) + ENDINGS[source]
        return _Caption(text, [head_type, tail_type], [], pair=True, related=True)
    head, tail = rng.sample(sorted(AMBIGUOUS_NAMES), 2)
    text = rng.choice(PAIR_NEUTRAL[source]).replace("{H}", head).replace("{T}", tail) + ENDINGS[source]
    return _Caption(text, [], [AMBIGUOUS_NAMES[head], AMBIGUOUS_NAMES[tail]], pair=True,
                    related=rng.random() < COMPLEMENT_LINK_PROB)


def _caption(rng: random.Random, source: str, decide_all: bool) -> _Caption:
    make = _pair_caption if rng.random() < PAIR_SHARE else _single_caption
    return make(rng, source, decide_all)


# --------------------------------------------------------------------------- images


def _place(rng: random.Random, kinds: list[str], size: int, taken: list[Glyph],
           x_range: tuple[float, float] = (0.0, 1.0)) -> list[Glyph]:
    """Glyphs of ``kinds`` at random places inside ``x_range`` (shares of the width), not overlapping."""
    placed = []
    lo, hi = (max(4, round(size * share)) for share in GLYPH_SIZE_RANGE)
    for kind in kinds:
        side = rng.randint(lo, hi)
        half = side // 2 + 1
        x_min, x_max = max(half, round(size * x_range[0]) + half), min(size - half, round(size * x_range[1]) - half)
        for _attempt in range(100):
            glyph = Glyph(kind, rng.randint(x_min, x_max), rng.randint(half, size - half), side)
            if all(abs(glyph.cx - g.cx) > (side + g.size) / 2 or abs(glyph.cy - g.cy) > (side + g.size) / 2
                   for g in taken + placed):
                break
        placed.append(glyph)  # after 100 misses an overlap is allowed: the kind is still drawn
    return placed


def _scene(rng: random.Random, caption: _Caption, shown_types: list[str], size: int) -> Scene:
    """The caption's objects (``shown_types``, in mention order) and 0–2 distractors."""
    kinds = [TYPE_GLYPH[t] for t in shown_types]
    if caption.pair:  # head left, tail right, then any fixed names anywhere
        glyphs = _place(rng, kinds[:1], size, [], (0.0, 0.5))
        glyphs += _place(rng, kinds[1:2], size, glyphs, (0.5, 1.0))
        glyphs += _place(rng, kinds[2:], size, glyphs)
        links = [(0, 1)] if caption.related else []
    else:
        glyphs, links = _place(rng, kinds, size, []), []
    glyphs += _place(rng, rng.choices(DISTRACTOR_KINDS, k=rng.randint(0, 2)), size, glyphs)
    return Scene(glyphs, links=links, noise_seed=rng.getrandbits(32))


def _shown_types(rng: random.Random, caption: _Caption) -> list[str]:
    """The decided types, and for each undecided mention one of the types it allows."""
    return [rng.choice(allowed) for allowed in caption.undecided] + caption.decided


# --------------------------------------------------------------------------- splits


def _sources(split: str) -> tuple[str, ...]:
    return (MDE_SOURCE_OUT_OF_DOMAIN,) if split == "test_out_of_domain" else MDE_SOURCES_IN_DOMAIN


def generate_caption_split(cfg: SyntheticConfig, split: str, n_rows: int) -> tuple[list[MDERow], dict[str, Scene]]:
    """One MDE split in the tasks' vocabulary, strengthen:complement:weaken = 1:1:2 (paper §3.4).

    Args:
        cfg: the benchmark's config (``seed``, ``image_size``).
        split: ``train``, ``valid``, ``test_in_domain`` (``coco_like`` and ``laion_like``) or
            ``test_out_of_domain`` (``sbu_like``).
        n_rows: rows wanted, rounded down to a multiple of 4.

    Returns:
        ``(rows, scenes)``: :class:`~tmr_core.synthetic.MDERow` with ``named`` = the glyph kinds the
        caption decides; scenes keyed by image name (``mde_<split>_<k>.png``).

    Raises:
        ValueError: an unknown split.
    """
    if split not in MDE_SPLITS:
        raise ValueError(f"split must be one of {MDE_SPLITS}, got {split!r}")
    rng = random.Random(f"{cfg.seed}-captions-{split}")
    n_pairs = n_rows // 4
    sources = _sources(split)
    scenes: dict[str, Scene] = {}
    rows: list[tuple[str, _Caption, str, str]] = []  # (label, caption, image name, source)
    for label in ("strengthen", "complement"):
        for _ in range(n_pairs):
            source = rng.choice(sources)
            caption = _caption(rng, source, decide_all=label == "strengthen")
            image = f"mde_{split}_{len(scenes):06d}.png"
            scenes[image] = _scene(rng, caption, _shown_types(rng, caption), cfg.image_size)
            rows.append((label, caption, image, source))
    donors = sorted(scenes)
    for _ in range(2 * n_pairs):
        source = rng.choice(sources)
        caption = _caption(rng, source, decide_all=True)
        decided = {TYPE_GLYPH[t] for t in caption.decided}
        candidates = [name for name in donors if not decided & {g.kind for g in scenes[name].glyphs}]
        if candidates:
            image = rng.choice(candidates)
        else:  # only in very small splits: draw an unrelated image instead of taking another pair's
            others = [t for t in NER_TYPES if TYPE_GLYPH[t] not in decided]
            image = f"mde_{split}_{len(scenes):06d}.png"
            scenes[image] = _scene(rng, _Caption("", [], [], pair=False, related=False),
                                   rng.sample(others, rng.randint(1, min(2, len(others)))), cfg.image_size)
        rows.append(("weaken", caption, image, source))
    rng.shuffle(rows)
    return [
        MDERow(f"mde_{split}_{i:06d}", caption.text, image, label, source,
               tuple(sorted({TYPE_GLYPH[t] for t in caption.decided})))
        for i, (label, caption, image, source) in enumerate(rows)
    ], scenes


def write_caption_corpus(cfg: SyntheticConfig, out_dir: str | Path, sizes: tuple[int, int, int, int] | None = None) -> dict:
    """Write ``<out_dir>/mde/<split>.parquet`` and ``<out_dir>/mde_images/`` as ``write_benchmark`` does.

    For experiments before the corpus is part of the benchmark; ``sizes`` defaults to
    ``cfg.mde_sizes``. Returns rows per split and label.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmr_core.synthetic import mde_schema, render_scene

    out = Path(out_dir).resolve()
    (out / "mde").mkdir(parents=True, exist_ok=True)
    (out / "mde_images").mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, n_rows in zip(MDE_SPLITS, sizes or cfg.mde_sizes, strict=True):
        rows, scenes = generate_caption_split(cfg, split, n_rows)
        for name, scene in sorted(scenes.items()):
            (out / "mde_images" / name).write_bytes(render_scene(scene, cfg.image_size))
        table = pa.table({
            "id": [r.id for r in rows],
            "caption": [r.caption for r in rows],
            "image_uri": [str(out / "mde_images" / r.image_name) for r in rows],
            "label": [r.label for r in rows],
            "source": [r.source for r in rows],
            "objects_named": [sorted(r.named) for r in rows],
            "objects_shown": [sorted(g.kind for g in scenes[r.image_name].glyphs) for r in rows],
        }, schema=mde_schema())
        pq.write_table(table, out / "mde" / f"{split}.parquet", compression="zstd")
        summary[split] = {label: sum(r.label == label for r in rows) for label in ("strengthen", "complement", "weaken")}
    return summary


__all__ = ["generate_caption_split", "write_caption_corpus", "DISTRACTOR_KINDS", "GLYPH_SIZE_RANGE"]
