"""Multimodal Divergence Estimator (§3.4): tiny ViLT from a config, every objective, save/reload, collator."""

import io
import math
import os

import pytest
import torch
from PIL import Image

from tmr_core.losses import supervised_contrastive_loss
from tmr_core.mde import (
    MDECollator,
    MDEConfig,
    MDEOutput,
    MultimodalDivergenceEstimator,
    same_source_swaps,
)
from tmr_core.schema import ALIGNMENT_CATEGORIES

WORDS = "a the dog cat on grass red blue green car sky under tree big small photo of".split()
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import BertTokenizerFast, ViltImageProcessorPil, ViltProcessor

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    image_processor = ViltImageProcessorPil(size={"shortest_edge": 32}, size_divisor=16)
    return ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_vilt_config(vocab_size: int):
    from transformers import ViltConfig

    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
        max_position_embeddings=16,
    )


def tiny_mde(processor, seed: int = 0, **fields) -> MultimodalDivergenceEstimator:
    torch.manual_seed(seed)
    config = MDEConfig(
        backbone="tiny",
        backbone_config=tiny_vilt_config(len(processor.tokenizer)).to_dict(),
        projection_dim=16,
        **fields,
    )
    return MultimodalDivergenceEstimator(config)


def image(colour: str, size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[colour])


# id, caption, image colour, image size, label, source: two sources, weaken rows have a wrong image.
ROWS = [
    ("s0", "a red car", "red", (32, 32), "strengthen", "coco"),
    ("s1", "a blue sky", "blue", (32, 32), "strengthen", "coco"),
    ("s2", "a green tree", "green", (32, 32), "strengthen", "coco"),
    ("c0", "photo of a dog", "red", (48, 32), "complement", "laion"),
    ("c1", "big cat", "green", (48, 32), "complement", "laion"),
    ("w0", "a red car", "blue", (32, 32), "weaken", "coco"),
    ("w1", "a green tree", "red", (48, 32), "weaken", "laion"),
    ("w2", "small dog", "blue", (48, 32), "weaken", "laion"),
]


def rows() -> list[dict]:
    keys = ("id", "caption", "image", "label", "source")
    return [
        dict(zip(keys, (i, text, image(c, size), label, src), strict=True))
        for i, text, c, size, label, src in ROWS
    ]


@pytest.fixture(scope="module")
def batch(processor):
    return MDECollator(processor, max_length=16)(rows())


def test_output_shapes_and_probabilities(processor, batch):
    model = tiny_mde(processor).eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "source_ids")}
    out = model(**inputs)
    assert isinstance(out, MDEOutput) and out.loss is None
    assert out.z.shape == (8, 16) and out.logits.shape == (8, 3) and out.probs.shape == (8, 3)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(8))
    probs = model.score(**inputs)
    assert probs.shape == (8, 3) and not probs.requires_grad and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))
    torch.testing.assert_close(probs, out.probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["ce", "ce_negative_sampling", "supcon"])
