"""TMR's own mechanisms, measured in the tiny world: the pipeline's trained back-translator, trained
grounder and estimator meet the goals of issue 17 on the synthetic test split, and the untrained
parts they replace do not (so each check can fail).

One tiny pipeline (both tasks, every stage up to ``probe_mechanisms``) runs once for the module;
the probes read what the extractor would read. Goals: v' shows the type its text decides on
≥ 80 % of such texts; the mention's object is among the top-3 regions at IoU ≥ 0.5 for ≥ 80 % of
mentions (NER and RE together) with ≤ 5 % zero-area boxes; argmax α agrees with the alignment labels at macro F1 ≥ 0.6
on NER and on RE pairs. Each task has its own back-translator (RE's v' must show both argument
types), and on neutral texts a v' that shows a type shows the gold one no more often than chance.
"""

import json

import pytest

from jobs import run_pipeline


@pytest.fixture(scope="module")
def probed(tmp_path_factory, _ray_session):
    from tests.fixtures.ray_cluster import ensure_local_ray

    ensure_local_ray()
    workdir = tmp_path_factory.mktemp("mechanisms")
    argv = ["--config", "configs/pipeline.tiny.yaml", "--workdir", str(workdir), "--compare", "false",
            "--stop_after", "probe_mechanisms", "--tracking_uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    assert run_pipeline.main(argv) == 0
    read = lambda *parts: json.loads(workdir.joinpath(*parts, "metrics.json").read_text())  # noqa: E731
    return {"probes": read("probes"), "t2i": read("t2i", "ner"), "t2i_re": read("t2i", "re"), "grounder": read("grounder")}


def test_back_translations_show_the_type_their_text_decides(probed):
    assert probed["probes"]["bt_fidelity_deciding"] >= 0.8
    assert probed["probes"]["re_bt_fidelity_deciding"] >= 0.8  # both argument types
    # the untrained pipeline they replace reads at chance
    assert probed["t2i"]["base_test_bt_fidelity_deciding"] <= 0.5
    assert probed["t2i_re"]["base_re_test_bt_fidelity_deciding"] <= 0.5


@pytest.mark.parametrize("prefix", ["bt_fidelity_", "re_bt_fidelity_"])
def test_back_translations_of_neutral_texts_guess_at_chance(probed, prefix):
    scores = {k[len(prefix):]: v for k, v in probed["probes"].items() if k.startswith(prefix)}
    assert scores["undecided_read_n"] >= 20
    assert scores["undecided_read_gold_match_low"] <= scores["undecided_read_chance"] <= scores["undecided_read_gold_match_high"]


def test_the_grounder_finds_the_mentions_objects_in_its_top_three_boxes(probed):
    # every mention whose object its image shows, NER and RE together (per task: README)
    assert probed["probes"]["grounding_recall"] >= 0.8
    assert probed["probes"]["grounding_zero_area_share"] <= 0.05
    assert probed["grounder"]["untrained_test_recall"] < 0.1


def test_the_estimator_transfers_to_the_ner_and_re_pairs(probed):
    assert probed["probes"]["ner_alpha_macro_f1"] >= 0.6
    assert probed["probes"]["re_alpha_macro_f1"] >= 0.6
