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
    HANDLES,
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
UNNAMED_OBJECT_PROB = 0.5  # an object of a type no mention names or allows (version 2's type-coloured distractor)
COMPLEMENT_LINK_PROB = 0.75  # a neutral pair's image shows a link as often as an MNRE pair is related

# --------------------------------------------------------------------------- templates
# A caption is a style's frame around a body; the body joins the mention(s) to context fragments.
# The fragments are the tasks' own contexts, re-cut: typed fragments carry the words that decide a
# type in the NER/RE templates (birthday, final, snow, landed, CEO, merger, tickets, ceremony, ...),
# neutral fragments the words that decide nothing. A body holds one or two fragments and the frame
# adds words, so no caption is a benchmark sentence (tested).

TYPED_FRAGMENTS: dict[str, tuple[str, ...]] = {
    "PER": (
        "happy birthday", "scored twice in the final", "signed autographs for her fans",
        "an interview about her new album", "was elected mayor yesterday", "tweeted a selfie from the gym",
        "with her teammate", "played in the final", "her fans celebrate",
    ),
    "LOC": (
        "heavy snow expected tonight", "just landed", "the streets at sunset", "flights are cheap this week",
        "living there since 2010", "the weather is perfect", "moved there last year", "the old town",
    ),
    "ORG": (
        "shares fell 5 % today", "announced a new CEO", "is hiring 200 engineers", "a statement on the merger",
        "opened a new office downtown", "the board met this morning", "its headquarters",
    ),
    "MISC": (
        "tickets are sold out", "watching with friends tonight", "starts next week", "who is ready ?",
        "the opening ceremony was amazing", "my favourite part is the music", "performed at the opening ceremony",
    ),
}
NEUTRAL_FRAGMENTS: tuple[str, ...] = (
    "is trending right now", "everyone is talking about it today", "photo of the day", "look at this !",
    "what a week", "a new post is up", "throwback #tbt", "guess who ?", "thoughts ?", "still thinking about it",
    "big news", "what a day", "again ...",
)
SINGLE_BODIES = ("{E} {A}", "{A} : {E}", "{E} - {A}", "{A} , {E}", "{E} {A} , {B}", "{A} : {E} , {B}")
PAIR_BODIES: dict[str, tuple[str, ...]] = {  # the relation decides both types: the MNRE templates' words
    "/per/per/peer": ("{H} celebrate with her teammate {T}", "{H} and {T} played alongside in the final",
                      "her teammate {T} and {H} celebrate"),
    "/per/org/member_of": ("{H} signs with {T} this season", "{H} joined {T} , a new contract",
                           "{T} signs {H} this season"),
    "/per/loc/place_of_residence": ("{H} lives in {T} since last year", "{H} moved to {T} , living there now",
                                    "{H} now lives in {T}"),
    "/org/loc/locate_at": ("{H} is based in {T} , its headquarters", "{H} opens a new office in {T}",
                           "the headquarters of {H} in {T}"),
    "/loc/loc/contain": ("{H} includes the old town of {T}", "the region of {H} contains {T}",
                         "{T} , the old town in the region of {H}"),
    "/per/misc/present_in": ("{H} performed at {T} last night", "{H} spotted at {T} with friends",
                             "{H} at the opening ceremony of {T}"),
}
BARE_SINGLE_BODIES = ("{E}", "{E} !")  # a name alone decides nothing: neutral only
PAIR_NEUTRAL_BODIES = ("{H} and {T} , {A}", "{H} with {T} : {A}", "{A} : {H} x {T}", "{H} , {T} - {A}",
                       "{H} and {T}", "{H} x {T} !")
FRAMES: dict[str, tuple[str, ...]] = {  # the style: the same frames for every label
    "coco_like": ("a photo of {body} .", "in this photo : {body} .", "the photo shows {body} ."),
    "laion_like": ("{body} | Photo", "{body} - News Photo", "{body} | New Post"),
    "sbu_like": ("my photo : {body}", "i saw this today : {body}", "look what my kid saw : {body}"),
}
SUFFIXES: dict[str, tuple[str, ...]] = {  # one fixed-name mention each: the name decides its type
    "PER": ("with {F}", "photo by {F}", "cc {F}"),
    "LOC": ("live from {F}", "in {F}", "#news from {F}"),
    "ORG": ("via {F}", "- {F} reports"),
    "MISC": ("ahead of {F}", "#countdown to {F}"),
}
HANDLE_PROB = 0.2  # "RT @handle :" as in the tweets, in every style and label


# --------------------------------------------------------------------------- captions


@dataclass
class _Caption:
    text: str
    decided: list[str]  # entity types the caption decides (one per decided mention)
    undecided: list[tuple[str, ...]]  # allowed types of each undecided mention
    pair: bool  # a head and a tail in a relation context
    related: bool  # the image links head and tail


def _names_allowing(etype: str) -> list[str]:
    return [name for name, types in sorted(AMBIGUOUS_NAMES.items()) if etype in types]


def _fill(body: str, fragments: tuple[str, ...], rng: random.Random, **names: str) -> str:
    first, second = rng.sample(fragments, 2)
    body = body.replace("{A}", first).replace("{B}", second)
    for slot, name in names.items():
        body = body.replace("{" + slot + "}", name)
    return body


