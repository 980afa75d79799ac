"""The TMR extractor end to end on tiny backbones: overfitting, checkpoints, ablation switches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from tmr_core.extractor import TMRConfig, TMRExtractor
from tmr_core.heads import is_valid_bio

WORDS = "the cat sat on a mat in paris with john smith at google today new york city".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "[unused2]", "[unused3]"]
VOCAB += WORDS + ["##s", "##ed", "!", "."]
RELATIONS = ("None", "/per/loc/place_of_residence", "/per/org/member_of")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_tiny_backbones(root: Path) -> tuple[str, str]:
    """A tiny BERT (hidden 32) with its tokenizer and a tiny ResNet with its processor, saved as HF folders."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetModel,
    )

    torch.manual_seed(0)
    text_dir, image_dir = root / "text-encoder", root / "image-encoder"
    text_dir.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(text_dir)
    bert = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertModel(bert).save_pretrained(text_dir)
    resnet = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(resnet).save_pretrained(image_dir)
    ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(image_dir)
    return str(text_dir), str(image_dir)


def write_images(root: Path) -> dict[str, str]:
    """Three small distinct images (real and back-translated) as PNG files."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        image = Image.new("RGB", (96, 80), colour)
        image.paste((255, 255, 255), (10, 10, 50, 40))
        paths[name] = str(root / f"{name}.png")
        image.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tmr-extractor")
    text_dir, image_dir = write_tiny_backbones(root)
    return {"text": text_dir, "image": image_dir, "images": write_images(root / "images")}


def region(box, score=0.9, phrase="x"):
    return {"box": box, "score": score, "phrase": phrase}


def ner_rows(images):
    return [
        {
            "id": "a",
            "tokens": ["john", "smith", "sat", "in", "paris", "\ufe0f"],
            "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"],
            "phrases": [
                {"text": "john smith", "start": 0, "end": 2},
                {"text": "paris", "start": 4, "end": 5},
            ],
            "image_uri": images["red"],
            "back_translation_uri": images["green"],
            "regions": [region([0, 0, 40, 40]), region([20, 10, 90, 70], 0.5)],
            "back_translation_regions": [region([5, 5, 60, 60])],
            "divergence": [0.7, 0.2, 0.1],
        },
        {
            "id": "b",
            "tokens": ["google", "cats", "new", "york", "city", "today"],
            "tags": ["B-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "O"],
            "phrases": [{"text": "new york city", "start": 2, "end": 5}],
            "image_uri": None,
            "back_translation_uri": images["blue"],
            "regions": [],
            "back_translation_regions": [region([0, 0, 30, 30]), region([30, 30, 90, 70])],
            "divergence": [0.1, 0.3, 0.6],
        },
        {
            "id": "c",
            "tokens": ["the", "cat", "sat", "with", "john"],
            "tags": ["O", "O", "O", "O", "I-PER"],  # an orphan I- (Twitter-2015 has them)
            "phrases": [],
            "image_uri": images["blue"],
            "back_translation_uri": None,
            "regions": [region([0, 0, 50, 50])],
            "back_translation_regions": [],
            "divergence": [0.4, 0.4, 0.2],
        },
    ]


def re_rows(images):
    def row(id_, tokens, head, tail, relation, image):
        return {
            "id": id_,
            "tokens": tokens,
            "relation": relation,
            "head": {"name": " ".join(tokens[head[0] : head[1]]), "start": head[0], "end": head[1]},
            "tail": {"name": " ".join(tokens[tail[0] : tail[1]]), "start": tail[0], "end": tail[1]},
            "phrases": [
                {"text": "x", "start": head[0], "end": head[1]},
                {"text": "y", "start": tail[0], "end": tail[1]},
            ],
            "image_uri": image,
            "back_translation_uri": images["green"],
            "regions": [region([0, 0, 40, 40])],
            "back_translation_regions": [region([10, 10, 70, 70])],
            "divergence": [0.5, 0.3, 0.2],
        }

    return [
        row("r1", ["john", "smith", "sat", "in", "paris"], (0, 2), (4, 5), RELATIONS[1], images["red"]),
        row("r2", ["john", "at", "google", "today"], (0, 1), (2, 3), RELATIONS[2], images["blue"]),
        row("r3", ["paris", "cat", "sat", "with", "john"], (4, 5), (0, 1), RELATIONS[0], None),
        row("r4", ["new", "york", "city", "with", "google"], (0, 3), (4, 5), RELATIONS[0], images["red"]),
    ]


def build(assets, **overrides) -> TMRExtractor:
    torch.manual_seed(0)
    task = overrides.pop("task", "ner")
    config = TMRConfig(
        task=task,
        labels=RELATIONS if task == "re" else (),
        text_encoder=assets["text"],
        image_encoder=assets["image"],
        num_heads=2,
        dropout=0.0,
        **overrides,
    )
    return TMRExtractor.build(config)


def batch_for(model, rows):
    return model.collator()(rows)


def overfit(model, batch, steps=40, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_ner_overfits_a_batch_and_decodes_valid_bio(assets):
    model = build(assets)
    rows = ner_rows(assets["images"])
    batch = batch_for(model, rows)
    losses = overfit(model, batch)
    assert losses[-1] <= 0.1 * losses[0], losses
    model.eval()
    predicted = model.predict(batch)
    assert [len(p) for p in predicted] == [len(r["tokens"]) for r in rows]
    assert all(is_valid_bio(p) for p in predicted)
    assert predicted[0] == [
        "B-PER",
        "I-PER",
        "O",
        "O",
        "B-LOC",
        "O",
    ]  # U+FE0F kept in place, labels unshifted
    assert predicted[1] == ["B-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert predicted[2][-1] == "B-PER"  # the orphan I-PER was learned as the chunk start it denotes


def test_re_overfits_a_batch(assets):
    model = build(assets, task="re")
    rows = re_rows(assets["images"])
    batch = batch_for(model, rows)
    losses = overfit(model, batch, steps=30)
    assert losses[-1] <= 0.1 * losses[0], losses
    model.eval()
    predicted = model.predict(batch)
    assert [relation for relation, _ in predicted] == [r["relation"] for r in rows]
    for relation, probabilities in predicted:
        assert set(probabilities) == set(RELATIONS)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert probabilities[relation] == max(probabilities.values())


@pytest.mark.parametrize("task", ["ner", "re"])
def test_checkpoint_reloads_to_identical_outputs_from_safetensors_only(assets, tmp_path, monkeypatch, task):
    model = build(assets, task=task)
    rows = (ner_rows if task == "ner" else re_rows)(assets["images"])
    overfit(model, batch_for(model, rows), steps=2)  # move the weights off their initial values
    model.eval()
    batch = batch_for(model, rows)
    expected = model(batch)

    model.save_pretrained(str(tmp_path / "ckpt"))
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called: checkpoints must load from safetensors")

    monkeypatch.setattr(torch, "load", no_unpickling)
    reloaded = TMRExtractor.from_pretrained(str(tmp_path / "ckpt"))
    assert reloaded.config == model.config
    reloaded_batch = batch_for(reloaded, rows)  # the saved tokenizer and processor give the same tensors
    assert reloaded_batch.keys() == batch.keys()
    assert all(torch.equal(reloaded_batch[k], batch[k]) for k in batch)
    actual = reloaded(reloaded_batch)
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.loss, expected.loss)
    assert reloaded.predict(reloaded_batch) == model.predict(batch)


def grads_by_name(model, batch) -> set[str]:
    model.train()
    model.zero_grad()
    model(batch).loss.backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def has_prefix(names, prefix):
    return any(name.startswith(prefix) for name in names)


def test_every_ablation_switch_changes_which_parameters_get_gradients(assets):
    rows = ner_rows(assets["images"])
    full_model = build(assets)
    full = grads_by_name(full_model, batch_for(full_model, rows))
    # Every parameter that exists is used: DDP (Ray Train) needs no find_unused_parameters.
    assert full == {name for name, _ in full_model.named_parameters()}
    for prefix in (
        "image_encoder.",
        "attention.fine.",
        "attention.phrase_region.",
        "attention.word_phrase.",
        "head.fusion.",
    ):
        assert has_prefix(full, prefix), prefix

    removed = {
        "text_only": ("image_encoder.", "attention."),
        "use_fine": ("attention.fine.",),
        "use_coarse": ("attention.phrase_region.", "attention.word_phrase."),
        "use_back_translation": (),  # Eq. 7 stays, attending over G* alone
    }
    for switch, prefixes in removed.items():
        model = build(assets, **{switch: switch == "text_only"})
        batch = batch_for(model, rows)
        names = grads_by_name(model, batch)
        assert names != full or switch == "use_back_translation", switch
        assert names == {name for name, _ in model.named_parameters()}, switch  # ablated parts are not built
        assert has_prefix(names, "text_encoder.") and has_prefix(names, "head.emission."), switch
        assert has_prefix(names, "head.fusion."), switch  # every ablation keeps the Eq. 7 block
        for prefix in prefixes:
            assert not has_prefix(names, prefix), (switch, prefix)
        if switch == "text_only":
            assert model.image_encoder is None and "pixel_values" not in batch
        if switch == "use_back_translation":
            assert "bt_pixel_values" not in batch
        if switch == "use_coarse":
            assert "region_pixel_values" not in batch and "bt_region_mask" not in batch
        if switch in ("use_fine", "use_coarse"):
            assert has_prefix(names, "image_encoder."), switch  # the other level still uses the image


def perturbed(batch, **changes):
    copy = dict(batch)
    copy.update(changes)
    return copy


def test_use_mde_switch_decides_whether_divergence_matters(assets):
    # The MDE is a separate model, so this switch owns no parameters: it decides whether the
    # batch's divergence scores reach G* and G'* (Eq. 4) or fixed_alpha does.
    rows = ner_rows(assets["images"])
    swapped = torch.tensor([[0.1, 0.1, 0.8]] * len(rows))
    with_mde = build(assets).eval()
    batch = batch_for(with_mde, rows)
    assert not torch.allclose(with_mde(batch).logits, with_mde(perturbed(batch, divergence=swapped)).logits)
    with pytest.raises(ValueError, match="divergence"):
        with_mde({k: v for k, v in batch.items() if k != "divergence"})

    without = build(assets, use_mde=False, fixed_alpha=(0.6, 0.4, 0.0)).eval()
    plain = batch_for(without, rows)
    assert "divergence" not in plain
    assert torch.equal(without(plain).logits, without(perturbed(plain, divergence=swapped)).logits)


def test_re_back_translation_switch_decides_whether_v_prime_matters(assets):
    rows = re_rows(assets["images"])
    with_bt = build(assets, task="re").eval()
    batch = batch_for(with_bt, rows)
    noise = perturbed(batch, bt_pixel_values=torch.randn_like(batch["bt_pixel_values"]))
    assert not torch.allclose(with_bt(batch).logits, with_bt(noise).logits)

    without = build(assets, task="re", use_back_translation=False).eval()
    plain = batch_for(without, rows)
    assert "bt_pixel_values" not in plain
    assert torch.equal(
        without(plain).logits,
        without(perturbed(plain, **{k: noise[k] for k in noise if k.startswith("bt_")})).logits,
    )


def test_missing_images_regions_and_phrases_give_finite_outputs(assets):
    model = build(assets).eval()
    rows = [
        dict(r, image_uri=None, back_translation_uri=None, regions=None, phrases=None)
        for r in ner_rows(assets["images"])
    ]
    batch = batch_for(model, rows)
    assert not batch["image_mask"].any() and not batch["region_mask"].any() and not batch["phrase_mask"].any()
    output = model(batch)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    # Alone in a batch or beside others, a sample gets the same prediction (eval mode).
    full = model.predict(batch_for(model, ner_rows(assets["images"])))
    single = model.predict(batch_for(model, ner_rows(assets["images"])[1:2]))
    assert single[0] == full[1]


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="labels"):
        TMRConfig(task="re")
    with pytest.raises(ValueError, match="fixed_alpha"):
        TMRConfig(fixed_alpha=(0.5, 0.6, 0.0))
    with pytest.raises(ValueError, match="num_patches"):
        TMRConfig(num_patches=50)
    with pytest.raises(ValueError, match="use_fine/use_coarse"):
        TMRConfig(use_fine=False, use_coarse=False)
    assert (TMRConfig(task="re", labels=RELATIONS).max_length, TMRConfig().max_length) == (128, 80)
    assert dataclasses.replace(TMRConfig(), max_phrase_len=None).max_phrase_len == 4


def test_checkpoint_and_images_round_trip_through_s3(assets, s3_endpoint, s3_bucket):
    from tmr_core import storage

    options = storage.StorageOptions(endpoint_url=s3_endpoint)
    images = {}
    for name, path in assets["images"].items():
        images[name] = f"s3://{s3_bucket}/images/{name}.png"
        storage.write_bytes_atomic(images[name], Path(path).read_bytes(), options)
    model = build(assets, task="re").eval()
    rows = re_rows(images)
    batch = model.collator(storage_options=options)(rows)
    local = batch_for(model, re_rows(assets["images"]))
    assert all(torch.equal(batch[k], local[k]) for k in local)  # same pixels from S3 as from disk

    model.save_pretrained(f"s3://{s3_bucket}/ckpt", options=options)
    reloaded = TMRExtractor.from_pretrained(f"s3://{s3_bucket}/ckpt", options=options)
    assert torch.equal(reloaded(batch).logits, model(batch).logits)
    assert reloaded.tokenizer is not None and reloaded.image_processor is not None


# ----- Eq. 4 as printed, and ablations that differ only in what they remove ----------------


def with_images_swapped(rows):
    """Each row takes the next row's real image and back-translation (and their regions)."""
    keys = ("image_uri", "regions", "back_translation_uri", "back_translation_regions")
    return [dict(row, **{k: rows[(i + 1) % len(rows)][k] for k in keys}) for i, row in enumerate(rows)]


