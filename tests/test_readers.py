"""Readers on the real TMR files in ../shared/tmr-data, and on small malformed files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from tmr_core.errors import DataFormatError
from tmr_core.readers import (
    ImageCheck,
    SplitOverlap,
    check_image,
    chunk_entities,
    cross_split_overlaps,
    image_name_escapes,
    re_sample_ids,
    read_mnre,
    read_rel2id,
    read_twitter_ner,
)
from tmr_core.schema import NER_TAGS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "tmr-data"
SPLIT_FILES = {
    "twitter2015": ("train.txt", "val.txt", "test.txt"),
    "twitter2017": ("train.txt", "valid.txt", "test.txt"),
}


def raw_sentences(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """An independent, naive parse of a clean Twitter file to compare the reader with."""
    out = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        if not block.strip():
            continue
        head, *lines = block.split("\n")
        pairs = [line.split("\t") for line in lines]
        out.append((head[len("IMGID:"):], [p[0] for p in pairs], [p[1] for p in pairs]))
    return out


def entity_counts(sentences) -> Counter:
    return Counter(kind for s in sentences for kind, _, _ in chunk_entities(s.tags))


# --------------------------------------------------------------------------- real files


def test_twitter2017_full_test_file_matches_published_counts():
    sentences = read_twitter_ner(DATA / "twitter2017-test-full" / "test.txt")
    assert len(sentences) == 723
    assert sum(len(s.tokens) for s in sentences) == 11330
    counts = entity_counts(sentences)
    assert sum(counts.values()) == 1351
    assert counts == {"PER": 621, "LOC": 178, "ORG": 395, "MISC": 157}
    b_counts = Counter(tag[2:] for s in sentences for tag in s.tags if tag.startswith("B-"))
    assert b_counts == counts  # Twitter-2017 has no orphan I-, so B- count equals chunk count


@pytest.mark.parametrize("dataset", ["twitter2015", "twitter2017"])
def test_twitter_samples_read_exactly_with_misc_normalised(dataset):
    for name in SPLIT_FILES[dataset]:
        path = DATA / dataset / name
        sentences = read_twitter_ner(path, "OTHER" if dataset == "twitter2015" else "MISC")
        raw = raw_sentences(path)
        assert len(sentences) == len(raw) == 200
        for sentence, (image_id, tokens, tags) in zip(sentences, raw, strict=True):
            assert sentence.image_id == image_id
            assert sentence.tokens == tokens
            assert sentence.tags == [t.replace("OTHER", "MISC") for t in tags]
            assert set(sentence.tags) <= set(NER_TAGS)
        assert sentences[0].line == 1
        assert any("MISC" in t for s in sentences for t in s.tags)


def test_twitter2015_orphan_i_tags_are_kept_and_start_an_entity():
    orphans = {}
    for name in SPLIT_FILES["twitter2015"]:
        sentences = read_twitter_ner(DATA / "twitter2015" / name, "OTHER")
        orphans[name] = sum(
            1 for s in sentences for i, tag in enumerate(s.tags)
            if tag.startswith("I-") and (i == 0 or s.tags[i - 1][2:] != tag[2:])
        )
        for s in sentences:  # conlleval chunking, checked against seqeval's default (lenient) rules
            assert [(k, a, b - 1) for k, a, b in chunk_entities(s.tags)] == get_entities(s.tags)
    assert orphans == {"train.txt": 6, "val.txt": 8, "test.txt": 6}  # FORMATS.md: 6/8/6 in the samples

    # train.txt line 1491 is "Louis<TAB>I-LOC" after "St<TAB>O" and ".<TAB>O".
    st_louis = [s for s in read_twitter_ner(DATA / "twitter2015" / "train.txt") if s.line < 1491][-1]
    i = 1491 - st_louis.line - 1
    assert st_louis.tokens[i - 2:i + 1] == ["St", ".", "Louis"]
    assert st_louis.tags[i - 2:i + 1] == ["O", "O", "I-LOC"]
    assert ("LOC", i, i + 1) in chunk_entities(st_louis.tags)


def test_twitter2017_zero_width_tokens_keep_labels_aligned():
    for name in SPLIT_FILES["twitter2017"]:
        sentences = read_twitter_ner(DATA / "twitter2017" / name)
        with_fe0f = [s for s in sentences if "\ufe0f" in s.tokens]
        assert with_fe0f, name
        for s in with_fe0f:
            assert len(s.tokens) == len(s.tags)
            for token, tag in zip(s.tokens, s.tags, strict=True):
                if token == "\ufe0f":
                    assert tag == "O"
        # Each token, and the tag beside it, sits on file line IMGID line + 1 + its index.
        raw_lines = (DATA / "twitter2017" / name).read_text(encoding="utf-8").split("\n")
        for s in with_fe0f:
            for j, (token, tag) in enumerate(zip(s.tokens, s.tags, strict=True)):
                assert raw_lines[s.line + j] == f"{token}\t{tag}"


def test_mnre_samples_every_line_kept_and_spans_consistent():
    rel2id = read_rel2id(DATA / "mnre" / "ours_rel2id.json")
    assert len(rel2id) == 23 and rel2id["None"] == 0 and rel2id["/misc/loc/held_on"] == 22
    counts = {}
    for split, expected in (("train", 200), ("val", 200), ("test", 202)):
        path = DATA / "mnre" / f"ours_{split}.txt"
        instances = read_mnre(path, rel2id)
        counts[split] = len(instances)
        assert [i.line for i in instances] == list(range(1, expected + 1))
        for inst in instances:
            assert inst.head.name == " ".join(inst.tokens[inst.head.start:inst.head.end])
            assert inst.tail.name == " ".join(inst.tokens[inst.tail.start:inst.tail.end])
            assert inst.relation in rel2id and inst.image_id.endswith(".jpg")
        ids = re_sample_ids(instances, path)
        assert len(set(ids)) == len(ids) == expected
    assert counts == {"train": 200, "val": 200, "test": 202}

    first = read_mnre(DATA / "mnre" / "ours_val.txt")[0]
    assert first.tokens[:3] == ["RT", "@AFP", ":"] and first.tokens[14] == "'s"
    assert (first.head.name, first.head.start, first.head.end) == ("UN", 5, 6)
    assert (first.tail.name, first.tail.start, first.tail.end) == ("Libya", 13, 14)
    assert first.image_id == "twitter_stream_2018_09_04_14_0_2_44.jpg" and first.relation == "None"
    third = read_mnre(DATA / "mnre" / "ours_train.txt")[2]
    assert third.relation == "/per/misc/present_in" and third.tail.name == "Hollywood Walk of Fame"


def test_re_sample_ids_count_lines_within_an_image():
    instances = read_mnre(DATA / "mnre" / "ours_val.txt")
    ids = re_sample_ids(instances, "x")
    assert ids[0] == "twitter_stream_2018_09_04_14_0_2_44-0"
    assert ids[1] == "twitter_stream_2018_06_11_24_0_2_194-0"
    assert ids[2] == "twitter_stream_2018_06_11_24_0_2_194-1"


# --------------------------------------------------------------------------- leniency


def test_crlf_bom_and_missing_final_blank_line_are_accepted(tmp_path):
    clean = (DATA / "twitter2017" / "test.txt").read_text(encoding="utf-8")
    messy = tmp_path / "messy.txt"
    messy.write_bytes(("\ufeff" + clean.rstrip("\n").replace("\n", "\r\n")).encode("utf-8"))
    assert read_twitter_ner(messy) == read_twitter_ner(DATA / "twitter2017" / "test.txt")

    mnre = (DATA / "mnre" / "ours_test.txt").read_text(encoding="utf-8")
    messy_re = tmp_path / "messy_re.txt"
    messy_re.write_bytes(("\ufeff" + mnre.rstrip("\n").replace("\n", "\r\n")).encode("utf-8"))
    assert read_mnre(messy_re) == read_mnre(DATA / "mnre" / "ours_test.txt")


def test_chunk_entities_follows_conlleval():
    cases = [
        ["B-PER", "I-PER", "O", "B-LOC"],
        ["I-LOC", "I-LOC", "B-LOC", "I-ORG"],
        ["O", "I-MISC", "B-PER", "B-PER", "I-PER"],
        ["B-ORG", "I-PER", "I-PER", "O", "O"],
        [],
    ]
    for tags in cases:
        assert [(k, a, b - 1) for k, a, b in chunk_entities(tags)] == get_entities(tags), tags
    assert chunk_entities(["O", "I-LOC", "I-LOC", "O"]) == [("LOC", 1, 3)]


# --------------------------------------------------------------------------- malformed files

NER_OK = "IMGID:1\nGeorge\tB-PER\nZimmerman\tI-PER\n\n"


@pytest.mark.parametrize(
    "text, line, words",
    [
        (NER_OK + "IMGID:2\nhello\n\n", 6, ["'hello'", "token<TAB>tag"]),
        (NER_OK + "IMGID:2\nhello world\tO\tO\n\n", 6, ["token<TAB>tag"]),
        (NER_OK + "IMGID:2\nhello\t\n\n", 6, ["token<TAB>tag"]),
        (NER_OK + "IMGID:2\nParis\tB-CITY\n\n", 6, ["'B-CITY'", "B-LOC"]),
        ("George\tB-PER\n\n", 1, ["before any IMGID", "IMGID:<id>"]),
        (NER_OK + "IMGID:\nx\tO\n\n", 5, ["empty image id", "IMGID:<id>"]),
        (NER_OK + "IMGID:1\nx\tO\n\n", 5, ["'1' repeats line 1"]),
        ("IMGID:1\nx\tO\nIMGID:2\ny\tO\n\n", 3, ["blank line before the next IMGID"]),
        (NER_OK + "IMGID:2\n\nIMGID:3\nx\tO\n", 5, ["no token lines"]),
    ],
    ids=["no-tag", "two-tabs", "empty-tag", "unknown-tag", "token-before-imgid", "empty-imgid",
         "duplicate-imgid", "imgid-without-blank", "empty-sentence"],
)
def test_malformed_twitter_lines_name_path_and_line(tmp_path, text, line, words):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_twitter_ner(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert "expected" in message
    for word in words:
        assert word in message, message


def test_twitter2017_tag_set_rejects_other_when_spelled_misc(tmp_path):
    path = tmp_path / "t17.txt"
    path.write_text("IMGID:a\nx\tB-OTHER\n\n", encoding="utf-8")
    assert read_twitter_ner(path, "OTHER")[0].tags == ["B-MISC"]
    with pytest.raises(DataFormatError, match=rf"^{path}:2: found tag 'B-OTHER'"):
        read_twitter_ner(path, "MISC")


RE_OK = "{'token': ['Bill', 'Cosby', 'in', 'Paris'], 'h': {'name': 'Bill Cosby', 'pos': [0, 2]}, 't': {'name': 'Paris', 'pos': [3, 4]}, 'img_id': 'a.jpg', 'relation': 'None'}\n"


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{'token': ['a', 'b'], 'h': \n", ["expected a Python dict literal"]),
        ("['token', 'h']\n", ["found a list literal", "expected a dict"]),
        ("__import__('os').system('touch pwned')\n", ["expected a Python dict literal"]),
        (RE_OK.replace("'img_id': 'a.jpg', ", ""), ["missing key 'img_id'", "expected keys token, h, t, img_id, relation"]),
        (RE_OK.replace("'pos': [3, 4]", "'pos': [3, 5]"), ["'t' span [3, 5)", "4 tokens"]),
        (RE_OK.replace("'pos': [0, 2]", "'pos': [2, 2]"), ["'h' span [2, 2)"]),
        (RE_OK.replace("'name': 'Paris'", "'name': 'London'"), ["'London' disagrees", "'Paris'"]),
        (RE_OK.replace("'relation': 'None'", "'relation': '/per/per/friend'"), ["'/per/per/friend'", "rel2id"]),
        (RE_OK.replace("'pos': [0, 2]", "'pos': 'x'"), ["pos 'x'", "[start, end]"]),
    ],
    ids=["truncated", "list", "code", "missing-key", "span-outside", "empty-span", "name-disagrees",
         "unknown-relation", "bad-pos"],
)
def test_malformed_mnre_lines_name_path_and_line(tmp_path, monkeypatch, bad, words):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ours_train.txt"
    path.write_text(RE_OK + RE_OK.replace("a.jpg", "b.jpg") + bad, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_mnre(path, {"None", "/per/per/peer"})
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "pwned").exists()  # a literal parser never runs code


def test_mnre_lines_of_one_image_must_be_consecutive(tmp_path):
    path = tmp_path / "ours_val.txt"
    path.write_text(RE_OK + RE_OK.replace("a.jpg", "b.jpg") + RE_OK, encoding="utf-8")
    instances = read_mnre(path)
    with pytest.raises(DataFormatError, match=rf"^{path}:3: sample id 'a-0' repeats line 1"):
        re_sample_ids(instances, path)


def test_bad_rel2id_names_path_and_line(tmp_path):
    path = tmp_path / "ours_rel2id.json"
    path.write_text('{"None": 0,\n "/per/per/peer": }', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"^{path}:2: not valid JSON"):
        read_rel2id(path)
    path.write_text('{"None": 0, "/per/per/peer": 2}', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"expected each of 0\.\.1 once"):
        read_rel2id(path)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(NER_OK.encode() + b"IMGID:2\ncaf\xe9\tO\n\n")
    with pytest.raises(DataFormatError, match=rf"^{path}:6: not UTF-8"):
        read_twitter_ner(path)


# --------------------------------------------------------------------------- images and splits


@pytest.mark.parametrize(
    "name, escapes",
    [
        ("16_05_01_6.jpg", False), ("sub/x.jpg", False), ("a/../b.jpg", False), ("...jpg", False), ("a:b.jpg", False),
        ("../x.jpg", True), ("..", True), ("a/../../x.jpg", True), ("/etc/passwd", True), ("..\\x.jpg", True),
        ("C:\\x.jpg", True), ("\\\\host\\share\\x.jpg", True),
    ],
)
def test_image_name_escapes(name, escapes):
    assert image_name_escapes(name) is escapes


def test_check_image_decodes_what_verify_accepts(tmp_path):
    from PIL import Image

    from tests.test_prepare_dataset import write_truncated_jpeg

    whole, truncated = tmp_path / "whole.png", tmp_path / "cut.jpg"
    Image.new("RGB", (4, 4)).save(whole)
    write_truncated_jpeg(truncated)
    assert check_image([str(tmp_path / "absent.jpg"), str(whole)]) == ImageCheck(uri=str(whole))
    check = check_image([str(truncated)])
    assert check.uri is None and check.problem == "corrupt"
    assert check.detail.startswith(f"{truncated} is not a readable image (image file is truncated")


def test_cross_split_overlaps_pair_every_split():
    overlaps = cross_split_overlaps({"train": ["a", "b", "c"], "valid": ["c", "d"], "test": ["b", "c", "e"]})
    assert overlaps == [
        SplitOverlap("train", "valid", ["c"]), SplitOverlap("train", "test", ["b", "c"]), SplitOverlap("valid", "test", ["c"]),
    ]
    assert cross_split_overlaps({"train": ["a"], "test": ["b"]}) == []