def _frame(rng: random.Random, source: str, body: str, decided: list[str], suffixes: bool) -> str:
    if suffixes:
        n_fixed = rng.choices((0, 1, 2), weights=SUFFIX_PROBS)[0]
        for etype in rng.sample(NER_TYPES, n_fixed):
            body += " " + rng.choice(SUFFIXES[etype]).replace("{F}", rng.choice(FIXED_NAMES[etype]))
            decided.append(etype)
    text = rng.choice(FRAMES[source]).replace("{body}", body)
    if rng.random() < HANDLE_PROB:
        text = f"RT {rng.choice(HANDLES)} : {text}"
    return text


def _single_caption(rng: random.Random, source: str, decide_all: bool) -> _Caption:
    name = rng.choice(sorted(AMBIGUOUS_NAMES))
    body = rng.choice(SINGLE_BODIES)
    if decide_all:
        etype = rng.choice(AMBIGUOUS_NAMES[name])
        decided, undecided = [etype], []
        body = _fill(body, TYPED_FRAGMENTS[etype], rng, E=name)
    else:
        decided, undecided = [], [AMBIGUOUS_NAMES[name]]
        body = _fill(rng.choice(SINGLE_BODIES + BARE_SINGLE_BODIES), NEUTRAL_FRAGMENTS, rng, E=name)
    text = _frame(rng, source, body, decided, suffixes=True)
    return _Caption(text, decided, undecided, pair=False, related=False)


def _pair_caption(rng: random.Random, source: str, decide_all: bool) -> _Caption:
    if decide_all:
        relation = rng.choice(sorted(RELATIONS))
        head_type, tail_type = RELATIONS[relation]
        head = rng.choice(_names_allowing(head_type))
        tail = rng.choice([n for n in _names_allowing(tail_type) if n != head])
        body = rng.choice(PAIR_BODIES[relation]).replace("{H}", head).replace("{T}", tail)
        return _Caption(_frame(rng, source, body, [], suffixes=False), [head_type, tail_type], [],
                        pair=True, related=True)
    head, tail = rng.sample(sorted(AMBIGUOUS_NAMES), 2)
    body = _fill(rng.choice(PAIR_NEUTRAL_BODIES), NEUTRAL_FRAGMENTS, rng, H=head, T=tail)
    return _Caption(_frame(rng, source, body, [], suffixes=False), [], [AMBIGUOUS_NAMES[head], AMBIGUOUS_NAMES[tail]],
                    pair=True, related=rng.random() < COMPLEMENT_LINK_PROB)


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


def _scene(rng: random.Random, caption: _Caption, shown_types: list[str], size: int, avoid: tuple[str, ...] = ()) -> Scene:
    """The caption's objects (``shown_types``, in mention order), maybe one object of a type the caption
    neither decides nor allows, and 0–2 distractors."""
    kinds = [TYPE_GLYPH[t] for t in shown_types]
    if caption.pair:  # head left, tail right, then any fixed names anywhere
        glyphs = _place(rng, kinds[:1], size, [], (0.0, 0.5))
        glyphs += _place(rng, kinds[1:2], size, glyphs, (0.5, 1.0))
        glyphs += _place(rng, kinds[2:], size, glyphs)
        links = [(0, 1)] if caption.related else []
    else:
        glyphs, links = _place(rng, kinds, size, []), []
    free = [t for t in NER_TYPES if t not in shown_types and t not in avoid
            and not any(t in allowed for allowed in caption.undecided)]
    if free and rng.random() < UNNAMED_OBJECT_PROB:
        glyphs += _place(rng, [TYPE_GLYPH[rng.choice(free)]], size, glyphs)
    glyphs += _place(rng, rng.choices(DISTRACTOR_KINDS, k=rng.randint(0, 2)), size, glyphs)
    return Scene(glyphs, links=links, noise_seed=rng.getrandbits(32))


def _shown_types(rng: random.Random, caption: _Caption) -> list[str]:
    """The decided types, and for each undecided mention one of the types it allows."""
    return [rng.choice(allowed) for allowed in caption.undecided] + caption.decided


def _misleads(caption: _Caption, scene: Scene) -> bool:
    """Whether ``scene`` shows none of the objects the caption decides (a weaken image).

    A task's weaken image (from a sample with another focus type or relation) may still show a
    fixed-name object or one of a pair's two objects; the corpus keeps to images that show none.
    With a pair's partial match (one object, or both without the link) as weaken too, the tiny
    estimator had not learnt strengthen from weaken after 30 epochs (valid macro F1 0.66, against
    0.90 with this rule), and transferred no better to the RE pairs (valid 0.59 vs 0.61).
    """
    return not {TYPE_GLYPH[t] for t in caption.decided} & {g.kind for g in scene.glyphs}


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
        candidates = [name for name in donors if _misleads(caption, scenes[name])]
        if candidates:
            image = rng.choice(candidates)
        else:  # only in very small splits: draw an unrelated image instead of taking another pair's
            others = [t for t in NER_TYPES if t not in caption.decided]
            image = f"mde_{split}_{len(scenes):06d}.png"
            scenes[image] = _scene(rng, _Caption("", [], [], pair=False, related=False),
                                   rng.sample(others, rng.randint(1, min(2, len(others)))), cfg.image_size,
                                   avoid=tuple(caption.decided))
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
