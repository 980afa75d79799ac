"""The collator: word-piece alignment, truncation, RE markers, phrases, images and regions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tmr_core.collate import IGNORE_INDEX, TMRCollator
from tmr_core.extractor import TMRConfig
from tmr_core.schema import NER_TAGS

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "[unused2]", "[unused3]"]
VOCAB += ["john", "smith", "lives", "in", "paris", "new", "york", "the", "cat", "play", "##ing", "##s", "!"]
RELATIONS = ("None", "/per/loc/place_of_residence")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab=str(path))


@pytest.fixture(scope="module")
def processor():
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(size={"shortest_edge": 32})


def ids(tokenizer, *words):
    return tokenizer.convert_tokens_to_ids(list(words))


def text_only(task="ner", **overrides):
    return TMRConfig(task=task, labels=RELATIONS if task == "re" else (), text_only=True, **overrides)


def tag_ids(*tags):
    return [NER_TAGS.index(t) if t else IGNORE_INDEX for t in tags]


def test_zero_width_tokens_get_no_piece_and_never_shift_labels(tokenizer):
    collate = TMRCollator(tokenizer, None, text_only())
    row = {
        "tokens": ["john", "\ufe0f", "smith", "\u200b", "playing", "paris"],
        "tags": ["B-PER", "O", "O", "O", "O", "B-LOC"],
    }
    batch = collate([row])
    assert batch["input_ids"][0].tolist() == ids(
        tokenizer, "[CLS]", "john", "smith", "play", "##ing", "paris", "[SEP]"
    )
    assert batch["word_mask"][0].tolist() == [True, False, True, False, True, True]
    assert batch["word_starts"][0].tolist() == [1, 0, 2, 0, 3, 5]  # first piece of each token
    assert batch["labels"][0].tolist() == tag_ids("B-PER", None, "O", None, "O", "B-LOC")
    assert batch["num_tokens"].tolist() == [6]


def test_truncation_counts_cls_and_sep_and_keeps_a_token_whose_first_piece_fits(tokenizer):
    collate = TMRCollator(tokenizer, None, text_only(max_length=6))
    row = {
        "tokens": ["the", "cat", "lives", "playing", "in", "paris"],
        "tags": ["O", "B-MISC", "O", "B-PER", "O", "B-LOC"],
    }
    batch = collate([row])
    assert batch["input_ids"][0].tolist() == ids(tokenizer, "[CLS]", "the", "cat", "lives", "play", "[SEP]")
    assert batch["word_mask"][0].tolist() == [True, True, True, True, False, False]
    assert batch["labels"][0].tolist() == tag_ids("O", "B-MISC", "O", "B-PER", None, None)


def test_a_batch_pads_pieces_words_and_phrases(tokenizer):
    collate = TMRCollator(tokenizer, None, text_only(max_phrase_len=2, max_phrases=2))
    rows = [
        {
            "tokens": ["john", "smith", "lives", "in", "new", "york"],
            "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"],
            "phrases": [
                {"text": "john smith lives", "start": 0, "end": 3},
                {"text": "new york", "start": 4, "end": 6},
                {"text": "in", "start": 3, "end": 4},
            ],
        },
        {"tokens": ["cats", "!"], "tags": ["O", "O"], "phrases": None},
    ]
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][1].tolist() == [
        1,
        1,
        1,
        1,
        1,
        0,
        0,
        0,
    ]
    assert batch["word_mask"][1].tolist() == [True, True, False, False, False, False]
    assert batch["labels"][1].tolist() == tag_ids("O", "O", None, None, None, None)
    # capped at 2 words and 2 phrases; spans are word-piece [start, end)
    assert batch["phrase_spans"][0].tolist() == [[1, 3], [5, 7]]
    assert batch["phrase_mask"].tolist() == [[True, True], [False, False]]
    columns = {key: [row.get(key) for row in rows] for key in ("tokens", "tags", "phrases")}
    from_columns = collate(columns)  # Ray Data hands a dict of columns
    assert all(torch.equal(from_columns[k], batch[k]) for k in batch)


def test_orphan_inside_tags_become_chunk_starts_for_the_crf(tokenizer):
    collate = TMRCollator(tokenizer, None, text_only())
    batch = collate(
        [
            {
                "tokens": ["the", "paris", "john", "\ufe0f", "smith"],
                "tags": ["O", "I-LOC", "B-PER", "O", "I-PER"],
            }
        ]
    )
    # I-LOC after O starts a chunk; the zero-width O splits john | smith as conlleval reads the gold.
    assert batch["labels"][0].tolist() == tag_ids("O", "B-LOC", "B-PER", None, "B-PER")
    with pytest.raises(ValueError, match="row 0 .*2 tags for 3 tokens"):
        collate([{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}])
    with pytest.raises(ValueError, match="tag 'B-FOO'"):
        collate([{"tokens": ["john"], "tags": ["B-FOO"]}])
    assert "labels" not in collate([{"tokens": ["john"]}])  # inference rows


def test_re_rows_get_entity_markers_in_either_order(tokenizer):
    collate = TMRCollator(tokenizer, None, text_only("re"))
    rows = [
        {
            "tokens": ["john", "smith", "lives", "in", "paris"],
            "relation": RELATIONS[1],
            "head": {"name": "john smith", "start": 0, "end": 2},
            "tail": {"name": "paris", "start": 4, "end": 5},
        },
        {
            "tokens": ["paris", "john"],
            "relation": "None",
            "head": {"name": "john", "start": 1, "end": 2},
            "tail": {"name": "paris", "start": 0, "end": 1},
        },
    ]
    batch = collate(rows)
    assert batch["input_ids"][0].tolist() == ids(
        tokenizer,
        "[CLS]",
        "[unused0]",
        "john",
        "smith",
        "[unused1]",
        "lives",
        "in",
        "[unused2]",
        "paris",
        "[unused3]",
        "[SEP]",
    )
    assert batch["input_ids"][1, :8].tolist() == ids(
        tokenizer, "[CLS]", "[unused2]", "paris", "[unused3]", "[unused0]", "john", "[unused1]", "[SEP]"
    )
    assert batch["entity_positions"].tolist() == [[1, 7], [4, 1]]  # [unused0] and [unused2]
    assert batch["word_starts"][0].tolist() == [2, 3, 5, 6, 8]
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="tail span"):
        collate([dict(rows[0], tail={"name": "x", "start": 4, "end": 9})])
    with pytest.raises(ValueError, match="relation 'nope'"):
        collate([dict(rows[0], relation="nope")])


def test_re_needs_markers_in_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="entity_markers"):
        TMRCollator(tokenizer, None, text_only("re", entity_markers=("<h>", "</h>", "<t>", "</t>")))


def write_image(path: Path, size=(80, 60)) -> str:
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 30))  # a red top-left quarter
    image.save(path)
    return str(path)


def test_images_regions_and_back_translations(tokenizer, processor, tmp_path):
    config = TMRConfig(num_regions=3)
    collate = TMRCollator(tokenizer, processor, config)
    real, generated = write_image(tmp_path / "real.png"), write_image(tmp_path / "bt.png", (64, 64))
    region = lambda box, score: {"box": box, "score": score, "phrase": "p"}  # noqa: E731
    rows = [
        {
            "tokens": ["john"],
            "tags": ["B-PER"],
            "image_uri": real,
            "back_translation_uri": generated,
            "regions": [
                region([40, 30, 80, 60], 0.2),
                region([0, 0, 40, 30], 0.9),
                region([70, 50, 200, 200], 0.5),
                region([10, 10, 10, 40], 0.8),
                region([0, 30, 40, 60], 0.1),
            ],
            "back_translation_regions": [],
            "divergence": [0.6, 0.3, 0.1],
        },
        {
            "tokens": ["paris"],
            "tags": ["B-LOC"],
            "image_uri": None,
            "back_translation_uri": generated,
            "regions": [region([0, 0, 10, 10], 0.9)],
            "back_translation_regions": None,
            "divergence": [0.2, 0.2, 0.6],
        },
    ]
    batch = collate(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["image_mask"].tolist() == [True, False] and batch["bt_image_mask"].tolist() == [True, True]
    assert torch.equal(batch["pixel_values"][1], torch.zeros(3, 32, 32))
    # Top-3 by score after dropping the zero-width box: red quarter, the clamped corner, blue quarter.
    assert batch["region_mask"].tolist() == [[True, True, True], [False, False, False]]  # no image, no crops
    crops = batch["region_pixel_values"][0]
    red, blue = crops[0, :, 16, 16], crops[2, :, 16, 16]
    assert red[0] > red[2] and blue[2] > blue[0]
    # No usable box (none listed, or zero-area ones): the whole image is the one region.
    assert batch["bt_region_mask"].tolist() == [[True, False, False]] * 2
    assert torch.equal(batch["bt_region_pixel_values"][:, 0], batch["bt_pixel_values"])
    assert torch.allclose(batch["divergence"], torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))

    degenerate = [region([10, 10, 10, 40], 0.9), region([90, 0, 120, 20], 0.5)]  # zero width; outside
    crops_only = TMRCollator(tokenizer, processor, TMRConfig(num_regions=3, whole_image_region=False))
    assert not crops_only([dict(rows[0], regions=degenerate)])["region_mask"].any()
    assert collate([dict(rows[0], regions=degenerate)])["region_mask"].tolist() == [[True, False, False]]

    with pytest.raises(ValueError, match=r"row 1 \(id b\): divergence"):
        collate([rows[1], dict(rows[0], id="b", divergence=None)])
    # No usable image and no MDE score (score_divergence keeps such rows): α = (0, 0, 1).
    assert collate([dict(rows[1], divergence=None)])["divergence"].tolist() == [[0.0, 0.0, 1.0]]
    # A stage that could not read the image says so in image_error: the row reads as imageless.
    flagged = collate([dict(rows[0], image_error="image_uri 'x': truncated", divergence=None)])
    assert flagged["image_mask"].tolist() == [False] and not flagged["region_mask"].any()
    assert flagged["divergence"].tolist() == [[0.0, 0.0, 1.0]]
    no_mde = TMRCollator(tokenizer, processor, TMRConfig(use_mde=False, use_back_translation=False))
    plain = no_mde([dict(rows[1], divergence=None)])
    assert "divergence" not in plain and "bt_pixel_values" not in plain


def test_the_pixel_cache_gives_the_same_batch_and_skips_the_processor_for_rows_it_holds(tokenizer, processor, tmp_path):
    config = TMRConfig(num_regions=2)
    images = [write_image(tmp_path / f"{i}.png", (48 + 8 * i, 40)) for i in range(3)]
    rows = [{"tokens": ["john"], "tags": ["B-PER"], "image_uri": uri, "back_translation_uri": images[0],
             "regions": [{"box": [0, 0, 20 + i, 20], "score": 0.5, "phrase": "p"}], "back_translation_regions": [],
             "divergence": [0.5, 0.3, 0.2]} for i, uri in enumerate(images)]
    rows.append(dict(rows[0], image_uri=None))  # no image: nothing to cache
    plain = TMRCollator(tokenizer, processor, config)
    cached = TMRCollator(tokenizer, processor, config, pixel_cache_bytes=10 * 2**20)
    calls = []
    process = cached._process
    cached._process = lambda pictures: calls.append(len(pictures)) or process(pictures)
    expected = plain(rows)
    for _ in range(2):
        batch = cached(list(reversed(rows)))
        for key in expected:
            assert torch.equal(batch[key], expected[key].flip(0) if expected[key].dim() else expected[key]), key
    # first batch: 3 images + 3 crops, then the one v' all rows share + its whole-image crop; the second: nothing
    assert calls == [6, 2]
    # a row with other boxes is another entry: its crops differ
    moved = dict(rows[0], regions=[{"box": [30, 20, 48, 40], "score": 0.5, "phrase": "p"}])  # red and blue
    assert not torch.equal(cached([moved])["region_pixel_values"], expected["region_pixel_values"][:1])
    assert calls == [6, 2, 2]
    tiny = TMRCollator(tokenizer, processor, config, pixel_cache_bytes=1)  # nothing fits: always processed
    tiny(rows)
    assert not tiny._pixels


def test_unreadable_images_raise_unless_skipped(tokenizer, processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    row = {
        "id": "x",
        "tokens": ["john"],
        "image_uri": str(tmp_path / "broken.png"),
        "back_translation_uri": None,
        "divergence": [1.0, 0.0, 0.0],
    }
    config = TMRConfig()
    with pytest.raises(ValueError, match=r"row 0 \(id x\): image_uri: .*not a readable image"):
        TMRCollator(tokenizer, processor, config)([row])
    with pytest.raises(ValueError, match="no such file"):
        TMRCollator(tokenizer, processor, config)([dict(row, image_uri=str(tmp_path / "missing.png"))])
    batch = TMRCollator(tokenizer, processor, config, skip_unreadable_images=True)([row])
    assert batch["image_mask"].tolist() == [False]