def test_each_objective_gives_a_finite_loss_with_gradients(processor, batch, objective):
    model = tiny_mde(processor)
    out = model(**batch, objective=objective, generator=torch.Generator().manual_seed(0))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.probs.shape == (8, 3)  # extra negatives never show in the outputs
    out.loss.backward()
    for name in (
        "backbone.encoder.layer.0.attention.attention.query.weight",
        "projection.0.weight",
        "head.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert out.num_negatives == (5 if objective == "ce_negative_sampling" else 0)  # 3 coco + 2 laion rows


def test_supcon_trains_the_encoder_by_supcon_alone(processor, batch):
    """The head's CE sees z.detach(): encoder gradients equal those of Eq. 6 alone."""
    model = tiny_mde(processor, objective="supcon")
    torch.manual_seed(1)  # ViLT samples its patch order from the global generator
    model(**batch).loss.backward()
    full = model.projection[0].weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(1)
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    supervised_contrastive_loss(out.z, batch["labels"], model.config.temperature).backward()
    torch.testing.assert_close(full, model.projection[0].weight.grad, atol=1e-6, rtol=1e-4)


def test_supcon_then_fitting_the_head_on_frozen_z(processor, batch):
    model = tiny_mde(processor, objective="supcon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):  # a tiny random ViLT starts with nearly collapsed z
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    with torch.no_grad():  # start from a blank head so only the frozen-z fit can explain what it learns
        model.head.weight.zero_()
        model.head.bias.zero_()
    result = model.fit_head_on_frozen([batch], epochs=100, lr=5e-2)
    assert result["steps"] == 100 and result["first_loss"] == pytest.approx(math.log(3), abs=1e-5)
    assert result["loss"] < 0.6 * result["first_loss"]
    assert model.training  # mode restored
    for key, value in model.state_dict().items():
        if key in encoder_before:
            assert torch.equal(value, encoder_before[key]), key
    predicted = model.eval().score(**{k: v for k, v in batch.items() if k not in ("labels", "source_ids")})
    assert (predicted.argmax(-1) == batch["labels"]).float().mean() >= 0.75
    with pytest.raises(ValueError, match=r"batches\[0\]: no 'labels'"):
        model.fit_head_on_frozen([{k: v for k, v in batch.items() if k != "labels"}])


def test_freeze_encoder_leaves_only_the_head_trainable(processor):
    model = tiny_mde(processor).freeze_encoder()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    model.freeze_encoder(False)
    assert all(p.requires_grad for p in model.parameters())


def test_ce_overfits_a_small_batch(processor, batch):
    model = tiny_mde(processor, seed=2, objective="ce")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::5]


def test_same_source_swaps_pair_aligned_rows_of_one_source():
    weaken = ALIGNMENT_CATEGORIES.index("weaken")
    labels = torch.tensor([0, 0, 0, 1, 1, weaken, 1, 0, weaken])
    sources = torch.tensor([0, 0, 0, 1, 1, 0, 1, 2, 2])  # source 2 has one aligned row: no swap
    text_rows, image_rows = same_source_swaps(
        labels, sources, weaken, generator=torch.Generator().manual_seed(0)
    )
    assert sorted(text_rows.tolist()) == [0, 1, 2, 3, 4, 6]  # every eligible row once, weaken rows never
    assert sorted(image_rows.tolist()) == [0, 1, 2, 3, 4, 6]
    for t, i in zip(text_rows.tolist(), image_rows.tolist(), strict=True):
        assert t != i and sources[t] == sources[i] and labels[i] != weaken
    again = same_source_swaps(labels, sources, weaken, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], text_rows) and torch.equal(again[1], image_rows)
    none = same_source_swaps(torch.tensor([0, 1, weaken]), torch.tensor([0, 1, 0]), weaken)
    assert none[0].numel() == 0 and none[1].numel() == 0


def test_same_source_swaps_drop_pairs_of_one_picture():
    labels, sources = torch.tensor([0, 0]), torch.tensor([3, 3])
    images = torch.ones(2, 3, 4, 4)  # two captions of the same image: swapping makes no negative
    assert same_source_swaps(labels, sources, 2, images=images)[0].numel() == 0
    images[1] = 0
    assert same_source_swaps(labels, sources, 2, images=images)[0].numel() == 2


def test_swaps_onto_an_image_showing_a_named_object_are_not_weaken():
    # The corpus knows its objects: a caption naming "red circle" moved onto another image that
    # also shows a red circle is no weaken pair (on the synthetic corpus about half were).
    labels, sources = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0])
    named = torch.tensor([[1, 0, 0]] * 4, dtype=torch.bool)  # every caption names object 0
    shown = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)  # images 0, 2 show it
    generator = torch.Generator().manual_seed(0)
    all_swaps = same_source_swaps(labels, sources, 2, generator=generator)
    text_rows, image_rows = same_source_swaps(labels, sources, 2, generator=torch.Generator().manual_seed(0),
                                              named_objects=named, shown_objects=shown)
    assert all_swaps[0].numel() == 4 and text_rows.numel() == 2  # each image is used once; two show object 0
    for t, i in zip(text_rows.tolist(), image_rows.tolist(), strict=True):
        assert not (named[t] & shown[i]).any(), (t, i)


