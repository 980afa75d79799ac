"""The JSONL format for a user's own data (``--format jsonl``): reader, errors, and the job end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.prepare_dataset import main
from tmr_core.errors import DataFormatError
from tmr_core.readers import read_jsonl, tokenize_with_offsets
from tmr_core.schema import base_schema


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """One line per row: a dict as JSON, a string as it is (to write broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (30, 200, 30)).save(path, "PNG")


def read_split(output: Path, split: str):
    return pq.read_table(output / f"{split}.parquet")


# --------------------------------------------------------------------------- the tokeniser


def test_tokeniser_splits_words_from_punctuation_with_offsets():
    text = "Obama's visit to New-York! cafe\u0301 ❤️"
    tokens = tokenize_with_offsets(text)
    assert [t for t, _, _ in tokens] == ["Obama", "'", "s", "visit", "to", "New", "-", "York", "!", "cafe\u0301", "❤️"]
    assert all(text[start:end] == token for token, start, end in tokens)


def test_tokeniser_keeps_handles_hashtags_and_urls_whole_as_the_tweet_files_do():
    text = "RT @sport_live: #Finals tonight http://t.co/x1"
    tokens = tokenize_with_offsets(text)
    assert [t for t, _, _ in tokens] == ["RT", "@sport_live", ":", "#Finals", "tonight", "http://t.co/x1"]
    assert all(text[start:end] == token for token, start, end in tokens)


# --------------------------------------------------------------------------- rows


def test_ner_text_with_character_spans_becomes_bio_tags(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "Obama met Angela Merkel in New York.", "image": "a.png",
         "entities": [{"start": 0, "end": 5, "type": "PER"}, {"start": 10, "end": 23, "type": "PER"},
                      {"start": 27, "end": 35, "type": "LOC", "text": "New York"}]},
        {"id": "no-entities", "text": "Nothing here", "entities": []},
    ])
    first, second = read_jsonl(path, "ner")
    assert first.id == "train-1" and first.image == "a.png" and first.line == 1
    assert first.columns == {
        "tokens": ["Obama", "met", "Angela", "Merkel", "in", "New", "York", "."],
        "tags": ["B-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"],
    }
    assert first.labels == ["PER", "PER", "LOC"]
    assert second.id == "no-entities" and second.image is None and second.columns["tags"] == ["O", "O"]


def test_ner_tokens_and_tags_are_taken_as_given(tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [
        {"id": "t1", "tokens": ["RT", "@user", ":", "Paris", "Hilton"], "tags": ["O", "O", "O", "B-PER", "I-PER"]},
    ])
    (sample,) = read_jsonl(path, "ner")
    assert sample.columns == {"tokens": ["RT", "@user", ":", "Paris", "Hilton"], "tags": ["O", "O", "O", "B-PER", "I-PER"]}
    assert sample.labels == ["PER"]


def test_re_spans_in_characters_or_tokens_give_mnre_spans(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "Steve Jobs founded Apple.", "head": {"start": 0, "end": 10}, "tail": {"start": 19, "end": 24},
         "relation": "/per/org/member_of"},
        {"tokens": ["Steve", "Jobs", "founded", "Apple", "."], "head": {"start": 0, "end": 2},
         "tail": {"start": 3, "end": 4}, "relation": "/per/org/member_of"},
    ])
    by_chars, by_tokens = read_jsonl(path, "re")
    expected = {"tokens": ["Steve", "Jobs", "founded", "Apple", "."], "head": {"name": "Steve Jobs", "start": 0, "end": 2},
                "tail": {"name": "Apple", "start": 3, "end": 4}, "relation": "/per/org/member_of"}
    assert by_chars.columns == expected == by_tokens.columns
    assert by_chars.labels == ["/per/org/member_of"]


# --------------------------------------------------------------------------- errors name path:line


NER_OK = {"text": "Obama spoke", "entities": [{"start": 0, "end": 5, "type": "PER"}]}


