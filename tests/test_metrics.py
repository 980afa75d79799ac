"""Metrics: NER chunk F1 against seqeval (conlleval mode), RE micro F1 and MDE scores by hand."""

import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

from tmr_core.metrics import chunks, classification_scores, ner_scores, re_scores

TYPES = ("PER", "LOC", "ORG", "MISC")


def random_tags(rng: random.Random, length: int) -> list[str]:
    """Messy BIO: orphan I-, type changes mid-chunk and B- after I- all occur often."""
    tags = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.4:
            tags.append("O")
        else:
            tags.append(f"{'B' if kind < 0.65 else 'I'}-{rng.choice(TYPES)}")
    return tags


def seqeval_chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    return [(t, start, end + 1) for t, start, end in get_entities(tags)]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["I-PER", "I-PER", "O"], [("PER", 0, 2)]),  # I- without B- starts a chunk
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # type change mid-chunk
        (["B-ORG", "I-ORG", "B-ORG", "I-ORG"], [("ORG", 0, 2), ("ORG", 2, 4)]),  # B- after I- of same type
        (["O", "I-MISC", "B-MISC"], [("MISC", 1, 2), ("MISC", 2, 3)]),
        (["B-LOC", "O", "I-LOC"], [("LOC", 0, 1), ("LOC", 2, 3)]),
        (["B-PER", "I-PER"], [("PER", 0, 2)]),  # a chunk running to the end is closed
        (["B-PER", "E-PER", "S-LOC", "I-LOC"], [("PER", 0, 2), ("LOC", 2, 3), ("LOC", 3, 4)]),  # BIOES
        ([], []),
        (["O", "O"], []),
    ],
)
def test_chunks_follow_conlleval_edge_cases(tags, expected):
    assert chunks(tags) == expected
    assert chunks(tags) == seqeval_chunks(tags)


def test_chunks_reject_a_malformed_tag_naming_its_position():
    with pytest.raises(ValueError, match=r"tags\[1\].*'X-PER'"):
        chunks(["O", "X-PER"])
    with pytest.raises(ValueError, match=r"tags\[0\]"):
        chunks(["PER"])


@pytest.mark.parametrize("seed", range(40))
def test_ner_scores_equal_seqeval_on_random_tag_sequences(seed):
    rng = random.Random(seed)
    gold, pred = [], []
    for _ in range(rng.randint(1, 12)):
        length = rng.randint(0, 15)
        gold_tags = random_tags(rng, length)
        # Predictions are noisy copies of gold so that many chunks match exactly.
        pred.append([t if rng.random() < 0.8 else rng.choice(["O", *random_tags(rng, 1)]) for t in gold_tags])
        gold.append(gold_tags)
    scores = ner_scores(gold, pred)
    assert scores["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0))
    assert scores["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0))
    assert scores["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred, average=None, zero_division=0
    )
    seqeval_types = sorted({t for sentence in gold + pred for t, _, _ in get_entities(sentence)})
    assert sorted(scores["per_type"]) == seqeval_types
    for index, entity_type in enumerate(seqeval_types):
        ours = scores["per_type"][entity_type]
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(
            (precision[index], recall[index], f1[index])
        )
        assert ours["support"] == support[index]


def test_ner_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]  # the orphan I-ORG is a correct chunk
    scores = ner_scores(gold, pred)
    assert (scores["precision"], scores["recall"], scores["support"]) == (2 / 3, 2 / 3, 3)
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_type"]["ORG"]["precision"] == 0.5 and scores["per_type"]["ORG"]["recall"] == 1.0


def test_ner_scores_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="sentence 1: gold has 2 tags but pred has 1"):
        ner_scores([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentences"):
        ner_scores([["O"]], [])


def test_re_scores_follow_the_mnre_protocol():
    gold = ["per/loc", "None", "org/per", "per/loc", "None", "org/per"]
    pred = ["per/loc", "org/per", "None", "org/per", "None", "org/per"]
    scores = re_scores(gold, pred)
    # correct: 2 (rows 0 and 5); predicted non-None: 4; gold non-None: 4.
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["support"] == 4
    assert scores["per_label"]["org/per"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4, "support": 2}
    )
    assert "None" not in scores["per_label"]


def test_re_scores_none_label_and_empty_predictions():
    assert re_scores(["a", "b"], ["NA", "NA"], none_label="NA")["f1"] == 0.0
    perfect = re_scores(["a", "NA", "b"], ["a", "NA", "b"], none_label="NA")
    assert (perfect["precision"], perfect["recall"], perfect["f1"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="gold has 1 labels but pred has 2"):
        re_scores(["a"], ["a", "b"])


def test_classification_scores_macro_f1_and_accuracy():
    labels = ("strengthen", "complement", "weaken")
    gold = ["strengthen", "strengthen", "complement", "weaken", "weaken", "weaken"]
    pred = ["strengthen", "complement", "complement", "weaken", "weaken", "strengthen"]
    scores = classification_scores(gold, pred, labels)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    f1_strengthen = 2 * 0.5 * 0.5 / 1.0
    f1_complement = 2 * 0.5 * 1.0 / 1.5
    f1_weaken = 2 * 1.0 * (2 / 3) / (1 + 2 / 3)
    assert scores["macro_f1"] == pytest.approx((f1_strengthen + f1_complement + f1_weaken) / 3)
    assert scores["per_label"]["weaken"]["support"] == 3
    assert classification_scores([0, 1], [0, 1], labels=[0, 1, 2])["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pred: values \\['neutral'\\]"):
        classification_scores(["weaken"], ["neutral"], labels)