def test_synthetic_corpus_lists_its_objects_and_the_collator_reads_them(processor, tmp_path):
    import pyarrow.parquet as pq

    from tmr_core.synthetic import SyntheticConfig, make_synthetic_benchmark

    make_synthetic_benchmark(tmp_path, SyntheticConfig(ner_sizes=(4, 2, 2), re_sizes=(4, 2, 2), mde_sizes=(40, 8, 8, 8)))
    rows = pq.read_table(tmp_path / "mde" / "train.parquet").to_pylist()
    for row in rows:
        # the objects a caption decides: none shown (weaken), all shown (strengthen, complement;
        # a complement caption may leave every name undecided)
        named, shown = set(row["objects_named"]), set(row["objects_shown"])
        if row["label"] == "weaken":
            assert named and not named & shown, row
        else:
            assert named <= shown and (named or row["label"] == "complement"), row
    batch = MDECollator(processor, max_length=12)(rows[:6])
    assert batch["named_objects"].shape == batch["shown_objects"].shape and batch["named_objects"].shape[0] == 6


def test_negative_sampling_needs_sources_and_labels_are_checked(processor, batch):
    model = tiny_mde(processor)
    with pytest.raises(ValueError, match="source_ids"):
        model(**{k: v for k, v in batch.items() if k != "source_ids"}, objective="ce_negative_sampling")
    with pytest.raises(ValueError, match="labels: expected indices"):
        model(**{**batch, "labels": torch.full((8,), 3)})
    with pytest.raises(ValueError, match="objective"):
        model(**batch, objective="hinge")
    too_long = {
        **batch,
        "input_ids": torch.ones(8, 17, dtype=torch.long),
        "attention_mask": torch.ones(8, 17),
    }
    with pytest.raises(ValueError, match="17 tokens but the backbone has 16"):
        model(**too_long)


