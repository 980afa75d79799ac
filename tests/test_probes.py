"""tmr_core.probes for RE: a back-translation is faithful to a text that decides its relation when
it shows both argument types (the probe behind the RE column of the mechanisms table)."""

import numpy as np

from tmr_core.probes import relation_back_translation_fidelity, relation_probe_items
from tmr_core.synthetic import GLYPHS, TYPE_GLYPH


def _painted(*types):
    """A 64x64 image split into vertical bands, one per type, in that type's glyph colour."""
    image = np.full((64, 64, 3), 238, dtype=np.uint8)
    for index, etype in enumerate(types):
        band = slice(index * 64 // len(types), (index + 1) * 64 // len(types))
        image[:, band] = GLYPHS[TYPE_GLYPH[etype]][1]
    return image


def _row(row_id, context, relation="/per/loc/place_of_residence", alignment="strengthen"):
    return {"task": "re", "split": "test", "id": row_id, "head": "Jordan", "tail": "Paris", "relation": relation,
            "context": context, "alignment": alignment}


def test_relation_fidelity_needs_both_argument_types_of_the_decided_relation():
    relation = "/per/loc/place_of_residence"  # (PER, LOC); Jordan and Paris may each be PER or LOC
    truth = [_row("a-0", relation), _row("b-0", relation), _row("c-0", "neutral", alignment="complement"),
             _row("a-1", relation),                       # the reverse pair: same text and v', left out
             _row("d-0", "None", relation="None")]        # a None relation decides no types
    pairs = relation_probe_items(truth, "test")
    assert [head.id for head, _ in pairs] == ["a-0", "b-0", "c-0"]
    assert (pairs[0][0].decided_type, pairs[0][1].decided_type) == ("PER", "LOC")
    assert pairs[2][0].decided_type is None and (pairs[2][0].gold_type, pairs[2][1].gold_type) == ("PER", "LOC")

    images = {"a-0": _painted("PER", "LOC"), "b-0": _painted("PER"), "c-0": _painted("PER", "LOC")}
    scores = relation_back_translation_fidelity(pairs, images)
    assert scores["deciding"] == 0.5          # a-0 shows both types; b-0 only the head's
    assert scores["deciding_n"] == 2 and scores["undecided_n"] == 1 and scores["unread"] == 1 / 3
    # one set of two types among {PER, LOC}: a neutral text's v' matches its gold types by chance always
    assert scores["undecided_gold_match"] == 1.0 and scores["undecided_chance"] == 1.0

    loc_loc = [_row("e-0", "/loc/loc/contain", relation="/loc/loc/contain")]
    pairs = relation_probe_items(loc_loc, "test")
    assert relation_back_translation_fidelity(pairs, {"e-0": _painted("LOC")})["deciding"] == 1.0
    assert relation_back_translation_fidelity(pairs, {"e-0": _painted("PER", "LOC", "LOC")})["deciding"] == 1.0
    assert relation_back_translation_fidelity(pairs, {"e-0": _painted("PER")})["deciding"] == 0.0


def test_neutral_texts_are_judged_on_the_back_translations_that_show_a_type():
    """An unread v' guesses nothing: counted as 'not the gold type' it pulled the neutral NER share
    below chance (0.30 vs 0.45 on test), which read as hiding the answer. Among the v' the reader
    reads, the share is compared with those texts' chance through its interval."""
    from tmr_core.probes import ProbeItem, back_translation_fidelity

    items = [ProbeItem(f"n{i}", "PER", ("PER", "LOC"), None, "complement") for i in range(6)]
    blank = np.full((64, 64, 3), 238, dtype=np.uint8)
    images = {"n0": _painted("PER"), "n1": _painted("LOC"), "n2": _painted("PER"), "n3": _painted("LOC"),
              "n4": blank, "n5": blank}
    scores = back_translation_fidelity(items, images)
    assert scores["undecided_gold_match"] == 2 / 6 and scores["undecided_chance"] == 0.5
    assert scores["undecided_read_n"] == 4 and scores["undecided_read_gold_match"] == 0.5
    assert scores["undecided_read_chance"] == 0.5
    assert scores["undecided_read_gold_match_low"] < 0.5 < scores["undecided_read_gold_match_high"]
    # a v' that always shows the gold type leaks it: its interval stays above chance
    leaking = back_translation_fidelity([ProbeItem(f"l{i}", "PER", ("PER", "LOC"), None, "complement") for i in range(30)],
                                        {f"l{i}": _painted("PER") for i in range(30)})
    assert leaking["undecided_read_gold_match_low"] > leaking["undecided_read_chance"]
