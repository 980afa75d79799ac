"""One request, one failure: the model deployment's batch (``TMRModel.predict_many``) and the
back-translator's (``generate_many``) answer each good item even when one item fails, and hand the
failing item its own exception. In process, on the tiny models (the deployed app's batches are
tested in test_serve_app.py)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from benchmarks.bench_serve import make_untrained_checkpoints, png_bytes, tiny_app_args

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


@pytest.fixture(scope="module")
def model(tiny_models, checkpoints, tmp_path_factory):
    """The NER model deployment's class built in process, as the benchmarks build it."""
    from serve.deployments import TMRModel

    args = tiny_app_args(checkpoints, tiny_models, tmp_path_factory.mktemp("isolation-cache"), auth_token_env=None)
    return TMRModel.func_or_class("ner", args, None, batched=False)


def ready_row(model, tokens, image, back_translation_uri=None) -> dict:
    """A request as the batch sees it: the model's row with v' decided (``predict`` does that)."""
    row = model._row({"tokens": tokens, "image": image})
    return {**row, "back_translation_uri": back_translation_uri, "back_translation_error": None,
            "back_translation_cached": back_translation_uri is not None}


def test_a_model_batch_answers_its_good_rows_beside_rows_that_fail_inside_it(model, corrupt_png):
    """A thin image (the MDE cannot resize it) and a corrupt v' (the detector cannot read it) in
    one batch with three good rows: the bad rows get their own errors, the good rows the answers
    they get alone."""
    good = [ready_row(model, TOKENS, png_bytes(colour=(200, 0, 0))),
            ready_row(model, TOKENS[:3], png_bytes(colour=(0, 0, 200))),
            ready_row(model, TOKENS, None)]
    batch = [good[0], ready_row(model, TOKENS, thin_png()), good[1],
             ready_row(model, TOKENS, png_bytes(), back_translation_uri=corrupt_png), good[2]]
    answers = model.predict_many(batch)
    assert isinstance(answers[1], ValueError) and "divergence" in str(answers[1])
    assert isinstance(answers[3], ValueError) and "back-translation" in str(answers[3])
    for answer, row in zip((answers[0], answers[2], answers[4]), good, strict=True):
        (alone,) = model.predict_many([row])
        assert [(e["type"], e["start"], e["end"]) for e in answer["entities"]] == \
               [(e["type"], e["start"], e["end"]) for e in alone["entities"]]
        assert answer["phrases"] == alone["phrases"]
        if alone["divergence"] is None:
            assert answer["divergence"] is None
        else:
            assert answer["divergence"] == pytest.approx(alone["divergence"], abs=1e-5)
    assert set(answers[0]["timing"]) == {"phrases", "grounding", "divergence", "extract"}


def test_a_request_that_fails_inside_the_model_raises_to_its_own_caller(model):
    from serve.deployments import call

    with pytest.raises(ValueError, match="divergence"):  # in process as through a handle
        asyncio.run(call(model, "predict", {"tokens": TOKENS, "image": thin_png(), "mode": "fast"}))
    answer = asyncio.run(call(model, "predict", {"tokens": TOKENS, "image": png_bytes(), "mode": "fast"}))
    assert answer["back_translation"] == {"uri": None, "error": None, "cached": False}  # an empty cache
    assert list(answer["timing"]) == ["back_translation", "phrases", "grounding", "divergence", "extract"]


def test_a_step_that_raises_is_retried_row_by_row_so_only_its_culprit_fails():
    from serve.deployments import _run_step

    def shout(rows):
        if any(row["text"] == "bad" for row in rows):
            raise RuntimeError("cannot shout 'bad'")
        return [{**row, "text": row["text"].upper()} for row in rows]

    rows = [{"text": "a"}, {"text": "bad"}, {"text": "c"}, {"text": "d"}]
    failed = {3: ValueError("failed at an earlier step")}
    _run_step(shout, rows, failed)
    assert [row["text"] for row in rows] == ["A", "bad", "C", "d"]  # a failed row skips later steps
    assert isinstance(failed[1], RuntimeError) and isinstance(failed[3], ValueError) and set(failed) == {1, 3}


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


def test_extractor_serves_imageless_rows_with_the_training_alpha_and_refuses_unservable_alpha(model, checkpoints,
                                                                                              tmp_path):
    import dataclasses

    from serve.deployments import load_extraction_step
    from tmr_core.extractor import TMRExtractor

    # no image, so no MDE score: the collator's α = (0, 0, 1), as such rows had in training
    row = {**ready_row(model, TOKENS, None), "phrases": [], "regions": [], "back_translation_regions": [],
           "divergence": None}
    assert model.extraction.collator([row])["divergence"].tolist() == [[0.0, 0.0, 1.0]]

    extractor = TMRExtractor.from_pretrained(checkpoints["ner"])
    extractor.config = dataclasses.replace(extractor.config, back_translation_alpha="back_translation")
    extractor.save_pretrained(str(tmp_path / "bt-alpha"))
    with pytest.raises(ValueError, match="back_translation_alpha='back_translation'"):
        load_extraction_step(str(tmp_path / "bt-alpha"), "ner")
    with pytest.raises(ValueError, match="a 'ner' model was given where 're' is served"):
        load_extraction_step(checkpoints["ner"], "re")