def logits_with_alpha(model, rows, alpha):
    rows = [dict(r, divergence=alpha, back_translation_divergence=alpha) for r in rows]
    model.eval()
    with torch.no_grad():
        return model(batch_for(model, rows)).logits


@pytest.mark.parametrize("task", ["ner", "re"])
@pytest.mark.parametrize("alpha_source", ["image", "back_translation"])
def test_alpha_weaken_removes_the_images_and_strengthen_uses_them(assets, task, alpha_source):
    # Eq. 4: α_w weights a zero block. With α = (0, 0, 1) for v and v', the images cannot matter;
    # with α = (1, 0, 0) they must (before, a LayerNorm after the α-weighted sum cancelled α's scale).
    model = build(assets, task=task, back_translation_alpha=alpha_source)
    rows = ner_rows(assets["images"]) if task == "ner" else re_rows(assets["images"])
    colours = list(assets["images"].values())
    rows = [dict(r, image_uri=colours[i % 3], back_translation_uri=colours[(i + 1) % 3],
                 regions=[region([0, 0, 40, 40])], back_translation_regions=[region([10, 10, 70, 70])])
            for i, r in enumerate(rows)]
    swapped = with_images_swapped(rows)
    weaken, strengthen = [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]
    assert torch.equal(logits_with_alpha(model, rows, weaken), logits_with_alpha(model, swapped, weaken))
    assert not torch.allclose(logits_with_alpha(model, rows, strengthen), logits_with_alpha(model, swapped, strengthen),
                              atol=1e-4)
    # A common scale of α is no longer cancelled: 0.1·(s, c) differs from (s, c).
    assert not torch.allclose(logits_with_alpha(model, rows, [0.06, 0.03, 0.91]),
                              logits_with_alpha(model, rows, [0.6, 0.3, 0.1]), atol=1e-4)