@pytest.mark.parametrize(
    "bad, words",
    [
        ('{"text": "Obama spoke", "entities": [', ["not valid JSON", "expected one JSON object per line"]),
        ('["a list"]', ["found a JSON list", "expected one JSON object"]),
        ({"text": "Obama spoke", "entities": [{"start": 0, "end": 3, "type": "PER"}]},
         ["entity 0 span [0, 3) = 'Oba' does not fall on token boundaries", "'Obama' [0, 5)",
          "expected a span from a token's start to a token's end"]),
        ({"text": "Obama spoke", "entities": [{"start": 0, "end": 5, "type": "PERSON"}]},
         ["entity 0 has type 'PERSON'", "expected one of PER, LOC, ORG, MISC"]),
        ({"entities": [{"start": 0, "end": 5, "type": "PER"}]},
         ["found neither 'text' nor 'tokens'", "expected exactly one"]),
        ({"text": "Obama spoke", "entities": [{"start": 0, "end": 5, "type": "PER", "text": "Obam"}]},
         ["entity 0 text 'Obam' disagrees with its span [0, 5) = 'Obama'", "Unicode code points"]),
        ({"text": "Obama spoke", "entities": [{"start": 0, "end": 40, "type": "PER"}]},
         ["entity 0 span [0, 40) is empty or outside the sentence of 11 characters"]),
        ({"text": "Obama Jr spoke", "entities": [{"start": 0, "end": 8, "type": "PER"}, {"start": 6, "end": 8, "type": "PER"}]},
         ["entity 1 [6, 8) overlaps entity 0 [0, 8)"]),
        ({"tokens": ["Obama", "spoke"], "tags": ["B-PER"]}, ["expected a list of 2 BIO tags, one per token"]),
        ({"tokens": ["Obama", "spoke"], "tags": ["B-PERSON", "O"]}, ["found tag 'B-PERSON' at token 0 ('Obama')"]),
        ({**NER_OK, "img": "a.png"}, ["found unknown key(s) ['img']", "expected only id, text, tokens, image, entities"]),
        ({"text": "A B", "head": {"start": 0, "end": 1}, "tail": {"start": 2, "end": 3}, "relation": "r"},
         ["found a re row", "expected a ner row"]),
        ({"text": "Obama", "tags": ["B-PER"], "entities": []}, ["found 'tags' with 'text'"]),
        ({"id": 7, **NER_OK}, ["found 'id': 7; expected a non-empty string"]),
        ({**NER_OK, "image": ""}, ["found 'image': ''; expected a file name, path or s3:// URI, or null"]),
    ],
)
def test_malformed_ner_lines_name_path_and_line(tmp_path, bad, words):
    path = write_jsonl(tmp_path / "train.jsonl", [NER_OK, "", bad])  # a blank line is skipped, not an error
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path, "ner")
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"tokens": ["A", "B"], "head": {"start": 0, "end": 1}, "tail": {"start": 1, "end": 3}, "relation": "r"},
         ["'tail' span [1, 3) is empty or outside the sentence of 2 tokens"]),
        ({"tokens": ["A", "B"], "head": {"start": 0, "end": 1}, "tail": [1, 2], "relation": "r"},
         ["found 'tail' [1, 2]; expected {\"start\": int, \"end\": int"]),
        ({"text": "Steve Jobs", "head": {"start": 0, "end": 7}, "tail": {"start": 6, "end": 10}, "relation": "r"},
         ["'head' span [0, 7) = 'Steve J' does not fall on token boundaries"]),
        ({"tokens": ["A", "B"], "head": {"start": 0, "end": 1}, "tail": {"start": 1, "end": 2}, "relation": ""},
         ["found 'relation': ''; expected a non-empty label string"]),
        ({"tokens": ["A", "B"], "tail": {"start": 1, "end": 2}, "relation": "r"}, ["missing 'head'"]),
    ],
)
def test_malformed_re_lines_name_path_and_line(tmp_path, bad, words):
    path = write_jsonl(tmp_path / "test.jsonl", [bad])
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path, "re")
    assert str(info.value).startswith(f"{path}:1: ")
    for word in words:
        assert word in str(info.value)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "x", **NER_OK}, NER_OK, {"id": "x", **NER_OK}])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:3: id 'x' repeats line 1; expected each id once per file"):
        read_jsonl(path, "ner")
    # a given id may not take a generated one either
    path = write_jsonl(tmp_path / "train.jsonl", [NER_OK, {"id": "train-1", **NER_OK}])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: id 'train-1' repeats line 1"):
        read_jsonl(path, "ner")