def test_save_and_reload_gives_identical_outputs_from_safetensors_only(processor, batch, tmp_path):
    model = tiny_mde(processor, objective="ce_negative_sampling").eval()
    model.save_pretrained(str(tmp_path / "mde"))
    assert sorted(os.listdir(tmp_path / "mde")) == ["config.json", "model.safetensors"]
    reloaded = MultimodalDivergenceEstimator.from_pretrained(str(tmp_path / "mde"))
    assert reloaded.config == model.config and not reloaded.training
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "source_ids")}
    torch.manual_seed(0)
    expected = model(**inputs)
    torch.manual_seed(0)
    got = reloaded(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(got.z, expected.z, atol=0, rtol=0)


def test_from_backbone_loads_a_vilt_folder(processor, batch, tmp_path):
    from transformers import ViltModel, ViltProcessor

    torch.manual_seed(4)
    backbone = ViltModel(tiny_vilt_config(len(processor.tokenizer)))
    backbone.save_pretrained(tmp_path / "mde-backbone")
    processor.save_pretrained(tmp_path / "mde-backbone")
    model = MultimodalDivergenceEstimator.from_backbone(str(tmp_path / "mde-backbone"), projection_dim=8)
    assert model.config.backbone == str(tmp_path / "mde-backbone") and model.config.projection_dim == 8
    assert model.config.backbone_config["hidden_size"] == 32
    torch.testing.assert_close(
        model.backbone.embeddings.patch_embeddings.projection.weight,
        backbone.embeddings.patch_embeddings.projection.weight,
    )
    reloaded_processor = ViltProcessor.from_pretrained(tmp_path / "mde-backbone")
    probs = model.eval().score(
        **{
            k: v
            for k, v in MDECollator(reloaded_processor, 16)(rows()[:2]).items()
            if k not in ("labels", "source_ids")
        }
    )
    assert probs.shape == (2, 3)


def test_config_is_checked():
    with pytest.raises(ValueError, match="MDEConfig.objective"):
        MDEConfig(objective="mse")
    with pytest.raises(ValueError, match="MDEConfig.labels"):
        MDEConfig(labels=("weaken", "strengthen", "complement"))
    with pytest.raises(ValueError, match="backbone_config is None"):
        MultimodalDivergenceEstimator(MDEConfig())


def test_collator_reads_uris_bytes_and_pil_images(processor, tmp_path):
    path = tmp_path / "img.png"
    image("green", (40, 24)).save(path)
    buffer = io.BytesIO()
    image("red").save(buffer, format="PNG")
    collate = MDECollator(processor, max_length=5)
    batch = collate(
        [
            {
                "tokens": ["a", "green", "tree", "under", "the", "big", "sky"],
                "image_uri": str(path),
                "label": 2,
                "source": "b",
            },
            {"caption": "a red car", "image": buffer.getvalue(), "label": "strengthen", "source": "a"},
            {"caption": "sky", "image": Image.new("L", (32, 32), 128), "label": "complement", "source": "b"},
        ]
    )
    assert batch["input_ids"].shape == (3, 5)  # truncated to max_length
    assert batch["labels"].tolist() == [2, 0, 1]
    assert batch["source_ids"].tolist() == [1, 0, 1]
    assert batch["pixel_values"].shape[:2] == (3, 3) and batch["pixel_mask"].shape[0] == 3
    unlabelled = collate([{"caption": "a", "image": image("red")}])
    assert "labels" not in unlabelled and "source_ids" not in unlabelled


def test_collator_names_the_bad_row(processor):
    collate = MDECollator(processor)
    with pytest.raises(ValueError, match=r"rows\[1\] \(id='x'\): no 'image' or 'image_uri'"):
        collate([{"caption": "a", "image": image("red")}, {"id": "x", "caption": "a", "image_uri": None}])
    with pytest.raises(ValueError, match=r"rows\[0\]: no 'caption' or 'tokens'"):
        collate([{"image": image("red")}])
    with pytest.raises(ValueError, match=r"rows\[1\]: no 'label' while other rows have one"):
        collate(
            [{"caption": "a", "image": image("red"), "label": 0}, {"caption": "a", "image": image("red")}]
        )
    with pytest.raises(ValueError, match="label 'aligned' is not one of"):
        collate([{"caption": "a", "image": image("red"), "label": "aligned"}])


def test_collator_pads_as_the_processor_and_reuses_the_pixels_it_kept(processor, tmp_path, monkeypatch):
    """Images processed one by one and padded here equal the processor's batch (sizes differ:
    ViLT pads bottom-right to the largest); a row read by URI again is not processed again."""
    paths = []
    for colour, size in (("green", (40, 24)), ("red", (32, 32)), ("blue", (24, 56))):
        paths.append(tmp_path / f"{colour}.png")
        image(colour, size).save(paths[-1])
    rows = [{"caption": f"a {c} car", "image_uri": str(p)} for c, p in zip(("green", "red", "blue"), paths, strict=True)]
    expected = processor(images=[Image.open(p).convert("RGB") for p in paths], text=[r["caption"] for r in rows],
                         padding="longest", truncation=True, max_length=8, return_tensors="pt")
    collate = MDECollator(processor, max_length=8, pixel_cache_bytes=2**20)
    first = collate(rows)
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_mask"):
        assert torch.equal(first[key], expected[key]), key
    processed = []
    original = collate._processed
    monkeypatch.setattr(collate, "_processed", lambda images: processed.append(len(images)) or original(images))
    again = collate([rows[2], rows[0]])
    assert processed == []  # both kept
    assert torch.equal(again["pixel_values"][0], first["pixel_values"][2, :, :, :again["pixel_values"].shape[-1]])
    collate([rows[1], {"caption": "a red car", "image": image("red")}])  # an in-memory image is never kept
    assert processed == [1]
    uncached = MDECollator(processor, max_length=8)  # the default: keeps nothing
    assert torch.equal(uncached(rows)["pixel_values"], expected["pixel_values"]) and len(uncached._pixels) == 0
