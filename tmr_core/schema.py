"""The columns every stage reads and writes: one Parquet row per sample.

``prepare_dataset`` writes the base columns; each later stage adds its own and never renames
or drops earlier ones, so training and serving read the same table whatever stages ran.

| column                         | added by                    | type                                   |
|--------------------------------|-----------------------------|----------------------------------------|
| id, split, task, tokens        | prepare_dataset             | string, string, string, list<string>   |
| tags (NER)                     | prepare_dataset             | list<string> (BIO)                     |
| head, tail, relation (RE)      | prepare_dataset             | struct<name,start,end>, …, string      |
| image_id, image_uri            | prepare_dataset             | string, string (null: no image)        |
| phrases                        | extract_phrases             | list<struct<text,start,end>>           |
| back_translation_uri           | generate_back_translations  | string (null when generation failed)   |
| back_translation_error         | generate_back_translations  | string (null when it worked)           |
| regions, back_translation_regions | ground_phrases           | list<struct<box,score,phrase>>         |
| image_error                    | ground_phrases              | string (null: the image was usable)    |
| divergence                     | score_divergence            | list<float32> of 3 (s, c, w), sums to 1; null without a usable image |
| back_translation_divergence    | score_divergence (optional) | the same for (t, v')                   |

No stage drops a valid or test row: a row whose image is missing or unreadable keeps empty
regions and says why in ``image_error``, and the extractor reads it as a zero image.

Spans are token offsets, ``end`` exclusive. Boxes are ``[x1, y1, x2, y2]`` in pixels of the
image they were detected on.
"""

from __future__ import annotations

import pyarrow as pa

NER_TYPES = ("PER", "LOC", "ORG", "MISC")
NER_TAGS = ("O",) + tuple(f"{p}-{t}" for t in NER_TYPES for p in ("B", "I"))
ALIGNMENT_CATEGORIES = ("strengthen", "complement", "weaken")  # the MDE's output order (Eq. 4)
SPLITS = ("train", "valid", "test")

SPAN = pa.struct([("name", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
PHRASE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
REGION = pa.struct([("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()), ("phrase", pa.string())])

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("tokens", pa.list_(pa.string()), nullable=False),
]
NER_FIELDS = [pa.field("tags", pa.list_(pa.string()), nullable=False)]
RE_FIELDS = [
    pa.field("head", SPAN, nullable=False),
    pa.field("tail", SPAN, nullable=False),
    pa.field("relation", pa.string(), nullable=False),
]
IMAGE_FIELDS = [pa.field("image_id", pa.string(), nullable=False), pa.field("image_uri", pa.string())]

STAGE_FIELDS = {
    "extract_phrases": [pa.field("phrases", pa.list_(PHRASE))],
    "generate_back_translations": [
        pa.field("back_translation_uri", pa.string()),
        pa.field("back_translation_error", pa.string()),
    ],
    "ground_phrases": [
        pa.field("regions", pa.list_(REGION)),
        pa.field("back_translation_regions", pa.list_(REGION)),
        pa.field("image_error", pa.string()),
    ],
    # Three floats each, stored as a variable-size list: pyarrow cannot read back a Parquet
    # fixed-size list that holds a null ("Expected all lists to be of size=3"), and a row without a
    # usable image has a null score.
    "score_divergence": [
        pa.field("divergence", pa.list_(pa.float32())),
        pa.field("back_translation_divergence", pa.list_(pa.float32())),
    ],
}


def base_schema(task: str) -> pa.Schema:
    """The schema ``prepare_dataset`` writes for ``task`` (``ner`` or ``re``)."""
    if task not in ("ner", "re"):
        raise ValueError(f"task must be 'ner' or 're', got {task!r}")
    return pa.schema(BASE_FIELDS + (NER_FIELDS if task == "ner" else RE_FIELDS) + IMAGE_FIELDS)
