"""The back-translator's training job, its pipeline identity in the cache key, and the v' fidelity probe.

The job runs end to end in Ray Train local mode on the tiny pipeline and a few benchmark pairs:
it writes a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads, metrics
with the fidelity probe, one checkpoint per epoch that a resubmission continues, and a registered
``tmr-t2i@champion`` whose content hash equals the folder's (the back-translation cache key).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# 16 agreeing pairs, 8 valid pairs, 8 probe texts per split, 2 VAE steps: seconds, not the demo's minute
FAST = ["--data.max_train_rows", "16", "--debug.max_eval_rows", "8", "--optim.batch_size", "8",
        "--optim.vae_steps", "2", "--probe.max_rows", "8", "--probe.steps", "2"]


def job_args(tiny_models, pairs: Path, benchmark: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", "configs/finetune_text_to_image.tiny.yaml",
            "--model.base", tiny_models["text_to_image"], "--data.datasets", f"[{pairs}]",
            "--data.ground_truth", str(benchmark / "ground_truth.jsonl"), "--output", str(tmp_path / "out"),
            "--ray.storage_path", str(tmp_path / "ray"), "--ray.name", "t2i-run",
            "--tracking.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *FAST, *extra]


def test_job_trains_exports_a_loadable_pipeline_registers_and_resumes(ray_local, tiny_models, tiny_benchmark, ner_pairs,
                                                                     tmp_path, repo_root, monkeypatch):
    from diffusers import DiffusionPipeline
    from mlflow import MlflowClient

    from jobs import finetune_text_to_image
    from tmr_core.back_translation import pipeline_identity

    monkeypatch.chdir(repo_root)
    args = job_args(tiny_models, ner_pairs, tiny_benchmark, tmp_path)
    assert finetune_text_to_image.main([*args, "--optim.epochs", "1"]) == 0

    folder = tmp_path / "ray" / "t2i-run"
    first = folder / "checkpoint_epoch_0001"
    assert sorted(p.name for p in folder.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001"]
    state = json.loads((first / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (1, 2, 1)  # 16 pairs / 8 per step
    saved = json.loads((first / "model" / "config.json").read_text())
    assert saved["latent_scale"] != pytest.approx(0.18215)  # calibrated after the VAE phase

    model_dir = tmp_path / "out" / "model"
    pipeline = DiffusionPipeline.from_pretrained(model_dir)  # a plain diffusers folder
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.vae.config.scaling_factor == pytest.approx(saved["latent_scale"])
    base = DiffusionPipeline.from_pretrained(tiny_models["text_to_image"])
    assert not torch.equal(pipeline.unet.conv_in.weight, base.unet.conv_in.weight)  # it trained

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for prefix in ("", "base_"):
        for split in ("valid", "test"):
            assert 0.0 <= metrics[f"{prefix}{split}_bt_fidelity_deciding"] <= 1.0
            assert metrics[f"{prefix}{split}_bt_fidelity_deciding_n"] + metrics[f"{prefix}{split}_bt_fidelity_undecided_n"] == 8
    assert metrics["best_epoch"] == 1 and metrics["train_pairs"] == 16

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias("tmr-t2i", "champion")
    assert version.tags["tmr.content_hash"] == pipeline_identity(str(model_dir))

    # resubmitted with more epochs: epochs 2 and 3 only, continuing the step count
    assert finetune_text_to_image.main([*args, "--optim.epochs", "3"]) == 0
    state = json.loads((folder / "checkpoint_epoch_0003" / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (3, 6, 2)
    # the tiny config's ray.checkpoints_to_keep 1, applied in local mode too: of three epochs, the
    # best and the latest stay (one folder less at least), and the saved state lists them
    kept = sorted(p.name for p in folder.glob("checkpoint_epoch_*"))
    assert kept == sorted({state["best_checkpoint"], "checkpoint_epoch_0003"}) == sorted(state["scores"])
    # the VAE trained once, in the first run: the resumed run kept its weights and scale
    resumed = json.loads((folder / "checkpoint_epoch_0003" / "model" / "config.json").read_text())
    assert resumed["latent_scale"] == pytest.approx(saved["latent_scale"])


def test_lora_trains_only_adapters_saves_them_alone_and_fuses_into_the_export(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    from tmr_core.text_to_image_training import TextToImageModel, TextToImageTrainingConfig

    torch.manual_seed(0)
    config = TextToImageTrainingConfig(base=tiny_models["text_to_image"], resolution=32, train_unet=False, lora_rank=4)
    model = TextToImageModel(config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and name.startswith("unet.") for name in trainable)
    assert set(model.state_dict()) == set(trainable) | {"latent_scale"}  # a checkpoint holds the adapters only

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, ids = torch.rand(2, 3, 32, 32) * 2 - 1, model.tokenize(["Just landed in Jordan !", "Happy birthday to Paris !"])
    for _ in range(2):
        optimizer.zero_grad()
        model(pixels, ids).loss.backward()
        optimizer.step()

    model.save_pretrained(str(tmp_path / "ckpt"))
    reloaded = TextToImageModel.from_pretrained(str(tmp_path / "ckpt"))
    latents = torch.randn(1, 4, 8, 8)
    hidden = model.text_encoder(ids[:1])[0]
    with torch.no_grad():
        expected = model.unet(latents, 500, hidden).sample
        assert torch.allclose(reloaded.unet(latents, 500, hidden).sample, expected, atol=1e-5)
        model.to_pipeline().save_pretrained(tmp_path / "export")
        exported = DiffusionPipeline.from_pretrained(tmp_path / "export")
        assert not any("lora" in name for name, _ in exported.unet.named_parameters())  # fused, plain UNet
        assert torch.allclose(exported.unet(latents, 500, hidden).sample, expected, atol=1e-4)
        base = DiffusionPipeline.from_pretrained(tiny_models["text_to_image"])
        assert not torch.allclose(base.unet(latents, 500, hidden).sample, expected, atol=1e-4)


def test_cache_key_follows_the_pipeline_weights_not_its_path(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    from tmr_core.back_translation import GenerationSettings, cache_key, pipeline_identity, with_identity

    folder, copy = tmp_path / "t2i", tmp_path / "elsewhere"
    shutil.copytree(tiny_models["text_to_image"], folder)
    shutil.copytree(tiny_models["text_to_image"], copy)
    settings = with_identity(GenerationSettings(model=str(folder), steps=2, height=32, width=32))
    before = cache_key(settings, 0, "Just landed in Jordan !")
    assert before == cache_key(with_identity(GenerationSettings(model=str(copy), steps=2, height=32, width=32)),
                               0, "Just landed in Jordan !")  # same weights by another path: same images

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(0.01)
    unet.save_pretrained(folder / "unet")  # retrained in place
    after = cache_key(with_identity(GenerationSettings(model=str(folder), steps=2, height=32, width=32)),
                      0, "Just landed in Jordan !")
    assert after != before
    assert pipeline_identity("stabilityai/stable-diffusion-2", "abc") == "hub:stabilityai/stable-diffusion-2@abc"


@pytest.mark.parametrize("etype", ["PER", "LOC", "ORG", "MISC"])
def test_glyph_reader_reads_the_type_of_a_rendered_glyph_among_distractors(etype):
    import io

    from PIL import Image

    from tmr_core.probes import GlyphReader
    from tmr_core.synthetic import TYPE_GLYPH, Glyph, Scene, render_scene

    others = [t for t in TYPE_GLYPH if t != etype]
    # the type's glyph is small (12 px of 64) next to a larger other-type glyph and a purple cross
    scene = Scene([Glyph(TYPE_GLYPH[etype], 14, 14, 12), Glyph(TYPE_GLYPH[others[0]], 44, 44, 18),
                   Glyph("purple cross", 46, 14, 16)], noise_seed=3)
    image = Image.open(io.BytesIO(render_scene(scene, 64)))
    reader = GlyphReader()
    assert reader.read(image, candidates=[etype, others[1]]) == etype  # the name allows etype, not the big one
    assert reader.read(image) == others[0]  # unrestricted: the largest type colour
    assert reader.read(image.resize((32, 32), Image.Resampling.BILINEAR), candidates=[etype, others[1]]) == etype
    blank = Image.open(io.BytesIO(render_scene(Scene([Glyph("orange bar", 30, 30, 16)], noise_seed=1), 64)))
    assert reader.read(blank) is None  # no type colour: nothing read


def test_fidelity_is_one_for_the_real_images_of_strengthen_texts_and_zero_for_weaken_donors(tiny_benchmark, ner_pairs):
    import pyarrow.parquet as pq
    from PIL import Image

    from tmr_core.probes import back_translation_fidelity, probe_items
    from tmr_core.synthetic import read_ground_truth

    items = probe_items(read_ground_truth(tiny_benchmark / "ground_truth.jsonl"), "valid")
    images = {row["id"]: Image.open(row["image_uri"]) for row in pq.read_table(ner_pairs / "valid.parquet").to_pylist()}
    by_alignment = {a: [i for i in items if i.alignment == a] for a in ("strengthen", "weaken", "complement")}
    # a back-translator that drew the real image: faithful where the image agrees with the text ...
    assert back_translation_fidelity(by_alignment["strengthen"], images)["deciding"] == 1.0
    assert back_translation_fidelity(by_alignment["complement"], images)["undecided_gold_match"] == 1.0
    # ... and never where the image is a donor's that shows another type
    assert back_translation_fidelity(by_alignment["weaken"], images)["deciding"] == 0.0


def test_focus_object_crop_fills_the_training_image_with_the_focus_glyph(tiny_benchmark, ner_pairs, tiny_models):
    """data.crop_to focus_object: each kept pair's image is cut to a square around the object its text
    is about (ground-truth box), so the type colour the text decides covers most of the training image."""
    import pyarrow.parquet as pq
    from PIL import Image

    from tmr_core.probes import GlyphReader
    from tmr_core.synthetic import read_ground_truth
    from tmr_core.text_to_image_training import (
        TextImageCollator,
        agreeing_rows,
        crop_rows,
        focus_box,
        prompt_and_image_rows,
        square_crop,
    )

    truth = {row["id"]: row for row in read_ground_truth(tiny_benchmark / "ground_truth.jsonl")}
    rows = prompt_and_image_rows(pq.read_table(ner_pairs / "train.parquet").to_pylist())
    kept, _ = agreeing_rows(rows, truth, ["strengthen", "complement"])
    cropped, dropped = crop_rows(kept, truth, "focus_object")
    assert dropped == 0 and len(cropped) == len(kept)  # agreeing NER images show their focus object
    assert crop_rows(kept, truth, None)[0] == kept
    donors = [row for row in rows if truth[row["id"]]["alignment"] == "weaken"]
    assert donors and crop_rows(donors, truth, "focus_object")[0] == []  # a donor's image has no focus box

    assert square_crop([50, 50, 62, 60], 64, 64, 0.25) == (46, 46, 64, 64)  # shifted inside, not shrunk
    for left, top, right, bottom in [square_crop(row["crop"], 64, 64, 0.25) for row in cropped]:
        assert right - left == bottom - top and 0 <= left < right <= 64 and 0 <= top < bottom <= 64

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(f"{tiny_models['text_to_image']}/tokenizer")
    collate = TextImageCollator(tokenizer, 32, crop_margin=0.25)
    reader = GlyphReader()
    gains = []
    for row in cropped[:24]:
        etype = next(m["type"] for m in truth[row["id"]]["mentions"] if m.get("context") != "fixed")
        box = focus_box(truth[row["id"]])
        x0, y0, x1, y1 = square_crop(box, 64, 64, 0.25)
        assert x0 <= box[0] and y0 <= box[1] and box[2] <= x1 and box[3] <= y1  # the crop holds the whole object
        pixels = ((collate.image_tensor(row["image_uri"], row["crop"]) + 1) * 127.5).round().clamp(0, 255)
        crop = pixels.byte().permute(1, 2, 0).numpy()
        assert reader.read(crop) == etype  # unrestricted: the focus type dominates the crop
        full = reader.type_fractions(Image.open(row["image_uri"]))[etype]
        gains.append(reader.type_fractions(crop)[etype] / full)
    assert min(gains) > 3.0  # the glyph's share of the pixels grows several-fold


def test_re_pairs_train_the_back_translator_only_when_their_relation_decides_both_types():
    """An RE text whose relation is None (and every reverse pair) decides no argument type: its
    image's glyphs are random types, so it is left out of the back-translator's pairs."""
    from tmr_core.text_to_image_training import agreeing_rows, crop_rows

    truth = {
        "a-0": {"task": "re", "alignment": "strengthen", "relation": "/per/loc/place_of_residence",
                "head_box": [4, 10, 14, 20], "tail_box": [40, 30, 52, 42]},
        "a-1": {"task": "re", "alignment": "strengthen", "relation": "None",
                "head_box": [40, 30, 52, 42], "tail_box": [4, 10, 14, 20]},
        "b-0": {"task": "re", "alignment": "strengthen", "relation": "None",
                "head_box": [4, 4, 12, 12], "tail_box": [40, 40, 50, 50]},
        "c-0": {"task": "re", "alignment": "complement", "relation": "/org/loc/locate_at",
                "head_box": [4, 4, 12, 12], "tail_box": [40, 40, 50, 50]},
    }
    rows = [{"id": key, "prompt": "p", "image_uri": f"{key[0]}.png"} for key in truth]
    kept, counts = agreeing_rows(rows, truth, ["strengthen"])
    assert [row["id"] for row in kept] == ["a-0"]
    assert counts == {"re_untyped": 2, "strengthen": 1, "complement": 1}
    assert crop_rows(kept, truth, "focus_object")[0][0]["crop"] == [4, 10, 52, 42]  # head and tail together


def test_object_panels_put_the_head_left_and_the_tail_right_each_larger_than_in_their_joint_window(tiny_benchmark, tmp_path):
    """data.crop_to object_panels: an RE pair trains on its head's window and its tail's side by side
    (a fixed layout the tiny model can learn: the union's window painted a prompt-independent blob)."""
    import pyarrow.parquet as pq

    from jobs import prepare_dataset
    from tmr_core.probes import GlyphReader
    from tmr_core.synthetic import RELATIONS, read_ground_truth
    from tmr_core.text_to_image_training import (
        TextImageCollator,
        agreeing_rows,
        crop_rows,
        prompt_and_image_rows,
    )

    assert prepare_dataset.main(["--format", "synthetic", "--task", "re", "--data_dir", str(tiny_benchmark),
                                 "--output", str(tmp_path / "re")]) == 0
    truth = {row["id"]: row for row in read_ground_truth(tiny_benchmark / "ground_truth.jsonl")}
    rows = prompt_and_image_rows(pq.read_table(tmp_path / "re" / "train.parquet").to_pylist())
    kept, _ = agreeing_rows(rows, truth, ["strengthen"])
    panelled, dropped = crop_rows(kept, truth, "object_panels")
    assert kept and dropped == 0
    assert all(row["crop"] == [truth[row["id"]]["head_box"], truth[row["id"]]["tail_box"]] for row in panelled)

    collate = TextImageCollator(_Tokenizer(), 32, crop_margin=0.25)
    reader = GlyphReader()

    def pixels(row):
        return ((collate.image_tensor(row["image_uri"], row["crop"]) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()

    union, _ = crop_rows(kept, truth, "focus_object")  # one window around head and tail together
    for row, together in zip(panelled, union, strict=True):
        head_type, tail_type = RELATIONS[truth[row["id"]]["relation"]]
        image = pixels(row)
        assert reader.read(image[:, :16]) == head_type and reader.read(image[:, 16:]) == tail_type
        shares, union_shares = reader.type_fractions(image), reader.type_fractions(pixels(together))
        assert min(shares[t] / union_shares[t] for t in (head_type, tail_type)) > 1.2  # each object larger
    # one box (NER's focus object) is one panel, the whole image: the focus_object crop
    box = [8.0, 8.0, 20.0, 20.0]
    assert torch.equal(collate.image_tensor(panelled[0]["image_uri"], [box]), collate.image_tensor(panelled[0]["image_uri"], box))


def test_the_jobs_probe_reads_ner_and_re_texts_from_the_same_datasets(tiny_benchmark, ner_pairs, tiny_models, tmp_path,
                                                                     monkeypatch):
    """probe_fidelity samples v' for both tasks' probe texts and scores RE with the relation reader
    (re_<split>_bt_fidelity_*): here the "back-translator" returns each text's own image."""
    from PIL import Image

    from jobs import finetune_text_to_image, prepare_dataset
    from jobs._config import parse_config
    from tmr_core import back_translation
    from tmr_core.back_translation import prompt_from_tokens
    from tmr_core.probes import (
        back_translation_fidelity,
        probe_items,
        relation_back_translation_fidelity,
        relation_probe_items,
    )
    from tmr_core.synthetic import read_ground_truth

    re_pairs = tmp_path / "re"
    assert prepare_dataset.main(["--format", "synthetic", "--task", "re", "--data_dir", str(tiny_benchmark),
                                 "--output", str(re_pairs)]) == 0
    cfg = parse_config(finetune_text_to_image.Config, [
        *job_args(tiny_models, f"{ner_pairs}, {re_pairs}", tiny_benchmark, tmp_path), "--probe.splits", "[valid]"],
        prog="t")
    truth = {row["id"]: row for row in read_ground_truth(tiny_benchmark / "ground_truth.jsonl")}
    cap = cfg.probe.max_rows  # per split and task
    items, pairs = probe_items(truth.values(), "valid")[:cap], relation_probe_items(truth.values(), "valid")[:cap]
    probed = {item.id for item in items} | {head.id for head, _ in pairs}
    rows = [row for folder in (ner_pairs, re_pairs) for row in pq_rows(folder / "valid.parquet") if row["id"] in probed]
    image_of = {prompt_from_tokens(row["tokens"]): row["image_uri"] for row in rows}
    assert len(image_of) == len(rows)  # every probed text is its own prompt

    class OwnImage:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, seeds):
            return [Image.open(image_of[prompt]).convert("RGB") for prompt in prompts]

    monkeypatch.setattr(back_translation, "BackTranslator", OwnImage)
    metrics = finetune_text_to_image.probe_fidelity(cfg, None, truth, "")
    images = {row["id"]: Image.open(row["image_uri"]).convert("RGB") for row in rows}
    expected_ner, expected_re = back_translation_fidelity(items, images), relation_back_translation_fidelity(pairs, images)
    assert metrics["valid_bt_fidelity_deciding"] == pytest.approx(expected_ner["deciding"])
    assert metrics["re_valid_bt_fidelity_deciding"] == pytest.approx(expected_re["deciding"])
    assert metrics["re_valid_bt_fidelity_deciding_n"] == expected_re["deciding_n"] > 0


def pq_rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class _Tokenizer:
    model_max_length = 8


def test_crop_needs_the_ground_truth(tiny_models):
    from jobs import finetune_text_to_image
    from jobs._config import ConfigError, parse_config

    cfg = parse_config(finetune_text_to_image.Config, [
        "--config", "configs/finetune_text_to_image.tiny.yaml", "--model.base", tiny_models["text_to_image"],
        "--data.ground_truth", "null", "--data.crop_to", "focus_object"], prog="t")
    with pytest.raises(ConfigError, match="crop_to"):
        finetune_text_to_image.check_config(cfg)