def test_back_translation_alpha_reads_the_back_translations_own_scores(assets):
    model = build(assets, back_translation_alpha="back_translation")
    rows = [r for r in ner_rows(assets["images"]) if r["back_translation_uri"]]
    model.eval()
    with torch.no_grad():
        same = model(batch_for(model, [dict(r, back_translation_divergence=r["divergence"]) for r in rows])).logits
        other = model(batch_for(model, [dict(r, back_translation_divergence=[0.0, 0.0, 1.0]) for r in rows])).logits
        image_alpha = build(assets)
        image_alpha.eval()
        reused = image_alpha(batch_for(image_alpha, rows)).logits
    assert torch.allclose(same, reused, atol=1e-6)  # same α for both views: the two options agree
    assert not torch.allclose(same, other, atol=1e-4)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_each_ablation_removes_only_what_it_names(assets, task):
    from tmr_core.extractor import ABLATIONS, parameter_counts

    counts = {name: parameter_counts(build(assets, task=task, **switches)) for name, switches in ABLATIONS.items()}
    full = counts["full"]
    removed = {
        "full": set(),
        "no_back_translation": set(),  # v' is not encoded; Eq. 7 attends G* over itself
        "no_mde": set(),  # fixed α
        "no_fine": {"attention.fine"},
        "no_coarse": {"attention.phrase_region", "attention.word_phrase"},
        "text_only": {"image_encoder", "attention.fine", "attention.phrase_region", "attention.word_phrase"},
    }
    print(f"\n{task}: parameters per component")
    for name, parts in counts.items():
        print(f"  {name:20s} {sum(parts.values()):>8d}  {parts}")
        assert set(full) - set(parts) == removed[name], name
        assert all(parts[k] == full[k] for k in parts), name  # what is kept is the same size
        assert sum(full.values()) - sum(parts.values()) == sum(full[k] for k in removed[name]), name


def test_entities_past_max_length_are_misses_not_absent(assets):
    # Scores compare with the reader's tags of every token: an entity cut by max_length stays in the
    # support and costs recall (before, gold was rebuilt from the truncated labels and it vanished).
    from jobs.finetune_extractor import score_rows, support_metrics

    model = build(assets, max_length=7, text_only=True)
    tokens = ["john", "smith", "sat", "in", "paris", "with", "new", "york", "city", "and", "google"]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]
    rows = [{"id": "long", "tokens": tokens, "tags": tags}]
    collate = model.collator()
    assert collate.encode_text(rows[0], "long").truncated_from == 5  # [CLS] + 5 tokens + [SEP]
    metrics, pred = score_rows(model, rows, collate, 4, "cpu", "test")
    metrics |= support_metrics("ner", rows, collate, "None", "test")
    assert len(pred[0]) == len(tokens) and pred[0][5:] == ["O"] * 6  # unseen tokens read O
    assert metrics["test_support"] == 4  # john smith, paris, new york city, google
    assert metrics["test_past_max_length"] == 2
    assert metrics["test_recall"] <= 2 / 4
