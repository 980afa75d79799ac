"""A synthetic multimodal benchmark in which the image decides what the text leaves open.

The paper's premise (§1, Fig. 1) is that text-image pairs in social media are *strengthening*,
*complementary* or *weakening*, and that a model must use the image where it adds information and
ignore it where it misleads. The real Twitter/MNRE images are not shipped, so this module builds a
small world with exactly those properties, written in the real on-disk formats (see
``shared/tmr-data/FORMATS.md`` §1–2) so the readers and every later stage run their real code path.

The world
---------
* Entity types are drawn as coloured glyphs on a 64×64 image: PER = red circle, LOC = green
  triangle, ORG = blue square, MISC = yellow diamond; purple cross and orange bar are of no type
  (distractors, and MDE objects).
* Focus names are **ambiguous surface forms** ("Jordan", "Chelsea", "Green Bay", …): each allows
  2–3 types, and its type in a sentence is drawn uniformly from them. Fixed names ("NASA", "Oslo")
  always have one type. A sentence has one *focus* mention and 0–2 fixed-name mentions.
* Alignment (ground truth, never a model input), per sample:

  - *strengthen*: the text context decides the focus type ("Just landed in Jordan") and the image
    shows it;
  - *complement*: the context is neutral ("Everyone is talking about Jordan today"), so only the
    image tells the type: these focus mentions are the **ambiguous** ones;
  - *weaken*: the image is copied from another sample whose focus type differs (misleading),
    and the text context decides.

* RE (MNRE format): a head and a tail name from the ambiguous pool; the relation is drawn first
  (``None`` or one of six type-determined MNRE relations), then names compatible with its argument
  types. The image shows the head glyph on the left, the tail glyph on the right, and a black link
  between them when they are related. Each image has two instances on consecutive lines: the focus
  pair (h, t) and its reverse (t, h), which is always ``None``.

* MDE corpus (§3.4): caption-image pairs labelled strengthen / complement / weaken in the ratio
  1:1:2. In domain, the ``coco_like`` style (captions that list every object) supplies strengthen
  and the ``laion_like`` style (web titles naming a strict subset) supplies complement, so style is
  a learnable shortcut; weaken re-pairs a caption with another pair's image that shows none of the
  objects it names. The out-of-domain ``sbu_like`` style has both kinds (Table 3).

Two versions of the pictures (``SyntheticConfig.version``). The texts use the same templates and
posteriors in both (version 2 only keeps fixed names to types the focus name rules out, which the
name already tells), so :func:`text_only_ceiling` holds for either:

* **Version 1** (kept byte for byte): the focus glyph is drawn large (42 % of the side) and the
  fixed names' glyphs small, in separate quadrants. The colour covering the most pixels is the
  focus type on every non-weaken image, so a global colour histogram is all a model needs, and
  grounding or back-translation cannot add anything.
* **Version 2** (the default): every glyph is 10–18 px of 64 at a random position, none overlapping
  (:func:`place_glyphs`); the fixed names' glyphs and 1–2 distractors (another type's colour where the
  name leaves one free, or a purple cross / orange bar) share the image with the focus glyph. Fixed
  names and distractors take types the focus name does *not* allow, so exactly one glyph has a type
  the name allows: a phrase query for the name has one right box, and which colour decides depends
  on the name, not on the image's colours overall (:func:`image_evidence` measures it). Weaken donors
  show no glyph of the text's focus type, every split has weaken samples, and RE images have smaller,
  varied glyphs plus, half the time, a no-type distractor clear of the link. ``ground_truth.jsonl``
  gains boxes: ``objects`` (each glyph's kind and box), a ``box`` per NER mention, ``head_box`` /
  ``tail_box`` per RE row (None where the image is another sample's).

The best any text-only model can do on the ambiguous items is the Bayes rate of this generative
process given the text, computed exactly by :func:`text_only_ceiling`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tmr_core.schema import ALIGNMENT_CATEGORIES, NER_TYPES, SPLITS

# --------------------------------------------------------------------------- the world

GLYPHS: dict[str, tuple[str, tuple[int, int, int]]] = {
    # kind -> (shape, RGB); a kind's caption name is "<colour> <shape>"
    "red circle": ("circle", (214, 39, 40)),
    "green triangle": ("triangle", (44, 160, 44)),
    "blue square": ("square", (31, 84, 214)),
    "yellow diamond": ("diamond", (232, 188, 20)),
    "purple cross": ("cross", (148, 60, 189)),
    "orange bar": ("bar", (255, 127, 14)),
}
TYPE_GLYPH = {"PER": "red circle", "LOC": "green triangle", "ORG": "blue square", "MISC": "yellow diamond"}

AMBIGUOUS_NAMES: dict[str, tuple[str, ...]] = {
    "Jordan": ("PER", "LOC"),
    "Paris": ("PER", "LOC"),
    "Austin": ("PER", "LOC"),
    "Madison": ("PER", "LOC"),
    "Georgia": ("PER", "LOC"),
    "Sydney": ("PER", "LOC"),
    "Florence": ("PER", "LOC"),
    "Victoria": ("PER", "LOC"),
    "Jackson": ("PER", "LOC"),
    "Chelsea": ("PER", "LOC", "ORG"),
    "Lincoln": ("PER", "LOC", "ORG"),
    "Phoenix": ("PER", "LOC", "ORG"),
    "Orlando": ("PER", "LOC", "ORG"),
    "Amazon": ("LOC", "ORG"),
    "Liverpool": ("LOC", "ORG"),
    "Columbia": ("LOC", "ORG"),
    "New England": ("LOC", "ORG"),
    "Green Bay": ("LOC", "ORG"),
    "Golden State": ("LOC", "ORG"),
    "Ford": ("PER", "ORG"),
    "Dell": ("PER", "ORG"),
    "Mercedes": ("PER", "ORG"),
    "Santos": ("PER", "ORG"),
    "Mercury": ("PER", "ORG", "MISC"),
    "Olympia": ("PER", "LOC", "MISC"),
    "Genesis": ("ORG", "MISC"),
    "Java": ("LOC", "MISC"),
    "Easter": ("LOC", "MISC"),
    "Nike": ("ORG", "MISC"),
}

FIXED_NAMES: dict[str, tuple[str, ...]] = {
    "PER": ("Maria Lopez", "John Carter", "Aiko Tanaka", "Liam Brooks", "Priya Natarajan", "Omar Haddad", "Emma Schulz", "Kofi Mensah"),
    "LOC": ("Nairobi", "Oslo", "Kyoto", "Lake Tahoe", "Buenos Aires", "Manitoba", "Reykjavik", "Tasmania"),
    "ORG": ("NASA", "UNICEF", "Reuters", "Greenpeace", "FIFA", "Interpol", "Oxfam", "Spotify"),
    "MISC": ("Olympics", "Oscars", "World Cup", "Ramadan", "Brexit", "Eurovision", "Comic Con", "Grammys"),
}

# Templates: ``[`` opens and ``]`` closes a noun phrase in the gold tree; ``{E}``/``{F}``/``{H}``/``{T}``
# are entity slots (always their own NP), ``{U}`` a user handle.
NER_NEUTRAL = (
    "{E} is trending right now",
    "[Everyone] is talking about {E} today",
    "[Photo] of [the day] : {E}",
    "Look at this : {E} !",
    "{E} again ... [what a week]",
    "[A new post] about {E} is up",
    "Throwback to {E} #tbt",
    "Guess who ? {E}",
    "[Thoughts] on {E} ?",
    "Still thinking about {E}",
)
NER_TYPED = {
    "PER": (
        "Happy birthday to {E} !",
        "{E} scored twice in [the final]",
        "{E} signed [autographs] for [her fans]",
        "[An interview] with {E} about [her new album]",
        "{E} was elected [mayor] yesterday",
        "{E} tweeted [a selfie] from [the gym]",
    ),
    "LOC": (
        "[Heavy snow] expected in {E} tonight",
        "Just landed in {E} !",
        "[[The streets] of {E}] at [sunset]",
        "[Flights] to {E} are cheap [this week]",
        "Living in {E} since 2010",
        "[[The weather] in {E}] is perfect",
    ),
    "ORG": (
        "{E} shares fell 5 % today",
        "{E} announced [a new CEO]",
        "{E} is hiring 200 [engineers]",
        "[[A statement] from {E}] on [the merger]",
        "{E} opened [a new office] downtown",
        "[[The board] of {E}] met [this morning]",
    ),
    "MISC": (
        "[Tickets] for {E} are sold out",
        "Watching {E} with [friends] tonight",
        "{E} starts [next week]",
        "Who is ready for {E} ?",
        "[[The opening ceremony] of {E}] was amazing",
        "[My favourite part] of {E} is [the music]",
    ),
}
SUFFIXES = {  # one fixed-name mention each; its type is decided by the name itself
    "PER": ("cc {F}", "[photo] by {F}"),
    "LOC": ("live from {F}", "#news from {F}"),
    "ORG": ("via {F}", "- {F} reports"),
    "MISC": ("ahead of {F}", "#countdown to {F}"),
}

RELATIONS: dict[str, tuple[str, str]] = {  # MNRE label -> (head type, tail type)
    "/per/per/peer": ("PER", "PER"),
    "/per/org/member_of": ("PER", "ORG"),
    "/per/loc/place_of_residence": ("PER", "LOC"),
    "/org/loc/locate_at": ("ORG", "LOC"),
    "/loc/loc/contain": ("LOC", "LOC"),
    "/per/misc/present_in": ("PER", "MISC"),
}
NONE_RELATION = "None"
# ids follow the order of the real ours_rel2id.json, renumbered densely with None first
RELATION_LABELS = (
    NONE_RELATION,
    "/per/per/peer",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
)
RE_NEUTRAL = (
    "{H} and {T} !",
    "{H} , {T} , [what a day]",
    "{H} with {T} #tbt",
    "[Thoughts] on {H} and {T} ?",
    "{H} and {T} are trending",
    "[Big news] : {H} and {T}",
    "{H} x {T} [photo] of [the day]",
)
RE_TYPED = {
    "/per/per/peer": ("{H} and [her teammate] {T} celebrate", "{H} played alongside {T} again"),
    "/per/org/member_of": ("{H} joined {T} [this season]", "{H} signs [a new contract] with {T}"),
    "/per/loc/place_of_residence": ("{H} moved to {T} [last year]", "{H} lives in {T} now"),
    "/org/loc/locate_at": ("{H} opens [its headquarters] in {T}", "{H} is based in {T}"),
    "/loc/loc/contain": ("[The region] of {H} includes {T}", "{H} contains [the old town] of {T}"),
    "/per/misc/present_in": ("{H} performed at {T}", "{H} spotted at {T} [last night]"),
    NONE_RELATION: ("{H} is trending . Meanwhile {T} posted [a photo]", "{H} has nothing to do with {T}"),
}
WORLD_VERSIONS = (1, 2)
NON_TYPE_KINDS = tuple(k for k in GLYPHS if k not in TYPE_GLYPH.values())  # distractors that are no entity type
GLYPH_SIZES_V2 = (10, 18)  # version-2 glyph sides in pixels of a 64-pixel image (scaled with image_size)
HANDLES = ("@daily_news", "@sam_k", "@fan_page", "@citylife", "@tech_talk", "@sport_live")

MDE_SOURCES_IN_DOMAIN = ("coco_like", "laion_like")
MDE_SOURCE_OUT_OF_DOMAIN = "sbu_like"
MDE_SPLITS = ("train", "valid", "test_in_domain", "test_out_of_domain")
COCO_TEMPLATES = ("{objs} on a plain background .", "a picture of {objs} .", "there is {objs} in the image .", "{objs} drawn on white paper .")
LAION_TEMPLATES = ("{Objs} Sticker | Free Shipping", "Best {Objs} Wall Art Print - Buy Now", "{Objs} Icon Vector PNG #design", "HD {Objs} Wallpaper 4K")
SBU_TEMPLATES = ("i saw {objs} at the market today", "my kid drew {objs} !", "found {objs} on my walk", "look , {objs} on our fridge")

# --------------------------------------------------------------------------- config


@dataclass
class SyntheticConfig:
    """Sizes, alignment fractions and the seed of one benchmark.

    ``ner_sizes``/``re_sizes`` are sentences (RE: images, two instances each) per train/valid/test;
    ``mde_sizes`` are rows per train/valid/test_in_domain/test_out_of_domain (rounded down to a
    multiple of 4 so the 1:1:2 ratio is exact).
    """

    seed: int = 0
    version: int = 2  # the world: 1 = large focus glyph alone (kept reproducible), 2 = small glyphs among distractors
    ner_sizes: tuple[int, int, int] = (400, 120, 120)
    re_sizes: tuple[int, int, int] = (400, 120, 120)
    mde_sizes: tuple[int, int, int, int] = (1200, 200, 400, 200)
    alignment_fractions: tuple[float, float, float] = (0.30, 0.45, 0.25)  # strengthen, complement, weaken
    re_none_prob: float = 0.25
    suffix_probs: tuple[float, float, float] = (0.55, 0.35, 0.10)  # P(0, 1, 2 fixed-name mentions)
    image_size: int = 64

    def __post_init__(self) -> None:
        problems = []
        if self.version not in WORLD_VERSIONS:
            problems.append(f"version must be one of {list(WORLD_VERSIONS)}, got {self.version!r}")
        if len(self.ner_sizes) != 3 or len(self.re_sizes) != 3:
            problems.append("ner_sizes and re_sizes need 3 numbers (train, valid, test)")
        if len(self.mde_sizes) != 4:
            problems.append("mde_sizes needs 4 numbers (train, valid, test_in_domain, test_out_of_domain)")
        if any(n < 0 for n in (*self.ner_sizes, *self.re_sizes, *self.mde_sizes)):
            problems.append("sizes must be >= 0")
        if len(self.alignment_fractions) != 3 or abs(sum(self.alignment_fractions) - 1) > 1e-6 or min(self.alignment_fractions) < 0:
            problems.append(f"alignment_fractions must be 3 non-negative numbers summing to 1, got {self.alignment_fractions}")
        if not 0 <= self.re_none_prob < 1:
            problems.append(f"re_none_prob must be in [0, 1), got {self.re_none_prob}")
        if len(self.suffix_probs) != 3 or abs(sum(self.suffix_probs) - 1) > 1e-6:
            problems.append(f"suffix_probs must be 3 numbers summing to 1, got {self.suffix_probs}")
        if self.image_size < 32:
            problems.append(f"image_size must be >= 32, got {self.image_size}")
        if problems:
            raise ValueError("; ".join(problems))


PRESETS: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(),
    "small": SyntheticConfig(ner_sizes=(3000, 700, 700), re_sizes=(3000, 600, 600), mde_sizes=(20000, 2000, 4000, 1000)),
    # the paper's split sizes (Twitter-2017 sentences, MNRE images, §3.4 MDE corpus)
    "paper-like": SyntheticConfig(
        ner_sizes=(3373, 723, 723), re_sizes=(7356, 931, 914), mde_sizes=(400000, 10000, 10000, 1000)
    ),
}


def preset(size: str, **overrides) -> SyntheticConfig:
    """The named preset (``tiny``, ``small``, ``paper-like``) with some fields replaced."""
    if size not in PRESETS:
        raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
    return dataclasses.replace(PRESETS[size], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- samples


@dataclass
class Glyph:
    kind: str  # a key of GLYPHS
    cx: int
    cy: int
    size: int


@dataclass
class Scene:
    """What an image shows; rendered to PNG only when the benchmark is written."""

    glyphs: list[Glyph]
    links: list[tuple[int, int]] = field(default_factory=list)  # glyph index pairs joined by a line
    noise_seed: int = 0


@dataclass
class Mention:
    start: int
    end: int
    type: str
    text: str
    context: str  # "neutral", or the type the context decides ("fixed" for fixed names)
    ambiguous: bool
    text_only_best_guess: str
    text_only_p: float


@dataclass
class NERSample:
    id: str
    split: str
    tokens: list[str]
    tags: list[str]
    mentions: list[Mention]
    alignment: str
    scene: Scene
    tree: str
    image_from: str | None = None
    mention_glyphs: list[int] = field(default_factory=list)  # per mention, its glyph in its own scene (version 2)


@dataclass
class REInstance:
    head: tuple[int, int]
    tail: tuple[int, int]
    relation: str
    ambiguous: bool
    text_only_best_guess: str
    text_only_p: float


@dataclass
class RESentence:
    image_id: str  # "syn_re_000012.png"
    split: str
    tokens: list[str]
    instances: list[REInstance]
    alignment: str
    context: str  # "neutral" or the relation the context decides
    scene: Scene
    tree: str
    image_from: str | None = None


@dataclass
class MDERow:
    id: str
    caption: str
    image_name: str  # file under mde_images/
    label: str
    source: str
    named: tuple[str, ...] = ()  # object kinds the caption names


@dataclass
class Benchmark:
    config: SyntheticConfig
    ner: dict[str, list[NERSample]]
    re: dict[str, list[RESentence]]
    mde: dict[str, list[MDERow]]
    mde_scenes: dict[str, Scene]  # image_name -> scene


# --------------------------------------------------------------------------- text + gold trees

_PUNCT_TAGS = {".": ".", "!": ".", "?": ".", ",": ",", ":": ":", "...": ":", "-": ":", "|": ":", "%": "NN"}
_LEXICON = {
    **{w: "DT" for w in ("the", "a", "an", "this", "these")},
    **{w: "IN" for w in ("of", "in", "at", "on", "about", "from", "for", "with", "since", "to", "via", "by", "ahead", "alongside")},
    **{w: "PRP$" for w in ("her", "its", "my", "our")},
    **{w: "VBZ" for w in ("is", "starts", "signs", "lives", "opens", "contains", "includes")},
    **{w: "VBP" for w in ("are", "celebrate")},
    **{w: "VBD" for w in ("was", "scored", "signed", "tweeted", "announced", "fell", "opened", "met", "joined", "moved", "played", "performed", "spotted", "posted", "landed", "expected", "elected", "based", "sold")},
    **{w: "VBG" for w in ("trending", "talking", "thinking", "hiring", "watching")},
    **{w: "RB" for w in ("right", "now", "today", "tonight", "yesterday", "again", "still", "just", "downtown", "out", "meanwhile")},
    **{w: "JJ" for w in ("cheap", "perfect", "amazing", "heavy", "new", "big", "favourite", "opening", "old", "last", "next", "happy", "ready")},
    "and": "CC", "x": "CC", "who": "WP", "what": "WDT", "look": "VB", "guess": "VB", "thoughts": "NNS",
    "has": "VBZ", "nothing": "NN", "do": "VB", "living": "VBG", "cc": "NN", "reports": "VBZ", "live": "JJ",
}


def _pos_tag(word: str, in_entity: bool) -> str:
    if in_entity:
        return "NNP"
    if word in _PUNCT_TAGS:
        return _PUNCT_TAGS[word]
    if word.isdigit():
        return "CD"
    if word.startswith("@"):
        return "NNP"
    if word.startswith("#"):
        return "NN"
    tag = _LEXICON.get(word.lower())
    if tag:
        return tag
    if word.lower().endswith("s") and len(word) > 3:
        return "NNS"
    return "NN"


def _tree_node(label: str, children: list[str]) -> str:
    return f"({label} {' '.join(children)})"


def expand_template(template: str, slots: dict[str, str]) -> tuple[list[str], dict[str, tuple[int, int]], str]:
    """Fill a template's slots and build its gold Penn tree.

    Args:
        template: words separated by spaces; ``[``/``]`` around words mark noun phrases,
            ``{X}`` marks a slot filled from ``slots`` (entity slots become their own NP).
        slots: slot name -> text (space-separated tokens).

    Returns:
        ``(tokens, spans, tree)``: spans are token offsets ``[start, end)`` per entity slot; the
        tree's leaves are exactly ``tokens``.
    """
    tokens: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    stack: list[list[str]] = [[]]
    for piece in template.split():
        opens = len(piece) - len(piece.lstrip("["))
        core = piece.lstrip("[")
        closes = len(core) - len(core.rstrip("]"))
        core = core.rstrip("]")
        stack.extend([] for _ in range(opens))
        if core.startswith("{") and core.endswith("}"):
            name = core[1:-1]
            words = slots[name].split()
            if name == "U":  # a user handle is a plain token, not an entity
                stack[-1].append(_tree_node("NNP", words))
                tokens.extend(words)
            else:
                spans[name] = (len(tokens), len(tokens) + len(words))
                stack[-1].append(_tree_node("NP", [_tree_node("NNP", [w]) for w in words]))
                tokens.extend(words)
        else:
            stack[-1].append(_tree_node(_pos_tag(core, False), [core]))
            tokens.append(core)
        for _ in range(closes):
            node = _tree_node("NP", stack.pop())
            stack[-1].append(node)
    if len(stack) != 1:
        raise ValueError(f"unbalanced brackets in template {template!r}")
    return tokens, spans, "(ROOT " + _tree_node("S", stack[0]) + ")"


# --------------------------------------------------------------------------- text-only posteriors


def ner_text_posterior(name: str, context: str) -> dict[str, float]:
    """P(type | the text) for a mention under the generator: what a perfect text-only model knows.

    A fixed name has one type; a typed context decides the type; an ambiguous name in a neutral
    context is uniform over the types it allows (the generator draws it uniformly).
    """
    if context in NER_TYPES:
        return {context: 1.0}
    if name in AMBIGUOUS_NAMES:
        allowed = AMBIGUOUS_NAMES[name]
        return {t: 1.0 / len(allowed) for t in allowed}
    for etype, names in FIXED_NAMES.items():
        if name in names:
            return {etype: 1.0}
    raise KeyError(f"{name!r} is not a name of the synthetic world")


@functools.cache
def _names_allowing(etype: str) -> tuple[str, ...]:
    return tuple(n for n, types in AMBIGUOUS_NAMES.items() if etype in types)


def _pair_likelihood(head: str, tail: str, head_type: str, tail_type: str) -> float:
    """P(head name, tail name | types): uniform over compatible names, tail != head."""
    heads, tails = _names_allowing(head_type), _names_allowing(tail_type)
    if head not in heads or tail not in tails or head == tail:
        return 0.0
    return 1.0 / len(heads) / (len(tails) - (1 if head in tails else 0))


def re_text_posterior(head: str, tail: str, context: str, none_prob: float) -> dict[str, float]:
    """P(relation | the text) for the focus pair under the generator (Bayes over relation, types, names)."""
    if context in RE_TYPED:
        return {context: 1.0}
    type_pairs = list(RELATIONS.values())
    scores = {NONE_RELATION: none_prob * sum(_pair_likelihood(head, tail, *tp) for tp in type_pairs) / len(type_pairs)}
    for relation, tp in RELATIONS.items():
        scores[relation] = (1 - none_prob) / len(RELATIONS) * _pair_likelihood(head, tail, *tp)
    total = sum(scores.values())
    if total == 0:
        raise ValueError(f"the pair ({head!r}, {tail!r}) cannot be generated")
    return {r: s / total for r, s in scores.items() if s > 0}


def _best_guess(posterior: dict[str, float], order: tuple[str, ...]) -> tuple[str, float]:
    best = max(posterior.values())
    guess = next(label for label in order if posterior.get(label, 0.0) == best)
    return guess, best


# --------------------------------------------------------------------------- generation


def _alignments(rng: random.Random, n: int, fractions: tuple[float, float, float], weaken_in_every_split: bool = False) -> list[str]:
    """Exact counts per category (largest remainder), in random order.

    With ``weaken_in_every_split`` (version 2) a split of two or more samples gets at least one
    weaken sample when the weaken fraction is positive, even where rounding would give none: the
    weaken case is the one back-translation and the estimator exist for (§1), so every split needs it.
    """
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    if weaken_in_every_split and n >= 2 and fractions[2] > 0 and counts[2] == 0:
        counts[max(range(2), key=lambda i: counts[i])] -= 1
        counts[2] = 1
    labels = [cat for cat, c in zip(ALIGNMENT_CATEGORIES, counts, strict=True) for _ in range(c)]
    rng.shuffle(labels)
    return labels


def _quadrant_centre(rng: random.Random, quadrant: int, size: int, glyph: int) -> tuple[int, int]:
    half = size // 2
    x0, y0 = (quadrant % 2) * half, (quadrant // 2) * half
    margin = glyph // 2 + 1
    return rng.randint(x0 + margin, x0 + half - margin), rng.randint(y0 + margin, y0 + half - margin)


def _ner_scene(rng: random.Random, focus_type: str, other_types: list[str], size: int) -> Scene:
    quadrants = rng.sample(range(4), 1 + len(other_types))
    big = round(size * 0.42)
    small = round(size * 0.19)
    glyphs = [Glyph(TYPE_GLYPH[focus_type], *_quadrant_centre(rng, quadrants[0], size, big), big)]
    for quadrant, etype in zip(quadrants[1:], other_types, strict=True):
        glyphs.append(Glyph(TYPE_GLYPH[etype], *_quadrant_centre(rng, quadrant, size, small), small))
    return Scene(glyphs, noise_seed=rng.getrandbits(32))


def glyph_sizes(image_size: int, sizes: tuple[int, int] = GLYPH_SIZES_V2) -> tuple[int, int]:
    """Version-2 glyph sides (pixels of a 64-pixel image) scaled to ``image_size``."""
    return tuple(max(4, round(s * image_size / 64)) for s in sizes)


def glyph_box(glyph: Glyph, image_size: int) -> list[float]:
    """The glyph's drawn extent ``[x1, y1, x2, y2]`` in pixels, clipped to the image."""
    r = glyph.size / 2
    return [float(min(max(v, 0), image_size)) for v in (glyph.cx - r, glyph.cy - r, glyph.cx + r, glyph.cy + r)]


