"""Tiny models: each reloads with from_pretrained to identical outputs; builds are deterministic, small and fast."""

from __future__ import annotations

import json
import shutil
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


# --------------------------------------------------------------------------- paper size


@pytest.fixture(scope="module")
def paper_tokenizers(tmp_path_factory):
    return tm.paper_tokenizer_files(tm.PaperModelSpec(), tmp_path_factory.mktemp("paper-bpe"))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_architectures_have_the_published_parameter_counts(paper_tokenizers):
    """Built on the meta device (no memory, no weights): the counts of the released checkpoints."""
    from transformers import CLIPTextModel

    spec, (wordpiece, vocab_path, merges_path) = tm.PaperModelSpec(), paper_tokenizers
    clip = tm._clip_tokenizer(vocab_path, merges_path, max_length=77)
    with torch.device("meta"):
        assert _params(tm.build_paper_text_encoder(spec, wordpiece)[0]) == 109_482_240  # bert-base-uncased
        assert _params(tm.build_paper_image_encoder(spec)[0]) == 23_508_032  # ResNet-50 without its classifier
        assert _params(tm.sd15_unet(16)) == 859_520_964  # SD v1.5 UNet
        assert _params(tm.sd_vae(128)) == 83_653_863  # SD's AutoencoderKL
        assert _params(CLIPTextModel(tm.clip_vit_l14_text_config(clip))) == 123_060_480  # CLIP ViT-L/14 text
        vilt, detector = tm.build_paper_mde_backbone(spec, wordpiece)[0], tm.build_paper_detector(spec, vocab_path, merges_path)[0]
    assert vilt.config.hidden_size == 768 and vilt.config.num_hidden_layers == 12 and vilt.config.patch_size == 32
    assert 100e6 < _params(vilt) < 120e6
    vision = detector.config.vision_config
    assert (vision.hidden_size, vision.patch_size, vision.image_size) == (768, 32, 768) and 150e6 < _params(detector) < 160e6


def test_paper_tokenizers_split_as_the_tiny_ones_into_the_paper_vocab_sizes(paper_tokenizers, tiny_models):
    from transformers import AutoTokenizer, BertTokenizerFast, CLIPTokenizer

    wordpiece, vocab_path, merges_path = paper_tokenizers
    text = "RT @citylife : Jordan is trending in Green Bay #1"
    tiny_bert = AutoTokenizer.from_pretrained(tiny_models["text_encoder"])
    paper_bert = BertTokenizerFast(vocab=wordpiece, do_lower_case=True)
    assert len(paper_bert) == 30522 and paper_bert(text)["input_ids"] == tiny_bert(text)["input_ids"]
    assert paper_bert.convert_tokens_to_ids("[unused500]") != paper_bert.unk_token_id

    tiny_clip = CLIPTokenizer.from_pretrained(str(Path(tiny_models["text_to_image"]) / "tokenizer"))
    paper_clip = tm._clip_tokenizer(vocab_path, merges_path, max_length=77)
    assert len(paper_clip) == 49408 and (paper_clip.bos_token_id, paper_clip.eos_token_id) == (49406, 49407)
    assert paper_clip.tokenize(text) == tiny_clip.tokenize(text)
    with pytest.raises(ValueError, match="smaller than the vocab"):
        tm.pad_wordpiece_vocab(wordpiece, 10)


def test_ensure_models_keeps_each_size_in_its_own_stamped_folder(tmp_path, tiny_models, monkeypatch):
    root = Path(tiny_models["text_encoder"]).parent
    assert tm.ensure_models("tiny", root) == tiny_models
    with pytest.raises(ValueError, match="size: expected one of"):
        tm.ensure_models("huge", tmp_path)

    # the paper build's staging and stamp, with the weights written by a stand-in (the real one writes 5.9 GB)
    built = []

    def stand_in(spec, out_dir, work_dir):
        built.append(spec)
        for key, folder in tm.tiny_model_paths(out_dir).items():
            shutil.copytree(tiny_models[key], folder)
        return tm.tiny_model_paths(out_dir)

    monkeypatch.setattr(tm, "save_paper_models", stand_in)
    paths = tm.ensure_models("paper", tmp_path / "paper")
    assert set(paths) == set(tm.TINY_MODEL_NAMES) and all(Path(p).parent == tmp_path / "paper" for p in paths.values())
    stamp = json.loads((tmp_path / "paper" / tm.STAMP_NAME).read_text())
    assert stamp["size"] == "paper" and stamp["spec"]["wordpiece_vocab_size"] == 30522
    assert stamp["hash"] != tm.spec_hash(tm.TinyModelSpec()) and built == [tm.PaperModelSpec()]
    assert tm.ensure_models("paper", tmp_path / "paper") == paths and len(built) == 1  # up to date: no rebuild
    assert tm.DEFAULT_CACHE_DIRS["paper"].startswith(".cache/")  # git-ignored


def test_make_tiny_models_sends_each_size_to_its_own_default_folder():
    from jobs import make_tiny_models
    from jobs._config import ConfigError, parse_config

    assert parse_config(make_tiny_models.Config, ["--size", "paper"]).out == ".cache/tmr-models-paper"
    assert parse_config(make_tiny_models.Config, []).out == ".cache/tmr-models"
    with pytest.raises(ConfigError, match="out: .cache/tmr-models is the tiny models' cache"):
        parse_config(make_tiny_models.Config, ["--size", "paper", "--out", ".cache/tmr-models"])
    with pytest.raises(ConfigError, match="field .size. expects one of tiny\|paper"):
        parse_config(make_tiny_models.Config, ["--size", "huge"])
