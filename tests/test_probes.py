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
