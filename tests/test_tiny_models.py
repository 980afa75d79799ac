"""Tiny models: each reloads with from_pretrained to identical outputs; builds are deterministic, small and fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tmr_core import tiny_models as tm
from tmr_core.synthetic import Glyph, Scene, render_scene


def _image() -> Image.Image:
    import io

    scene = Scene([Glyph("red circle", 20, 20, 24), Glyph("blue square", 44, 44, 12)], noise_seed=1)
    return Image.open(io.BytesIO(render_scene(scene, 64))).convert("RGB")


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """A second build, in memory and saved, timed (the tiny_models fixture's cache is the first)."""
    out = tmp_path_factory.mktemp("tiny-models")
    start = time.perf_counter()
    models = tm.build_tiny_models(work_dir=out / "_clip-bpe")
    paths = tm.save_tiny_models(models, out)
    return models, paths, time.perf_counter() - start


def test_two_builds_write_the_same_bytes(tiny_models, fresh_build):
    _models, paths, seconds = fresh_build
    assert seconds < 60
    for key, folder in tiny_models.items():
        cached = sorted(p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file())
        fresh = sorted(p.relative_to(paths[key]) for p in Path(paths[key]).rglob("*") if p.is_file())
        assert cached == fresh and cached, key
        for rel in cached:
            assert (Path(folder) / rel).read_bytes() == (Path(paths[key]) / rel).read_bytes(), f"{key}/{rel}"


def test_sizes_and_names(tiny_models):
    assert set(tiny_models) == set(tm.TINY_MODEL_NAMES) == set(tm.PAPER_MODEL_NAMES)
    total = sum(tm.folder_size_bytes(p) for p in tiny_models.values())
    assert 1e6 < total < 50e6
    assert all(Path(p).name == tm.TINY_MODEL_NAMES[k] for k, p in tiny_models.items())


def test_text_encoder_reloads_to_identical_outputs(fresh_build):
    from transformers import AutoModel, AutoTokenizer

    (model, _tokenizer), paths = fresh_build[0].text_encoder, fresh_build[1]
    tokenizer = AutoTokenizer.from_pretrained(paths["text_encoder"])
    assert tokenizer.tokenize("Jordan joined Green Bay") == ["jordan", "joined", "green", "bay"]
    assert tokenizer.convert_tokens_to_ids(["[unused0]", "[unused3]"]) != [tokenizer.unk_token_id] * 2
    batch = tokenizer(["RT @citylife : Jordan is trending right now", "Flights to Oslo"], padding=True, return_tensors="pt")
    reloaded = AutoModel.from_pretrained(paths["text_encoder"]).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, reloaded(**batch).last_hidden_state)
    assert reloaded.config.hidden_size == 64


def test_image_encoder_gives_7x7_patches_and_reloads(fresh_build):
    from transformers import AutoImageProcessor, AutoModel

    (model, _processor), paths = fresh_build[0].image_encoder, fresh_build[1]
    processor = AutoImageProcessor.from_pretrained(paths["image_encoder"])
    pixels = processor(images=_image(), return_tensors="pt")["pixel_values"]
    reloaded = AutoModel.from_pretrained(paths["image_encoder"]).eval()
    with torch.no_grad():
        features = reloaded(pixels).last_hidden_state
        assert torch.equal(model(pixels).last_hidden_state, features)
    assert features.shape == (1, 64, 7, 7)


def test_text_to_image_pipeline_reloads_and_swaps_scheduler(fresh_build):
    from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe, paths = fresh_build[0].text_to_image, fresh_build[1]
    reloaded = StableDiffusionPipeline.from_pretrained(paths["text_to_image"])
    assert isinstance(reloaded.scheduler, EulerDiscreteScheduler) and reloaded.safety_checker is None
    assert isinstance(DiffusionPipeline.from_pretrained(paths["text_to_image"]), StableDiffusionPipeline)
    assert (Path(paths["text_to_image"]) / "tokenizer" / "merges.txt").is_file()

    def generate(p):
        p.set_progress_bar_config(disable=True)
        return p(
            "Jordan is trending", num_inference_steps=2, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images

    first, second = generate(pipe), generate(reloaded)
    assert first.shape == (1, 64, 64, 3) and (first == second).all()
    reloaded.scheduler = tm.scheduler_from_name("DDIMScheduler", reloaded.scheduler.config)
    assert isinstance(reloaded.scheduler, DDIMScheduler) and reloaded.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        tm.scheduler_from_name("StableDiffusionPipeline")


def test_detector_reloads_to_identical_boxes(fresh_build):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    (model, _processor), paths = fresh_build[0].detector, fresh_build[1]
    processor = AutoProcessor.from_pretrained(paths["detector"])
    inputs = processor(text=[["jordan", "a new office"]], images=_image(), return_tensors="pt")
    reloaded = AutoModelForZeroShotObjectDetection.from_pretrained(paths["detector"]).eval()
    with torch.no_grad():
        a, b = model(**inputs), reloaded(**inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    assert a.pred_boxes.shape == (1, 64, 4)
    results = processor.post_process_grounded_object_detection(b, threshold=0.0, target_sizes=[(64, 64)])
    assert results[0]["boxes"].shape[-1] == 4


def test_mde_backbone_reloads_to_identical_outputs(fresh_build):
    from transformers import ViltModel, ViltProcessor

    (model, _processor), paths = fresh_build[0].mde_backbone, fresh_build[1]
    processor = ViltProcessor.from_pretrained(paths["mde_backbone"])
    inputs = processor(images=_image(), text="a red circle and a blue square", return_tensors="pt")
    reloaded = ViltModel.from_pretrained(paths["mde_backbone"]).eval()
    with torch.no_grad():  # ViLT shuffles image patches with torch's RNG even in eval: seed both calls
        torch.manual_seed(0)
        a = model(**inputs).last_hidden_state
        torch.manual_seed(0)
        b = reloaded(**inputs).last_hidden_state
    assert torch.equal(a, b)
    assert inputs["pixel_values"].shape[-2:] == (64, 64)


def test_ensure_builds_only_when_the_spec_changes(tiny_models, monkeypatch):
    root = Path(tiny_models["text_encoder"]).parent
    calls = []
    monkeypatch.setattr(tm, "build_tiny_models", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("rebuilt")))
    start = time.perf_counter()
    assert tm.ensure_tiny_models(root) == tiny_models
    assert calls == [] and time.perf_counter() - start < 5
    with pytest.raises(RuntimeError, match="rebuilt"):
        tm.ensure_tiny_models(root, tm.TinyModelSpec(seed=1))
    assert (root / tm.STAMP_NAME).is_file(), "a failed rebuild leaves the old models and stamp in place"
    assert tm.ensure_tiny_models(root) == tiny_models and len(calls) == 1


def test_bpe_merges_break_ties_by_text():
    words = {("a", "b", "c"): 2, ("b", "c", "a"): 2, ("c", "a", "b"): 2}
    assert tm.learn_bpe_merges(words, 1, join=lambda a, b: a + b) == [("a", "b")]
    assert tm.learn_bpe_merges(words, 5, join=lambda a, b: a + b, min_frequency=5) == []
    merged = tm.learn_bpe_merges({("##a", "##b"): 3}, 5, join=lambda a, b: a + b.removeprefix("##"))
    assert merged == [("##a", "##b")]


def test_spec_rejects_sizes_that_break_the_7x7_grid():
    with pytest.raises(ValueError, match="multiple of 16"):
        tm.TinyModelSpec(resnet_input_size=200)