def _boxes_apart(a: list[float], b: list[float], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _segment_distance(px: float, py: float, a: Glyph, b: Glyph) -> float:
    """Distance from a point to the segment between two glyph centres (a link line)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    t = 0.0 if dx == dy == 0 else max(0.0, min(1.0, ((px - a.cx) * dx + (py - a.cy) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - a.cx - t * dx, py - a.cy - t * dy)


def _free_spot(rng: random.Random, kind: str, side: int, size: int, placed: list[Glyph], x_range: tuple[int, int] | None = None,
               avoid_link: tuple[Glyph, Glyph] | None = None, gap: int = 2, attempts: int = 200) -> Glyph | None:
    """A glyph of ``kind`` and side ``side`` at a random position inside the image that keeps ``gap``
    pixels from every placed glyph (and clear of a link line), or None if none was found."""
    margin = side // 2 + 1
    lo, hi = x_range or (margin, size - margin)
    for _ in range(attempts):
        glyph = Glyph(kind, rng.randint(lo, hi), rng.randint(margin, size - margin), side)
        box = glyph_box(glyph, size)
        if not all(_boxes_apart(box, glyph_box(other, size), gap) for other in placed):
            continue
        if avoid_link and _segment_distance(glyph.cx, glyph.cy, *avoid_link) <= side * 0.75 + size // 24:
            continue
        return glyph
    return None


def place_glyphs(rng: random.Random, kinds: list[str], size: int, sizes: tuple[int, int] = GLYPH_SIZES_V2) -> Scene:
    """Draw ``kinds`` (keys of :data:`GLYPHS`, in this order) at random non-overlapping positions.

    The version-2 layout: each glyph's side is uniform in ``sizes`` (pixels, inclusive), its whole
    extent lies inside the ``size`` x ``size`` image, and boxes keep 2 pixels apart, so every glyph
    is visible whole and its :func:`glyph_box` is exactly where its colour is. ``scene.glyphs[i]``
    is ``kinds[i]``.

    Raises:
        ValueError: a kind is not a glyph, or the glyphs do not fit (too many or too large).
    """
    unknown = [k for k in kinds if k not in GLYPHS]
    if unknown:
        raise ValueError(f"kinds: {unknown} are not glyphs (one of {sorted(GLYPHS)})")
    if not 1 <= sizes[0] <= sizes[1] <= size - 2:
        raise ValueError(f"sizes must be (low, high) with 1 <= low <= high <= {size - 2}, got {sizes}")
    for _layout in range(50):  # a dense draw can paint itself into a corner: start the layout over
        glyphs: list[Glyph] = []
        for kind in kinds:
            glyph = _free_spot(rng, kind, rng.randint(*sizes), size, glyphs)
            if glyph is None:
                break
            glyphs.append(glyph)
        else:
            return Scene(glyphs, noise_seed=rng.getrandbits(32))
    raise ValueError(f"cannot place {len(kinds)} glyphs of sides {sizes} apart in a {size}x{size} image")


def _ner_scene_v2(rng: random.Random, focus_type: str, allowed: tuple[str, ...], fixed_types: list[str], size: int) -> Scene:
    """Focus glyph, one glyph per fixed name (in that order), then 1-2 distractors; no kind twice.

    Fixed names' types lie outside the focus name's ``allowed`` types (the caller draws them so), and
    so do the distractors (non-type kinds, or types the name rules out), so exactly one glyph has a
    type the focus name allows: a phrase query for the name has one right box, and a colour
    histogram of the whole image no longer says which colour is the focus's.
    """
    free_types = [TYPE_GLYPH[t] for t in NER_TYPES if t not in allowed and t not in fixed_types]
    # the first distractor has an entity type's colour where the name leaves one free, so that colour
    # is not a tell by itself; a second one, if any, is drawn from all that is left
    first = rng.choice(free_types or list(NON_TYPE_KINDS))
    rest = [k for k in free_types + list(NON_TYPE_KINDS) if k != first]
    distractors = [first] + rng.sample(rest, rng.randint(0, 1))
    kinds = [TYPE_GLYPH[focus_type]] + [TYPE_GLYPH[t] for t in fixed_types] + distractors
    return place_glyphs(rng, kinds, size, glyph_sizes(size))


def _make_ner_sample(rng: random.Random, sample_id: str, split: str, alignment: str, cfg: SyntheticConfig) -> NERSample:
    name = rng.choice(sorted(AMBIGUOUS_NAMES))
    focus_type = rng.choice(AMBIGUOUS_NAMES[name])
    context = "neutral" if alignment == "complement" else focus_type
    template = rng.choice(NER_NEUTRAL if context == "neutral" else NER_TYPED[focus_type])
    n_fixed = rng.choices((0, 1, 2), weights=cfg.suffix_probs)[0]
    if cfg.version == 1:
        fixed_types = rng.sample(NER_TYPES, n_fixed)
    else:  # a fixed name's glyph must not be a second candidate box for the focus name
        outside = [t for t in NER_TYPES if t not in AMBIGUOUS_NAMES[name]]
        fixed_types = rng.sample(outside, min(n_fixed, len(outside)))
    slots = {"E": name}
    for i, etype in enumerate(fixed_types):
        slot = f"F{i}"
        template += " " + rng.choice(SUFFIXES[etype]).replace("{F}", "{" + slot + "}")
        slots[slot] = rng.choice(FIXED_NAMES[etype])
    if rng.random() < 0.3:
        template = "RT {U} : " + template
        slots["U"] = rng.choice(HANDLES)
    tokens, spans, tree = expand_template(template, slots)
    tags = ["O"] * len(tokens)
    mentions = []
    for slot, (start, end) in sorted(spans.items(), key=lambda kv: kv[1]):
        is_focus = slot == "E"
        etype = focus_type if is_focus else fixed_types[int(slot[1:])]
        mention_context = context if is_focus else "fixed"
        guess, p = _best_guess(ner_text_posterior(slots[slot], mention_context), NER_TYPES)
        tags[start] = f"B-{etype}"
        for k in range(start + 1, end):
            tags[k] = f"I-{etype}"
        mentions.append(Mention(start, end, etype, slots[slot], mention_context, is_focus and context == "neutral", guess, p))
    if cfg.version == 1:
        return NERSample(sample_id, split, tokens, tags, mentions, alignment, _ner_scene(rng, focus_type, fixed_types, cfg.image_size), tree)
    scene = _ner_scene_v2(rng, focus_type, AMBIGUOUS_NAMES[name], fixed_types, cfg.image_size)
    # glyph order is focus, then fixed names in slot order; mentions are in text order
    glyph_of = {"E": 0, **{f"F{i}": 1 + i for i in range(len(fixed_types))}}
    mention_glyphs = [glyph_of[slot] for slot, _span in sorted(spans.items(), key=lambda kv: kv[1])]
    return NERSample(sample_id, split, tokens, tags, mentions, alignment, scene, tree, mention_glyphs=mention_glyphs)


def _focus_type(sample: NERSample) -> str:
    return next(m.type for m in sample.mentions if m.context != "fixed")


def _swap_in_donor_images(rng: random.Random, samples: list, key, id_of, prefer=None) -> None:
    """Weaken: give each weaken sample the image of a non-weaken sample whose ``key`` differs.

    ``prefer(sample, donor)``, when given, narrows the donors to those it accepts where any exist.
    """
    donors = [s for s in samples if s.alignment != "weaken"] or list(samples)
    for sample in samples:
        if sample.alignment != "weaken":
            continue
        candidates = [d for d in donors if key(d) != key(sample)]
        if not candidates:
            raise ValueError("cannot build weaken samples: every candidate donor image agrees with the text")
        if prefer is not None:
            candidates = [d for d in candidates if prefer(sample, d)] or candidates
        donor = rng.choice(candidates)
        sample.scene = donor.scene
        sample.image_from = id_of(donor)


def generate_ner_split(cfg: SyntheticConfig, split: str, n: int, first_index: int) -> list[NERSample]:
    rng = random.Random(f"{cfg.seed}-ner-{split}")
    alignments = _alignments(rng, n, cfg.alignment_fractions, weaken_in_every_split=cfg.version >= 2)
    samples = [
        _make_ner_sample(rng, f"syn_ner_{first_index + i:06d}", split, alignment, cfg)
        for i, alignment in enumerate(alignments)
    ]
    _swap_in_donor_images(rng, samples, key=_focus_type, id_of=lambda s: s.id,
                          prefer=_shows_no_glyph_of_its_type if cfg.version >= 2 else None)
    return samples


def _shows_no_glyph_of_its_type(sample: NERSample, donor: NERSample) -> bool:
    """Version 2 weaken: the donor image shows nothing of the text's focus type, only other objects."""
    return all(g.kind != TYPE_GLYPH[_focus_type(sample)] for g in donor.scene.glyphs)


def _re_scene(rng: random.Random, head_type: str, tail_type: str, related: bool, size: int) -> Scene:
    glyph = round(size * 0.3)
    margin = glyph // 2 + 1
    half = size // 2
    gap = max(2, size // 16)  # keep part of the link visible between the two glyphs
    head = Glyph(TYPE_GLYPH[head_type], rng.randint(margin, half - margin - gap), rng.randint(margin, size - margin), glyph)
    tail = Glyph(TYPE_GLYPH[tail_type], rng.randint(half + margin + gap, size - margin), rng.randint(margin, size - margin), glyph)
    return Scene([head, tail], links=[(0, 1)] if related else [], noise_seed=rng.getrandbits(32))


def _re_scene_v2(rng: random.Random, head_type: str, tail_type: str, related: bool, size: int) -> Scene:
    """Head glyph left, tail glyph right (sides varied, smaller than version 1), a link when related,
    and with probability 1/2 a distractor of a non-type kind, kept clear of the glyphs and the link."""
    sizes = glyph_sizes(size)
    half, gap = size // 2, max(2, size // 16)  # keep part of the link visible between the two glyphs
    head_side, tail_side = rng.randint(*sizes), rng.randint(*sizes)
    head = _free_spot(rng, TYPE_GLYPH[head_type], head_side, size, [], x_range=(head_side // 2 + 1, half - head_side // 2 - 1 - gap))
    tail = _free_spot(rng, TYPE_GLYPH[tail_type], tail_side, size, [], x_range=(half + tail_side // 2 + 1 + gap, size - tail_side // 2 - 1))
    glyphs = [head, tail]
    if rng.random() < 0.5:
        distractor = _free_spot(rng, rng.choice(NON_TYPE_KINDS), rng.randint(*sizes), size, glyphs, avoid_link=(head, tail), attempts=50)
        if distractor is not None:  # no room clear of the link: the image goes without one
            glyphs.append(distractor)
    return Scene(glyphs, links=[(0, 1)] if related else [], noise_seed=rng.getrandbits(32))


def _make_re_sentence(rng: random.Random, image_id: str, split: str, alignment: str, cfg: SyntheticConfig) -> RESentence:
    relations = sorted(RELATIONS)
    relation = NONE_RELATION if rng.random() < cfg.re_none_prob else rng.choice(relations)
    head_type, tail_type = RELATIONS[relation] if relation != NONE_RELATION else RELATIONS[rng.choice(relations)]
    head = rng.choice(_names_allowing(head_type))
    tail = rng.choice([n for n in _names_allowing(tail_type) if n != head])
    context = "neutral" if alignment == "complement" else relation
    template = rng.choice(RE_NEUTRAL if context == "neutral" else RE_TYPED[relation])
    slots = {"H": head, "T": tail}
    if rng.random() < 0.3:
        template = "RT {U} : " + template
        slots["U"] = rng.choice(HANDLES)
    tokens, spans, tree = expand_template(template, slots)
    guess, p = _best_guess(re_text_posterior(head, tail, context, cfg.re_none_prob), RELATION_LABELS)
    instances = [
        REInstance(spans["H"], spans["T"], relation, context == "neutral", guess, p),
        # the reverse pair never holds a relation in this world, and its order says so
        REInstance(spans["T"], spans["H"], NONE_RELATION, False, NONE_RELATION, 1.0),
    ]
    scene = (_re_scene if cfg.version == 1 else _re_scene_v2)(rng, head_type, tail_type, relation != NONE_RELATION, cfg.image_size)
    return RESentence(image_id, split, tokens, instances, alignment, context, scene, tree)


def generate_re_split(cfg: SyntheticConfig, split: str, n: int, first_index: int) -> list[RESentence]:
    rng = random.Random(f"{cfg.seed}-re-{split}")
    alignments = _alignments(rng, n, cfg.alignment_fractions, weaken_in_every_split=cfg.version >= 2)
    sentences = [
        _make_re_sentence(rng, f"syn_re_{first_index + i:06d}.png", split, alignment, cfg)
        for i, alignment in enumerate(alignments)
    ]
    _swap_in_donor_images(rng, sentences, key=lambda s: s.instances[0].relation, id_of=lambda s: s.image_id)
    return sentences


def _object_list(kinds: list[str], title: bool) -> str:
    words = [k.title() if title else f"a {k}" for k in kinds]
    if len(words) == 1:
        return words[0]
    return " , ".join(words[:-1]) + " and " + words[-1]


def _caption(rng: random.Random, source: str, kinds: list[str]) -> str:
    if source == "coco_like":
        return rng.choice(COCO_TEMPLATES).format(objs=_object_list(kinds, title=False))
    if source == "laion_like":
        return rng.choice(LAION_TEMPLATES).format(Objs=_object_list(kinds, title=True))
    return rng.choice(SBU_TEMPLATES).format(objs=_object_list(kinds, title=False))


def _mde_scene(rng: random.Random, kinds: list[str], size: int) -> Scene:
    cell = size // 3
    glyph = round(cell * 0.75)
    glyphs = []
    for kind, index in zip(kinds, rng.sample(range(9), len(kinds)), strict=True):
        x0, y0 = (index % 3) * cell, (index // 3) * cell
        glyphs.append(Glyph(kind, x0 + cell // 2 + rng.randint(-1, 1), y0 + cell // 2 + rng.randint(-1, 1), glyph))
    return Scene(glyphs, noise_seed=rng.getrandbits(32))


def generate_mde_split(cfg: SyntheticConfig, split: str, n_rows: int) -> tuple[list[MDERow], dict[str, Scene]]:
    """Rows in the ratio 1:1:2 (strengthen:complement:weaken) for one MDE split (paper §3.4)."""
    rng = random.Random(f"{cfg.seed}-mde-{split}")
    n_pairs = n_rows // 4
    all_kinds = sorted(GLYPHS)
    in_domain = split != "test_out_of_domain"
    pairs: list[tuple[str, list[str], str, str]] = []  # (label, mentioned kinds, source, image name)
    scenes: dict[str, Scene] = {}
    for label in ("strengthen", "complement"):
        for _ in range(n_pairs):
            shown = rng.sample(all_kinds, rng.randint(1, 3) if label == "strengthen" else rng.randint(2, 3))
            mentioned = shown if label == "strengthen" else rng.sample(shown, rng.randint(1, len(shown) - 1))
            if in_domain:
                source = "coco_like" if label == "strengthen" else "laion_like"
            else:
                source = MDE_SOURCE_OUT_OF_DOMAIN
            image_name = f"mde_{split}_{len(pairs):06d}.png"
            scenes[image_name] = _mde_scene(rng, shown, cfg.image_size)
            pairs.append((label, mentioned, source, image_name))
    rows = [(label, _caption(rng, source, mentioned), image, source, mentioned)
            for label, mentioned, source, image in pairs]
    for _label, mentioned, source, _image in pairs:
        # weaken: this caption with another pair's image that shows none of the objects it names
        for _attempt in range(200):
            donor_image = rng.choice(pairs)[3]
            if not set(mentioned) & {g.kind for g in scenes[donor_image].glyphs}:
                break
        else:  # only in very small splits: draw an unrelated image instead of swapping one in
            unrelated = [k for k in all_kinds if k not in mentioned]
            donor_image = f"mde_{split}_{len(scenes):06d}.png"
            scenes[donor_image] = _mde_scene(rng, rng.sample(unrelated, rng.randint(1, 2)), cfg.image_size)
        rows.append(("weaken", _caption(rng, source, mentioned), donor_image, source, mentioned))
    rng.shuffle(rows)
    return [MDERow(f"mde_{split}_{i:06d}", caption, image, label, source, tuple(named))
            for i, (label, caption, image, source, named) in enumerate(rows)], scenes


def generate_benchmark(cfg: SyntheticConfig) -> Benchmark:
    """The whole benchmark in memory (images as scenes); deterministic for ``cfg``."""
    ner, re_, mde, mde_scenes = {}, {}, {}, {}
    first_ner = first_re = 0
    for split, n_ner, n_re in zip(SPLITS, cfg.ner_sizes, cfg.re_sizes, strict=True):
        ner[split] = generate_ner_split(cfg, split, n_ner, first_ner)
        re_[split] = generate_re_split(cfg, split, n_re, first_re)
        first_ner, first_re = first_ner + n_ner, first_re + n_re
    for split, n_rows in zip(MDE_SPLITS, cfg.mde_sizes, strict=True):
        mde[split], scenes = _mde_split_generator(cfg.version)(cfg, split, n_rows)
        mde_scenes.update(scenes)
    return Benchmark(cfg, ner, re_, mde, mde_scenes)


def _mde_split_generator(version: int):
    """Version 1 captions name glyphs; version 2's speak the tasks' own words (tmr_core.synthetic_captions)."""
    if version == 1:
        return generate_mde_split
    from tmr_core.synthetic_captions import generate_caption_split

    return generate_caption_split


def synthetic_corpus(seed: int = 0, size: str = "tiny") -> list[str]:
    """Every sentence and caption of a benchmark in each world version, one string each (for training
    tokenizers): a tokenizer built from it knows the words of whichever version a run generates."""
    texts = []
    for version in WORLD_VERSIONS:
        bench = generate_benchmark(preset(size, seed=seed, version=version))
        texts += [" ".join(s.tokens) for split in SPLITS for s in bench.ner[split]]
        texts += [" ".join(s.tokens) for split in SPLITS for s in bench.re[split]]
        texts += [row.caption for split in MDE_SPLITS for row in bench.mde[split]]
    return texts


# --------------------------------------------------------------------------- images


def render_scene(scene: Scene, size: int) -> bytes:
    """A scene as PNG bytes: same scene, same bytes (no metadata, fixed compression)."""
    from PIL import Image, ImageDraw

    rng = random.Random(scene.noise_seed)
    base = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(size // 2):  # light clutter so the glyphs are not the only non-flat pixels
        x, y = rng.randrange(size), rng.randrange(size)
        shade = rng.randint(150, 210)
        draw.point((x, y), fill=(shade, shade, shade))
    for i, j in scene.links:
        a, b = scene.glyphs[i], scene.glyphs[j]
        draw.line((a.cx, a.cy, b.cx, b.cy), fill=(0, 0, 0), width=max(2, size // 24))
    for g in scene.glyphs:
        shape, colour = GLYPHS[g.kind]
        r = g.size / 2
        x0, y0, x1, y1 = g.cx - r, g.cy - r, g.cx + r, g.cy + r
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "triangle":
            draw.polygon([(g.cx, y0), (x0, y1), (x1, y1)], fill=colour)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "diamond":
            draw.polygon([(g.cx, y0), (x1, g.cy), (g.cx, y1), (x0, g.cy)], fill=colour)
        elif shape == "cross":
            draw.rectangle((x0, g.cy - r / 3, x1, g.cy + r / 3), fill=colour)
            draw.rectangle((g.cx - r / 3, y0, g.cx + r / 3, y1), fill=colour)
        else:  # bar
            draw.rectangle((x0, g.cy - r / 3, x1, g.cy + r / 3), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --------------------------------------------------------------------------- writing

RE_FILE_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # MNRE file names use "val"


def ner_text(samples: list[NERSample]) -> str:
    """Twitter-2017 format: ``IMGID:<id>``, ``token\\ttag`` lines, a blank line; ends with ``\\n\\n``."""
    blocks = []
    for s in samples:
        blocks.append(f"IMGID:{s.id}\n" + "".join(f"{tok}\t{tag}\n" for tok, tag in zip(s.tokens, s.tags, strict=True)))
    return "\n".join(blocks) + ("\n" if blocks else "")


def re_instance_dict(sentence: RESentence, instance: REInstance) -> dict:
    """One MNRE line's dict, keys in the file's order (token, h, t, img_id, relation)."""
    (hs, he), (ts, te) = instance.head, instance.tail
    return {
        "token": list(sentence.tokens),
        "h": {"name": " ".join(sentence.tokens[hs:he]), "pos": [hs, he]},
        "t": {"name": " ".join(sentence.tokens[ts:te]), "pos": [ts, te]},
        "img_id": sentence.image_id,
        "relation": instance.relation,
    }


def re_text(sentences: list[RESentence]) -> str:
    """MNRE format: ``repr(dict)`` per line, an image's instances on consecutive lines."""
    return "".join(repr(re_instance_dict(s, inst)) + "\n" for s in sentences for inst in s.instances)


def rel2id_text() -> str:
    return json.dumps({label: i for i, label in enumerate(RELATION_LABELS)}, separators=(",", ":"))


def re_sample_id(image_id: str, k: int) -> str:
    """The contract id of the k-th instance (0-based, file order) of an MNRE image."""
    return f"{Path(image_id).stem}-{k}"


def ground_truth_rows(bench: Benchmark) -> list[dict]:
    """One row per sample (NER sentence, RE instance): alignment, ambiguity, text-only best guess.

    Version 2 adds boxes (pixels of the image, ``[x1, y1, x2, y2]``, :func:`glyph_box`): every row's
    ``objects`` lists each glyph of the image file the sample uses (the donor's for weaken); an NER
    mention's ``box`` and an RE row's ``head_box``/``tail_box`` are its own object's box, or None when
    the image does not show it (a weaken sample's image comes from another sample).
    """
    size, boxes = bench.config.image_size, bench.config.version >= 2

    def objects(scene: Scene) -> list[dict]:
        return [{"kind": g.kind, "box": glyph_box(g, size)} for g in scene.glyphs]

    def own_box(sample, glyph_index: int) -> list[float] | None:
        return None if sample.image_from is not None else glyph_box(sample.scene.glyphs[glyph_index], size)

    rows = []
    for split in SPLITS:
        for s in bench.ner[split]:
            mentions = [dataclasses.asdict(m) for m in s.mentions]
            row = {"id": s.id, "task": "ner", "split": split, "alignment": s.alignment, "image_from": s.image_from, "mentions": mentions}
            if boxes:
                for mention, glyph_index in zip(mentions, s.mention_glyphs, strict=True):
                    mention["box"] = own_box(s, glyph_index)
                row["objects"] = objects(s.scene)
            rows.append(row)
    for split in SPLITS:
        for s in bench.re[split]:
            for k, inst in enumerate(s.instances):
                row = {
                    "id": re_sample_id(s.image_id, k), "task": "re", "split": split, "alignment": s.alignment,
                    "image_from": s.image_from, "relation": inst.relation, "ambiguous": inst.ambiguous,
                    "context": s.context if k == 0 else "order",
                    "head": " ".join(s.tokens[inst.head[0]:inst.head[1]]), "tail": " ".join(s.tokens[inst.tail[0]:inst.tail[1]]),
                    "text_only_best_guess": inst.text_only_best_guess, "text_only_p": inst.text_only_p,
                }
                if boxes:  # glyph 0 is the focus pair's head, glyph 1 its tail; instance 1 is the reverse pair
                    row["head_box"], row["tail_box"] = own_box(s, k), own_box(s, 1 - k)
                    row["objects"] = objects(s.scene)
                rows.append(row)
    return rows


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_benchmark(bench: Benchmark, out_dir: str | Path) -> dict:
    """Write every file of the benchmark under ``out_dir``; returns :func:`benchmark_stats`.

    Layout: ``ner/{train,valid,test}.txt``, ``re/ours_{train,val,test}.txt``, ``re/ours_rel2id.json``,
    ``images/*.png``, ``trees/{ner,re}/{split}.txt``, ``ground_truth.jsonl``,
    ``mde/{train,valid,test_in_domain,test_out_of_domain}.parquet``, ``mde_images/*.png``, ``stats.json``
    (version 2 adds its ``world`` entry, :func:`image_evidence`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir).resolve()
    size = bench.config.image_size
    rendered: dict[int, bytes] = {}  # donor scenes are shared objects: render each once

    def png(scene: Scene) -> bytes:
        if id(scene) not in rendered:
            rendered[id(scene)] = render_scene(scene, size)
        return rendered[id(scene)]

    for split in SPLITS:
        _write(out / "ner" / f"{split}.txt", ner_text(bench.ner[split]))
        _write(out / "re" / f"ours_{RE_FILE_SPLITS[split]}.txt", re_text(bench.re[split]))
        _write(out / "trees" / "ner" / f"{split}.txt", "".join(f"{s.id}\t{s.tree}\n" for s in bench.ner[split]))
        _write(out / "trees" / "re" / f"{split}.txt", "".join(f"{s.image_id}\t{s.tree}\n" for s in bench.re[split]))
        for s in bench.ner[split]:
            _write(out / "images" / f"{s.id}.png", png(s.scene))
        for s in bench.re[split]:
            _write(out / "images" / s.image_id, png(s.scene))
    _write(out / "re" / "ours_rel2id.json", rel2id_text())
    rows = ground_truth_rows(bench)
    _write(out / "ground_truth.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    for name, scene in sorted(bench.mde_scenes.items()):
        _write(out / "mde_images" / name, render_scene(scene, size))
    (out / "mde").mkdir(parents=True, exist_ok=True)
    for split in MDE_SPLITS:
        table = pa.table({
            "id": [r.id for r in bench.mde[split]],
            "caption": [r.caption for r in bench.mde[split]],
            "image_uri": [str(out / "mde_images" / r.image_name) for r in bench.mde[split]],
            "label": [r.label for r in bench.mde[split]],
            "source": [r.source for r in bench.mde[split]],
            "objects_named": [sorted(r.named) for r in bench.mde[split]],
            "objects_shown": [sorted(g.kind for g in bench.mde_scenes[r.image_name].glyphs) for r in bench.mde[split]],
        }, schema=mde_schema())
        pq.write_table(table, out / "mde" / f"{split}.parquet", compression="zstd")
    stats = benchmark_stats(rows, bench.mde, bench.config)
    if bench.config.version >= 2:  # version 1's stats.json stays as it was, byte for byte
        stats["world"] = image_evidence(bench)
    _write(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def mde_schema():
    """The MDE corpus table: one caption-image pair per row (paper §3.4).

    ``objects_named`` / ``objects_shown`` (the kinds the caption names and the image shows) are
    optional in a corpus: with them, ``ce_negative_sampling`` labels an image swap *weaken* only
    when the new image shows none of the named objects; real caption corpora have no such lists.
    """
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("objects_named", pa.list_(pa.string())),
        pa.field("objects_shown", pa.list_(pa.string())),
    ])



def make_synthetic_benchmark(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> dict:
    """Generate and write a benchmark; returns its measured statistics."""
    return write_benchmark(generate_benchmark(cfg or SyntheticConfig()), out_dir)


# --------------------------------------------------------------------------- measurements


def read_ground_truth(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _ambiguous_items(rows: list[dict], task: str, split: str) -> list[tuple[dict, str]]:
    """(item, gold label) for every ambiguous mention (NER) or relation instance (RE) of a split."""
    items = []
    for row in rows:
        if row["task"] != task or row["split"] != split:
            continue
        if task == "ner":
            items += [(m, m["type"]) for m in row["mentions"] if m["ambiguous"]]
        elif row["ambiguous"]:
            items.append((row, row["relation"]))
    return items


def text_only_ceiling(rows: list[dict], task: str = "ner", split: str = "test", re_none_prob: float | None = None) -> float:
    """The best accuracy any text-only model can expect on the ambiguous items of a split.

    For each ambiguous item, a text-only model sees the names and a neutral context; the best it
    can do is predict the most probable label under the generator, which is right with probability
    ``max_y P(y | text)`` (:func:`ner_text_posterior`, :func:`re_text_posterior`). The ceiling is the
    mean of that probability over the items. It is recomputed here from the world's tables, not read
    from the rows' stored ``text_only_p``.

    Args:
        rows: :func:`ground_truth_rows` (or ``ground_truth.jsonl`` read back).
        task: ``"ner"`` (ambiguous mentions) or ``"re"`` (ambiguous relation instances).
        split: ``train``, ``valid`` or ``test``.
        re_none_prob: the generator's P(None) for RE (default: the tiny preset's).
    """
    if task not in ("ner", "re"):
        raise ValueError(f"task must be 'ner' or 're', got {task!r}")
    none_prob = PRESETS["tiny"].re_none_prob if re_none_prob is None else re_none_prob
    items = _ambiguous_items(rows, task, split)
    if not items:
        raise ValueError(f"no ambiguous {task} items in split {split!r}")
    probs = []
    for item, _gold in items:
        if task == "ner":
            posterior = ner_text_posterior(item["text"], item["context"])
        else:
            posterior = re_text_posterior(item["head"], item["tail"], item["context"], none_prob)
        probs.append(max(posterior.values()))
    return sum(probs) / len(probs)


def text_only_accuracy(rows: list[dict], task: str = "ner", split: str = "test") -> float:
    """Realised accuracy of the Bayes text-only guess (``text_only_best_guess``) on the ambiguous items."""
    items = _ambiguous_items(rows, task, split)
    return sum(item["text_only_best_guess"] == gold for item, gold in items) / len(items)


def text_only_f1(rows: list[dict], task: str = "ner", split: str = "test") -> float:
    """The Bayes text-only guess scored in the extractor's ambiguous-subset metric.

    This is the ceiling to compare an extractor's ambiguous F1 with. NER: entity F1 over the
    ambiguous mentions with exact spans, which for a guess at every mention's span equals its
    accuracy. RE: micro F1 over labels other than ``None`` (the MNRE metric), which unlike the
    accuracy does not count a correct ``None``.
    """
    from tmr_core.metrics import re_scores

    items = _ambiguous_items(rows, task, split)
    if task == "ner":
        return text_only_accuracy(rows, task, split)
    return re_scores([gold for _, gold in items], [item["text_only_best_guess"] for item, _ in items])["f1"]


def majority_label_accuracy(rows: list[dict], task: str = "ner", split: str = "test") -> float:
    """Accuracy of always predicting the split's most common label on its ambiguous items."""
    golds = [gold for _item, gold in _ambiguous_items(rows, task, split)]
    return Counter(golds).most_common(1)[0][1] / len(golds)


def benchmark_stats(rows: list[dict], mde: dict[str, list[MDERow]] | None = None, cfg: SyntheticConfig | None = None) -> dict:
    """Measured shares: ambiguity, alignment fractions, text-only ceiling, MDE label mix."""
    cfg = cfg or SyntheticConfig()
    stats: dict = {}
    for task in ("ner", "re"):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        if task == "ner":
            mentions = [m for r in task_rows for m in r["mentions"]]
            ambiguous = sum(m["ambiguous"] for m in mentions) / max(len(mentions), 1)
        else:
            ambiguous = sum(r["ambiguous"] for r in task_rows) / len(task_rows)
        units = [r for r in task_rows if task == "ner" or r["id"].endswith("-0")]  # one per image
        alignment = {c: sum(r["alignment"] == c for r in units) / len(units) for c in ALIGNMENT_CATEGORIES}
        entry = {
            "samples": {split: sum(r["split"] == split for r in task_rows) for split in SPLITS},
            "ambiguous_share": ambiguous,
            "alignment_fractions": alignment,
        }
        if _ambiguous_items(rows, task, "test"):
            entry["text_only_ceiling_test"] = text_only_ceiling(rows, task, "test", cfg.re_none_prob)
            entry["text_only_accuracy_test"] = text_only_accuracy(rows, task, "test")
            entry["text_only_f1_test"] = text_only_f1(rows, task, "test")
            entry["majority_label_accuracy_test"] = majority_label_accuracy(rows, task, "test")
        stats[task] = entry
    if mde:
        stats["mde"] = {
            split: {
                "rows": len(split_rows),
                "labels": dict(sorted(Counter(r.label for r in split_rows).items())),
                "sources": dict(sorted(Counter(f"{r.source}/{r.label}" for r in split_rows).items())),
            }
            for split, split_rows in mde.items()
        }
    return stats


def _type_colour_counts(png: bytes, tolerance: int = 24) -> dict[str, int]:
    """Pixels within ``tolerance`` (per channel) of each entity type's glyph colour: a global colour histogram."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return {etype: int((np.abs(pixels - np.array(GLYPHS[kind][1])).max(-1) <= tolerance).sum()) for etype, kind in TYPE_GLYPH.items()}


def image_evidence(bench: Benchmark, split: str = "test") -> dict:
    """How much of the type a global colour histogram gives away, and how often the image misleads.

    * ``histogram_rule_accuracy``: on the NER items of ``split`` whose image shows the focus object
      (not weaken), how often "the entity type whose glyph colour covers the most pixels" is the focus
      type. Version 1 draws the focus glyph largest, so the rule is always right and nothing but
      the colours matters; version 2 should leave it well below 1.
    * ``median_focus_area_share``: on the same items, the focus glyph's painted pixels over the image's.
    * ``weaken_share``: per task and split, the share of samples (RE: images) that are weaken.
    """
    size = bench.config.image_size
    hits, areas = [], []
    for sample in bench.ner[split]:
        if sample.image_from is not None:
            continue
        png = render_scene(sample.scene, size)
        counts = _type_colour_counts(png)
        focus_type = _focus_type(sample)
        hits.append(max(counts, key=counts.get) == focus_type)
        # the focus glyph comes first in both versions' scenes, and no glyph shares its box
        focus = sample.scene.glyphs[0]
        areas.append(_painted_pixels(png, focus, size) / size**2)
    weaken = {
        task: {sp: sum(s.alignment == "weaken" for s in samples[sp]) / max(len(samples[sp]), 1) for sp in SPLITS}
        for task, samples in (("ner", bench.ner), ("re", bench.re))
    }
    return {
        "version": bench.config.version,
        "split": split,
        "items": len(hits),
        "histogram_rule_accuracy": sum(hits) / max(len(hits), 1),
        "median_focus_area_share": sorted(areas)[len(areas) // 2] if areas else 0.0,
        "weaken_share": weaken,
    }


def _painted_pixels(png: bytes, glyph: Glyph, size: int) -> int:
    """Pixels of the glyph's colour inside its box (the renderer paints the box's end coordinates too)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    x1, y1, x2, y2 = (math.floor(v) for v in glyph_box(glyph, size))
    region = pixels[y1:y2 + 1, x1:x2 + 1]
    return int((region == np.array(GLYPHS[glyph.kind][1])).all(-1).sum())


def list_files(out_dir: str | Path) -> list[str]:
    """Every file under a benchmark dir, relative and sorted (for determinism checks)."""
    root = Path(out_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


__all__ = [
    "AMBIGUOUS_NAMES", "FIXED_NAMES", "GLYPHS", "TYPE_GLYPH", "RELATIONS", "RELATION_LABELS", "MDE_SPLITS",
    "PRESETS", "SyntheticConfig", "preset", "Benchmark", "generate_benchmark", "write_benchmark",
    "make_synthetic_benchmark", "mde_schema", "synthetic_corpus", "ground_truth_rows", "read_ground_truth",
    "text_only_ceiling", "text_only_accuracy", "text_only_f1", "majority_label_accuracy", "benchmark_stats",
    "ner_text_posterior", "re_text_posterior", "re_sample_id", "render_scene", "expand_template", "list_files",
    "WORLD_VERSIONS", "NON_TYPE_KINDS", "GLYPH_SIZES_V2", "place_glyphs", "glyph_box", "glyph_sizes", "image_evidence",
]