# --------------------------------------------------------------------------- the job


SENTENCES = {  # split -> (id, tokens, tags), the same samples in both formats
    "train": [("s1", ["Obama", "visited", "New", "York", "."], ["B-PER", "O", "B-LOC", "I-LOC", "O"]),
              ("s2", ["Apple", "is", "here"], ["B-ORG", "O", "O"])],
    "valid": [("s3", ["Go", "Lakers", "!"], ["O", "B-ORG", "O"])],
    "test": [("s4", ["Merkel", "in", "Paris"], ["B-PER", "O", "B-LOC"])],
}


def entity_spans(tokens: list[str], tags: list[str]) -> tuple[str, list[dict]]:
    """The sentence as text (tokens joined by spaces) and its entities as character spans."""
    starts, position = [], 0
    for token in tokens:
        starts.append(position)
        position += len(token) + 1
    entities = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            end = i + 1
            while end < len(tags) and tags[end] == "I-" + tag[2:]:
                end += 1
            entities.append({"start": starts[i], "end": starts[end - 1] + len(tokens[end - 1]), "type": tag[2:]})
    return " ".join(tokens), entities


def test_jsonl_ner_writes_the_table_twitter2017_writes(tmp_path, capsys):
    images, jsonl, twitter = tmp_path / "images", tmp_path / "jsonl", tmp_path / "t17"
    twitter.mkdir()
    for split, sentences in SENTENCES.items():
        rows = []
        for number, (sample_id, tokens, tags) in enumerate(sentences):
            write_png(images / f"{sample_id}.jpg")  # the name the Twitter reader derives; PNG bytes decode as well
            text, entities = entity_spans(tokens, tags)
            # text with character spans and tokens with tags must give the same row
            rows.append({"id": sample_id, "text": text, "entities": entities, "image": f"{sample_id}.jpg"} if number % 2 == 0
                        else {"id": sample_id, "tokens": tokens, "tags": tags, "image": f"{sample_id}.jpg"})
        write_jsonl(jsonl / f"{split}.jsonl", rows)
        blocks = [f"IMGID:{i}\n" + "".join(f"{t}\t{g}\n" for t, g in zip(tokens, tags, strict=True)) for i, tokens, tags in sentences]
        (twitter / f"{split}.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")

    assert main(["--format", "jsonl", "--data_dir", str(jsonl), "--image_dir", str(images),
                 "--output", str(tmp_path / "out_jsonl")]) == 0  # no --task: read from the rows
    summary = capsys.readouterr().out
    assert main(["--format", "twitter2017", "--data_dir", str(twitter), "--image_dir", str(images),
                 "--output", str(tmp_path / "out_t17")]) == 0
    for split, sentences in SENTENCES.items():
        table, twitter_table = read_split(tmp_path / "out_jsonl", split), read_split(tmp_path / "out_t17", split)
        assert table.schema.equals(base_schema("ner")) and table.schema.equals(twitter_table.schema)
        # image_id is the image as the row names it (Twitter's is the IMGID, without ".jpg"); the rest is identical
        assert table.drop(["image_id"]).equals(twitter_table.drop(["image_id"]))
        assert table.column("image_id").to_pylist() == [f"{sample_id}.jpg" for sample_id, _, _ in sentences]
    assert "train: 2 rows read, 2 written; images missing 0, corrupt 0" in summary
    assert "entities per type (3): LOC 1, ORG 1, PER 1" in summary
    assert "task: ner" in (tmp_path / "out_jsonl" / "config.yaml").read_text()


