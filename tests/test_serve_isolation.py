"""One request, one failure: every batched step (``*_many``) answers each good item of a batch
even when one item fails, and hands the failing item its own exception. In process, on the tiny
models (the deployed app's batches are tested in test_serve_app.py)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from benchmarks.bench_serve import make_untrained_checkpoints, png_bytes

TOKENS = "Kevin Durant joins the Golden State Warriors".split()


def thin_png() -> bytes:
    """Valid and decodable, but ViLT's resize leaves it a zero-pixel side: the MDE fails on it."""
    buffer = io.BytesIO()
    Image.new("RGB", (500, 2), (5, 5, 5)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, str]:
    return make_untrained_checkpoints(tmp_path_factory.mktemp("isolation-models"), tiny_models)


@pytest.fixture
def corrupt_png(tmp_path) -> str:
    path = tmp_path / "truncated.png"
    path.write_bytes(png_bytes()[:60])
    return str(path)


def test_answer_each_retries_a_failed_batch_item_by_item():
    from tmr_core.inference import answer_each

    calls = []

    def double(items):
        calls.append(len(items))
        if "bad" in items:
            raise ValueError("cannot double 'bad'")
        return [2 * item for item in items]

    results = answer_each(double, [1, "bad", 3])
    assert results[0] == 2 and results[2] == 6 and isinstance(results[1], ValueError)
    assert calls == [3, 1, 1, 1]
    assert answer_each(double, [1, 2]) == [2, 4] and calls[-1] == 2  # a good batch runs once
    (alone,) = answer_each(double, ["bad"])
    assert isinstance(alone, ValueError)


def test_divergence_batch_answers_good_items_beside_a_thin_image(checkpoints):
    from serve.deployments import DivergenceEstimator
    from serve.ingress import call

    mde = DivergenceEstimator.func_or_class(checkpoints["mde"], max_length=32)
    good = [(TOKENS, png_bytes(colour=(200, 0, 0))), (TOKENS[:3], png_bytes(colour=(0, 0, 200)))]
    results = mde.score_many([good[0], (TOKENS, thin_png()), good[1]])
    assert isinstance(results[1], Exception)
    for result, item in zip((results[0], results[2]), good, strict=True):
        assert result == pytest.approx(mde.score_many([item])[0], abs=1e-5)
    with pytest.raises(Exception) as info:  # in process, the failing item's caller gets its error
        asyncio.run(call(mde, "score", TOKENS, thin_png()))
    assert not isinstance(info.value, AssertionError)


def test_grounder_and_extractor_batches_answer_good_items_beside_a_corrupt_image(tiny_models, checkpoints,
                                                                                corrupt_png):
    from serve.deployments import Extractor, Grounder

    grounder = Grounder.func_or_class(tiny_models["detector"])
    regions = grounder.ground_many([(png_bytes(), ["Kevin Durant"]), (corrupt_png, ["Kevin Durant"]),
                                    (png_bytes(colour=(0, 90, 0)), ["the Warriors"])])
    assert isinstance(regions[1], Exception)
    assert all(isinstance(r, list) and r for r in (regions[0], regions[2]))

    ner = Extractor.func_or_class(checkpoints["ner"], "ner")

    def row(bt_uri):
        return {"tokens": TOKENS, "phrases": [], "image": png_bytes(), "regions": [], "back_translation_uri": bt_uri,
                "back_translation_regions": [], "divergence": [0.5, 0.3, 0.2]}

    predictions = ner.predict_many([row(None), row(corrupt_png), row(None)])
    assert isinstance(predictions[1], Exception)
    assert predictions[0] == predictions[2] and "entities" in predictions[0]


def test_back_translator_batch_answers_good_items_when_one_fails(tiny_models, tmp_path):
    from serve.deployments import BackTranslator

    generation = {"model": tiny_models["text_to_image"], "scheduler": "EulerDiscreteScheduler", "steps": 2,
                  "guidance_scale": 1.0, "height": 32, "width": 32}
    translator = BackTranslator.func_or_class(generation, str(tmp_path / "cache"))
    core = translator.core.__call__

    def fails_on_boom(prompts, seeds):  # e.g. a cache write that fails for one image's key
        if any("BOOM" in p for p in prompts):
            raise OSError("disk full (simulated)")
        return core(prompts, seeds)

    translator.core = fails_on_boom
    results = translator.generate_many([("a red car", 0), ("BOOM", 0), ("a blue sky", 0)])
    assert isinstance(results[1], OSError)
    assert results[0]["uri"] and results[2]["uri"] and results[0]["error"] is None


def test_extractor_serves_imageless_rows_with_the_training_alpha_and_refuses_unservable_alpha(checkpoints, tmp_path):
    import dataclasses

    from serve.deployments import Extractor
    from tmr_core.extractor import TMRExtractor

    ner = Extractor.func_or_class(checkpoints["ner"], "ner")
    # no image, so no MDE score: the collator's α = (0, 0, 1), as such rows had in training
    batch = ner.step.collator([ner._row({"tokens": TOKENS, "phrases": [], "image": None, "regions": [],
                                   "back_translation_uri": None, "back_translation_regions": [], "divergence": None})])
    assert batch["divergence"].tolist() == [[0.0, 0.0, 1.0]]

    model = TMRExtractor.from_pretrained(checkpoints["ner"])
    model.config = dataclasses.replace(model.config, back_translation_alpha="back_translation")
    model.save_pretrained(str(tmp_path / "bt-alpha"))
    with pytest.raises(ValueError, match="back_translation_alpha='back_translation'"):
        Extractor.func_or_class(str(tmp_path / "bt-alpha"), "ner")
