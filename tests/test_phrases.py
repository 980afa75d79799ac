"""Noun phrases from stanza trees: hand-made trees, max_len, tree files, the benchmark's gold trees."""

from __future__ import annotations

import pytest
from stanza.models.constituency.tree_reader import read_trees

from tmr_core.errors import DataFormatError, TMRError
from tmr_core.phrases import Phrase, StanzaConstituencyParser, noun_phrases, read_trees_file
from tmr_core.readers import read_mnre, read_twitter_ner

STREETS = "(ROOT (S (NP (NP (DT The) (NNS streets)) (PP (IN of) (NP (NNP New) (NNP York)))) (VP (VBD were) (ADJP (JJ busy)))))"


def tree(text: str):
    return read_trees(text, use_tqdm=False)[0]


def test_nested_noun_phrases_with_token_spans():
    assert noun_phrases(tree(STREETS), max_len=5) == [
        Phrase("The streets", 0, 2),
        Phrase("The streets of New York", 0, 5),
        Phrase("New York", 3, 5),
    ]


def test_max_len_drops_longer_phrases():
    assert noun_phrases(tree(STREETS), max_len=4) == [Phrase("The streets", 0, 2), Phrase("New York", 3, 5)]
    assert noun_phrases(tree(STREETS), max_len=1) == []
    with pytest.raises(ValueError, match="max_len"):
        noun_phrases(tree(STREETS), max_len=0)


def test_unary_chains_are_deduplicated_and_function_tags_count():
    t = tree("(ROOT (S (NP (NP (NNP Jordan))) (VP (VBD left) (NP-TMP (NN today)))))")
    assert noun_phrases(t, max_len=4) == [Phrase("Jordan", 0, 1), Phrase("today", 2, 3)]


def test_tree_file_errors_name_path_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(f"a\t{STREETS}\nb\t(ROOT (S (NP (NNP Oslo))))\n")
    trees = read_trees_file(good)
    assert list(trees) == ["a", "b"] and trees["b"].leaf_labels() == ["Oslo"]
    for text, message in [
        ("a\t(ROOT (NP (NNP X)))\nno tab here\n", "good2.txt:2: expected '<id>"),
        ("a\t(ROOT (NP (NNP X)))\nb\t(ROOT (NP (NNP X))\n", "good2.txt:2: not a bracketed tree"),
        ("a\t(ROOT (NP (NNP X)))\na\t(ROOT (NP (NNP Y)))\n", "good2.txt:2: id 'a' appears twice"),
    ]:
        bad = tmp_path / "good2.txt"
        bad.write_text(text)
        with pytest.raises(DataFormatError, match=message):
            read_trees_file(bad)


def test_stanza_parser_without_models_says_how_to_download(tmp_path):
    with pytest.raises(TMRError, match=r"stanza\.download\('en', processors='tokenize,pos,constituency'\)") as info:
        StanzaConstituencyParser(model_dir=str(tmp_path / "no-models"))
    assert str(tmp_path / "no-models") in str(info.value)


def test_benchmark_trees_match_tokens_and_cover_every_mention(tiny_benchmark):
    for split in ("train", "test"):
        trees = read_trees_file(tiny_benchmark / "trees" / "ner" / f"{split}.txt")
        sentences = read_twitter_ner(tiny_benchmark / "ner" / f"{split}.txt")
        assert list(trees) == [s.image_id for s in sentences]
        for s in sentences:
            assert trees[s.image_id].leaf_labels() == s.tokens
            spans = {(p.start, p.end) for p in noun_phrases(trees[s.image_id], max_len=4)}
            mentions = {(start, end) for start, end in _mention_spans(s.tags)}
            assert mentions <= spans, s.image_id
        other_nps = sum(len(noun_phrases(t, 4)) for t in trees.values()) - sum(len(_mention_spans(s.tags)) for s in sentences)
        assert other_nps > len(sentences) // 4, "trees hold noun phrases besides the entity mentions"

        re_trees = read_trees_file(tiny_benchmark / "trees" / "re" / f"{split}.txt")
        for inst in read_mnre(tiny_benchmark / "re" / f"ours_{split}.txt"):
            t = re_trees[inst.image_id]
            assert t.leaf_labels() == inst.tokens
            spans = {(p.start, p.end) for p in noun_phrases(t, max_len=6)}
            assert {(inst.head.start, inst.head.end), (inst.tail.start, inst.tail.end)} <= spans


def _mention_spans(tags: list[str]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, tag in enumerate(tags + ["O"]):
        if start is not None and not tag.startswith("I-"):
            spans.append((start, i))
            start = None
        if tag.startswith("B-"):
            start = i
    return spans