def test_jsonl_re_writes_the_table_mnre_writes(tmp_path):
    images, jsonl, mnre = tmp_path / "images", tmp_path / "jsonl", tmp_path / "mnre"
    mnre.mkdir()
    (mnre / "ours_rel2id.json").write_text(json.dumps({"None": 0, "/per/org/member_of": 1}))
    tokens = ["Steve", "Jobs", "founded", "Apple", "."]
    for split, mnre_name in (("train", "ours_train.txt"), ("valid", "ours_val.txt"), ("test", "ours_test.txt")):
        image = f"{split}_img.jpg"
        write_png(images / image)
        head, tail = {"name": "Steve Jobs", "pos": [0, 2]}, {"name": "Apple", "pos": [3, 4]}
        line = {"token": tokens, "h": head, "t": tail, "img_id": image, "relation": "/per/org/member_of"}
        (mnre / mnre_name).write_text(repr(line) + "\n" + repr({**line, "relation": "None"}) + "\n", encoding="utf-8")
        write_jsonl(jsonl / f"{split}.jsonl", [
            {"id": f"{split}_img-0", "text": "Steve Jobs founded Apple.", "head": {"start": 0, "end": 10},
             "tail": {"start": 19, "end": 24}, "relation": "/per/org/member_of", "image": image},
            {"id": f"{split}_img-1", "tokens": tokens, "head": {"start": 0, "end": 2}, "tail": {"start": 3, "end": 4},
             "relation": "None", "image": image},
        ])
    assert main(["--format", "jsonl", "--task", "re", "--data_dir", str(jsonl), "--image_dir", str(images),
                 "--output", str(tmp_path / "out_jsonl")]) == 0
    assert main(["--format", "mnre", "--data_dir", str(mnre), "--image_dir", str(images),
                 "--output", str(tmp_path / "out_mnre")]) == 0
    for split in ("train", "valid", "test"):
        table = read_split(tmp_path / "out_jsonl", split)
        assert table.schema.equals(base_schema("re"))
        assert table.equals(read_split(tmp_path / "out_mnre", split))


def test_jsonl_images_absent_absolute_or_relative_and_none_outside(tmp_path, capsys):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_png(data / "pics" / "a.png")  # no --image_dir: names are relative to --data_dir
    write_png(elsewhere / "b.png")
    write_jsonl(data / "test.jsonl", [
        {**NER_OK, "image": "pics/a.png"},
        {**NER_OK, "image": str(elsewhere / "b.png")},
        {**NER_OK, "image": None},
        NER_OK,
    ])
    assert main(["--format", "jsonl", "--data_dir", str(data), "--splits", "[test]", "--output", str(tmp_path / "out")]) == 0
    rows = read_split(tmp_path / "out", "test").to_pylist()
    assert [r["id"] for r in rows] == ["test-1", "test-2", "test-3", "test-4"]
    assert [r["image_uri"] for r in rows] == [str(data / "pics" / "a.png"), str(elsewhere / "b.png"), None, None]
    assert [r["image_id"] for r in rows] == ["pics/a.png", str(elsewhere / "b.png"), "", ""]
    assert "test: 4 rows read, 4 written; images missing 0, corrupt 0" in capsys.readouterr().out

    write_jsonl(data / "test.jsonl", [NER_OK, {**NER_OK, "image": "../elsewhere/b.png"}])
    with pytest.raises(DataFormatError, match=r"test\.jsonl:2: image '\.\./elsewhere/b\.png' resolves outside --image_dir"):
        main(["--format", "jsonl", "--data_dir", str(data), "--splits", "[test]", "--output", str(tmp_path / "out2")])


def test_splits_of_two_tasks_are_an_error_naming_the_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [NER_OK])
    write_jsonl(tmp_path / "test.jsonl", [
        {"tokens": ["A", "B"], "head": {"start": 0, "end": 1}, "tail": {"start": 1, "end": 2}, "relation": "r"}])
    with pytest.raises(DataFormatError) as info:
        main(["--format", "jsonl", "--data_dir", str(tmp_path), "--splits", "[train, test]",
              "--output", str(tmp_path / "out")])
    assert str(info.value).startswith(f"{tmp_path / 'test.jsonl'}:1: found a re row")
    assert not (tmp_path / "out").exists()
