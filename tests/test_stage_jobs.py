"""The four Ray Data stages on the tiny benchmark, on the shared local Ray cluster, plus the pure
back-translation/grounding cores they wrap (cache keys, seeds, failure isolation, top-k regions)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs._config import parse_config
from tmr_core.back_translation import (
    BackTranslator,
    GenerationSettings,
    cache_key,
    generation_seed,
    prompt_from_tokens,
    sample_seed,
)
from tmr_core.schema import STAGE_FIELDS, base_schema

REPO = Path(__file__).resolve().parents[1]
# Cheap generation for every test: 2 Euler steps at 32x32, no classifier-free guidance.
TINY_GENERATION = ["--generation.steps", "2", "--generation.height", "32", "--generation.width", "32",
                   "--generation.guidance_scale", "1.0", "--generation.scheduler", "EulerDiscreteScheduler"]


# --------------------------------------------------------------------------- shared assets


@pytest.fixture(scope="session")
def stage_models(request) -> dict[str, str]:
    """The tiny models (text-to-image, detector, mde_backbone): the ``tiny_models`` fixture."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:  # assets fixture not there yet: build the same models
        from tmr_core.tiny_models import ensure_tiny_models

        return ensure_tiny_models(REPO / ".cache" / "tmr-models")


@pytest.fixture(scope="session")
def stage_benchmark(request, tmp_path_factory) -> Path:
    """The tiny synthetic benchmark folder (``tiny_benchmark`` fixture)."""
    try:
        return Path(request.getfixturevalue("tiny_benchmark"))
    except pytest.FixtureLookupError:
        from tmr_core.synthetic import make_synthetic_benchmark, preset

        out = tmp_path_factory.mktemp("benchmark")
        make_synthetic_benchmark(out, preset("tiny"))
        return out


@pytest.fixture(scope="session")
def small_dataset(stage_benchmark, tmp_path_factory) -> Path:
    """prepare_dataset's NER tables of the tiny benchmark, cut to 12 valid + 6 test rows."""
    from jobs import prepare_dataset

    full = tmp_path_factory.mktemp("dataset")
    assert prepare_dataset.main(["--format", "synthetic", "--task", "ner", "--data_dir", str(stage_benchmark),
                                 "--output", str(full), "--splits", "[valid, test]"]) == 0
    small = tmp_path_factory.mktemp("small")
    for split, n in (("valid", 12), ("test", 6)):
        pq.write_table(pq.read_table(full / f"{split}.parquet").slice(0, n), small / f"{split}.parquet")
    return small


@pytest.fixture(scope="session")
def mde_checkpoint(stage_models, tmp_path_factory) -> Path:
    """A tiny untrained MDE as pretrain_mde leaves it: config + weights; the job finds the
    processor through the config's backbone folder."""
    from tmr_core.mde import MultimodalDivergenceEstimator

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mde")
    MultimodalDivergenceEstimator.from_backbone(stage_models["mde_backbone"], projection_dim=16).save_pretrained(str(out))
    return out


def read_table(folder: Path) -> pa.Table:
    return pq.read_table(folder).sort_by("id")


def rows_by_id(folder: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_table(folder).to_pylist()}


# --------------------------------------------------------------------------- cores (no Ray)


def test_cache_key_changes_with_every_setting_and_seed_is_stable():
    base = GenerationSettings(model="m", scheduler="EulerDiscreteScheduler", steps=2, height=32, width=32)
    key = cache_key(base, 7, "a cat")
    assert cache_key(base, 7, "a cat") == key and len(key) == 64
    variants = [
        GenerationSettings(model="m2", scheduler="EulerDiscreteScheduler", steps=2, height=32, width=32),
        GenerationSettings(model="m", revision="r1", scheduler="EulerDiscreteScheduler", steps=2, height=32, width=32),
        GenerationSettings(model="m", scheduler="DDIMScheduler", steps=2, height=32, width=32),
        GenerationSettings(model="m", scheduler="EulerDiscreteScheduler", steps=3, height=32, width=32),
        GenerationSettings(model="m", scheduler="EulerDiscreteScheduler", steps=2, guidance_scale=1.0, height=32, width=32),
        GenerationSettings(model="m", scheduler="EulerDiscreteScheduler", steps=2, height=64, width=32),
    ]
    keys = {cache_key(v, 7, "a cat") for v in variants} | {cache_key(base, 8, "a cat"), cache_key(base, 7, "a dog")}
    assert key not in keys and len(keys) == len(variants) + 2
    # device and dtype do not change what the image is
    assert cache_key(GenerationSettings(model="m", scheduler="EulerDiscreteScheduler", steps=2, height=32, width=32,
                                        dtype="float16", device="cuda"), 7, "a cat") == key
    assert sample_seed("syn_ner_000001") == sample_seed("syn_ner_000001") != sample_seed("syn_ner_000002")
    assert 0 <= sample_seed("x") < 2**31 and sample_seed("x", base_seed=1) != sample_seed("x")
    # default: one seed for every prompt, so the image is a function of the text alone
    assert generation_seed("syn_ner_000001", "a cat") == generation_seed(None, "a dog") == 0
    assert generation_seed("a", "a cat", base_seed=5) == 5
    assert generation_seed("syn_ner_000001", "a cat", per_sample=True) == sample_seed("syn_ner_000001")
    assert generation_seed(None, "a cat", base_seed=3, per_sample=True) == sample_seed("a cat", 3)
    assert prompt_from_tokens(["Taylor", "Swift", "wins"]) == "Taylor Swift wins"
    with pytest.raises(ValueError, match="height"):
        GenerationSettings(model="m", height=30)


def test_generated_image_is_deterministic_for_an_id(stage_models, tmp_path):
    settings = GenerationSettings(model=stage_models["text_to_image"], scheduler="EulerDiscreteScheduler",
                                  steps=2, guidance_scale=1.0, height=32, width=32)
    first = BackTranslator(settings, str(tmp_path / "a"))
    seed = sample_seed("syn_ner_000042")
    alone = first(["Dell is trending right now"], [seed])[0]
    # a fresh translator (new pipeline load), with the sample in another batch position
    second = BackTranslator(settings, str(tmp_path / "b"))
    batched = second(["Happy birthday to Ford !", "Dell is trending right now"], [sample_seed("other"), seed])[1]
    assert alone.error is None and not alone.cached
    assert Path(alone.uri).name == Path(batched.uri).name  # same content address
    a = torch.tensor(list(Image.open(alone.uri).getdata()), dtype=torch.int16)
    b = torch.tensor(list(Image.open(batched.uri).getdata()), dtype=torch.int16)
    assert (a - b).abs().max() <= 1  # per-sample generators: batch mates do not change the image
    # another id gets another seed, so another image
    other = first(["Dell is trending right now"], [sample_seed("syn_ner_000043")])[0]
    assert other.uri != alone.uri and Image.open(other.uri).tobytes() != Image.open(alone.uri).tobytes()
    # a cache hit loads nothing and returns the same file
    cached = BackTranslator(settings, str(tmp_path / "a"))(["Dell is trending right now"], [seed])[0]
    assert cached.cached and cached.uri == alone.uri and cached.error is None


class _FailsOnBoom(BackTranslator):
    """A translator whose pipeline breaks on one prompt (like a bad prompt or an OOM would)."""

    calls: list[int] = []

    def generate(self, prompts, seeds):
        self.calls.append(len(prompts))
        if any("BOOM" in p for p in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().generate(prompts, seeds)


def test_a_failing_sample_gets_an_error_and_its_batch_mates_still_come_out(stage_models, tmp_path):
    settings = GenerationSettings(model=stage_models["text_to_image"], scheduler="EulerDiscreteScheduler",
                                  steps=2, guidance_scale=1.0, height=32, width=32)
    translator = _FailsOnBoom(settings, str(tmp_path))
    results = translator(["a red car", "BOOM", "", "a blue sky"], [1, 2, 3, 4])
    assert [r.error is None for r in results] == [True, False, False, True]
    assert "out of memory" in results[1].error and "bad prompt" in results[2].error
    assert results[1].uri is None and results[2].uri is None
    assert translator.calls == [3, 1, 1, 1]  # the batch, then one by one to isolate the culprit
    for r in (results[0], results[3]):
        Image.open(r.uri).verify()
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_grounder_returns_top_k_regions_inside_the_image(stage_models):
    from tmr_core.grounding import PhraseGrounder

    grounder = PhraseGrounder(stage_models["detector"], top_k=3)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    regions = grounder(image, ["a red car", "the sky"])
    assert len(regions) == 3
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    for region in regions:
        x1, y1, x2, y2 = region.box
        assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 40
        assert region.phrase in ("a red car", "the sky")
    assert grounder(image, []) == [] and grounder(image, ["", "  "]) == []


# --------------------------------------------------------------------------- the stage jobs


def test_phrases_from_trees_match_hand_made_expectations(ray_local, tmp_path):
    from jobs import extract_phrases

    sentences = {
        "s1": ("(ROOT (S (NP (NNP Taylor) (NNP Swift)) (VP (VBZ wins) (NP (DT the) (NN award)))))",
               ["Taylor", "Swift", "wins", "the", "award"]),
        # nested NP: the 5-token NP is longer than max_phrase_len 4 and left out, its parts stay
        "s2": ("(ROOT (S (NP (NP (DT the) (NNS streets)) (PP (IN of) (NP (NNP New) (NNP York)))) (VP (VBP glow))))",
               ["the", "streets", "of", "New", "York", "glow"]),
        "s3": ("(ROOT (S (VP (VB Go) (ADVP (RB now)))))", ["Go", "now"]),
    }
    (tmp_path / "trees").mkdir()
    (tmp_path / "trees" / "valid.txt").write_text("".join(f"{k}\t{tree}\n" for k, (tree, _) in sentences.items()))
    rows = [{"id": k, "split": "valid", "task": "ner", "tokens": toks, "tags": ["O"] * len(toks),
             "image_id": k, "image_uri": None} for k, (_, toks) in sentences.items()]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=base_schema("ner")), tmp_path / "in" / "valid.parquet")

    assert extract_phrases.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                 "--parser", "trees", "--trees_dir", str(tmp_path / "trees"),
                                 "--max_phrase_len", "4", "--compute.batch_size", "2"]) == 0
    got = {k: [(p["text"], p["start"], p["end"]) for p in row["phrases"]] for k, row in rows_by_id(tmp_path / "out" / "valid").items()}
    assert got == {
        "s1": [("Taylor Swift", 0, 2), ("the award", 3, 5)],
        "s2": [("the streets", 0, 2), ("New York", 3, 5)],
        "s3": [],
    }
    table = read_table(tmp_path / "out" / "valid")
    assert table.schema.field("phrases").type == STAGE_FIELDS["extract_phrases"][0].type
    assert table.column_names[: len(base_schema("ner"))] == base_schema("ner").names
    marker = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert marker["rows"] == {"valid": 3} and marker["summary"]["phrases"] == 4
    assert (tmp_path / "out" / "config.yaml").is_file()


def test_each_stage_on_the_tiny_benchmark(ray_local, stage_models, stage_benchmark, small_dataset, mde_checkpoint,
                                          tmp_path, capsys):
    from jobs import extract_phrases, generate_back_translations, ground_phrases, score_divergence

    out = {name: tmp_path / name for name in ("phrases", "bt", "regions", "divergence")}
    assert extract_phrases.main(["--input", str(small_dataset), "--output", str(out["phrases"]),
                                 "--parser", "trees", "--trees_dir", str(stage_benchmark / "trees" / "ner")]) == 0
    assert generate_back_translations.main([
        "--input", str(out["phrases"]), "--output", str(out["bt"]), "--cache_uri", str(tmp_path / "cache"),
        "--generation.model", stage_models["text_to_image"], *TINY_GENERATION, "--compute.batch_size", "6"]) == 0
    summary = capsys.readouterr().out
    assert "generated 18 | cached 0 | failed 0" in summary and "images/s" in summary
    assert ground_phrases.main(["--input", str(out["bt"]), "--output", str(out["regions"]),
                                "--detector.model", stage_models["detector"], "--compute.batch_size", "6"]) == 0
    assert score_divergence.main(["--input", str(out["regions"]), "--output", str(out["divergence"]),
                                  "--checkpoint", str(mde_checkpoint), "--compute.batch_size", "6"]) == 0

    for split, n in (("valid", 12), ("test", 6)):
        source = read_table(small_dataset / f"{split}.parquet")
        final = read_table(out["divergence"] / split)
        assert final.num_rows == n and final.column("id").to_pylist() == source.column("id").to_pylist()
        # every stage added its columns, typed as the schema says, and kept the earlier ones as they were
        for field in source.schema:
            assert final.column(field.name).to_pylist() == source.column(field.name).to_pylist()
            assert final.schema.field(field.name).type == field.type
        for fields in STAGE_FIELDS.values():
            for field in fields:
                assert final.schema.field(field.name).type == field.type, field.name
        for row in final.to_pylist():
            assert row["phrases"], row["id"]  # every benchmark sentence has a noun phrase
            with Image.open(row["back_translation_uri"]) as image:
                assert image.size == (32, 32)
            assert row["back_translation_error"] is None
            assert 1 <= len(row["regions"]) <= 3 and 1 <= len(row["back_translation_regions"]) <= 3
            phrase_texts = {p["text"] for p in row["phrases"]}
            assert {r["phrase"] for r in row["regions"]} <= phrase_texts
            assert len(row["divergence"]) == 3 and abs(sum(row["divergence"]) - 1) < 1e-5
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 18

    # A row's α does not depend on which rows Ray Data batched with it (before: up to 2e-7 apart,
    # which the tiny RE model amplified into F1 points between same-seed pipelines).
    assert score_divergence.main(["--input", str(out["regions"]), "--output", str(tmp_path / "rebatched"),
                                  "--checkpoint", str(mde_checkpoint), "--compute.batch_size", "5",
                                  "--score_back_translations", "true"]) == 0
    for split in ("valid", "test"):
        first, again = rows_by_id(out["divergence"] / split), rows_by_id(tmp_path / "rebatched" / split)
        assert {k: r["divergence"] for k, r in first.items()} == {k: r["divergence"] for k, r in again.items()}
        assert all(len(r["back_translation_divergence"]) == 3 for r in again.values())
        assert all(r["back_translation_divergence"] is None for r in first.values())


def test_missing_and_corrupt_images_follow_on_missing_image(ray_local, stage_models, mde_checkpoint, tmp_path, capsys):
    from jobs import ground_phrases, score_divergence

    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (0, 120, 0)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    uris = {"ok": str(good), "gone": str(tmp_path / "missing.png"), "bad": str(corrupt)}
    schema = base_schema("ner").append(STAGE_FIELDS["extract_phrases"][0])
    (tmp_path / "in").mkdir()
    for split in ("train", "test"):
        rows = [{"id": f"{split}-{k}", "split": split, "task": "ner", "tokens": ["a", "car"], "tags": ["O", "O"],
                 "image_id": k, "image_uri": uri, "phrases": [{"text": "a car", "start": 0, "end": 2}]}
                for k, uri in uris.items()]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "in" / f"{split}.parquet")
    common = ["--input", str(tmp_path / "in"), "--detector.model", stage_models["detector"]]

    # skip, through the job: only training rows are left out; a test row keeps its place with
    # empty regions and the reason, so the test set never shrinks (the extractor reads a zero image)
    assert ground_phrases.main([*common, "--output", str(tmp_path / "skip"), "--on_missing_image", "skip"]) == 0
    assert set(rows_by_id(tmp_path / "skip" / "train")) == {"train-ok"}
    test_rows = rows_by_id(tmp_path / "skip" / "test")
    assert set(test_rows) == {"test-ok", "test-gone", "test-bad"}
    assert len(test_rows["test-ok"]["regions"]) == 3 and test_rows["test-ok"]["image_error"] is None
    for k in ("test-gone", "test-bad"):
        assert test_rows[k]["regions"] == [] and uris[k[5:]] in test_rows[k]["image_error"], k
    summary = json.loads((tmp_path / "skip" / "_SUCCESS.json").read_text())["summary"]
    assert summary["dropped"] == 2 and summary["missing_images"] == 4
    assert "missing images 4 (skip; training rows dropped 2)" in capsys.readouterr().out

    # score_divergence keeps them too: a null score for the flagged rows, whatever its own policy
    assert score_divergence.main(["--input", str(tmp_path / "skip"), "--output", str(tmp_path / "div"),
                                  "--checkpoint", str(mde_checkpoint), "--on_missing_image", "error"]) == 0
    scored = rows_by_id(tmp_path / "div" / "test")
    assert set(scored) == set(test_rows) and len(scored["test-ok"]["divergence"]) == 3
    assert scored["test-gone"]["divergence"] is None and scored["test-bad"]["divergence"] is None

    # keep and error, on the stage's callable (same code the actors run)
    batch = pq.read_table(tmp_path / "in" / "test.parquet")
    keep = ground_phrases.GroundPhrases(parse_config(ground_phrases.Config, [*common, "--on_missing_image", "keep"]))
    kept = {row["id"]: row for row in keep(batch).to_pylist()}
    assert len(kept["test-ok"]["regions"]) == 3 and kept["test-gone"]["regions"] == [] and kept["test-bad"]["regions"] == []
    assert [kept[f"test-{k}"]["_stat_missing_images"] for k in ("ok", "gone", "bad")] == [0, 1, 1]
    assert not any(row["_drop"] for row in kept.values())
    strict = ground_phrases.GroundPhrases(parse_config(ground_phrases.Config, [*common, "--on_missing_image", "error"]))
    with pytest.raises(FileNotFoundError, match="'test-gone'.*missing.png.*on_missing_image"):
        strict(batch)


# --------------------------------------------------------------------------- CUDA (gpu marker, off by default)


@pytest.mark.gpu
def test_fp16_generation_on_cuda_through_the_job(ray_local, stage_models, small_dataset, tmp_path, capsys):
    from jobs import generate_back_translations

    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    settings = GenerationSettings(model=stage_models["text_to_image"], scheduler="EulerDiscreteScheduler", steps=2,
                                  guidance_scale=1.0, height=32, width=32, dtype="float16", device="cuda")
    translator = BackTranslator(settings, str(tmp_path / "direct"))
    assert translator.pipeline.unet.dtype == torch.float16 and translator.pipeline.device.type == "cuda"
    results = translator(["Dell is trending right now", "Happy birthday to Ford !"], [1, 2])
    assert all(r.error is None for r in results)
    again = BackTranslator(settings, str(tmp_path / "again"), pipeline=translator.pipeline)(["Dell is trending right now"], [1])[0]
    assert Image.open(again.uri).tobytes() == Image.open(results[0].uri).tobytes()  # seeded CUDA generators

    assert generate_back_translations.main([
        "--input", str(small_dataset), "--output", str(tmp_path / "bt"), "--cache_uri", str(tmp_path / "cache"),
        "--generation.model", stage_models["text_to_image"], *TINY_GENERATION, "--generation.dtype", "float16",
        "--generation.device", "cuda", "--compute.num_gpus", "1", "--compute.batch_size", "6"]) == 0
    assert "generated 18 | cached 0 | failed 0" in capsys.readouterr().out


def test_an_image_the_mde_cannot_read_follows_the_policy(stage_models, mde_checkpoint, tmp_path):
    from jobs import score_divergence

    thin, good = tmp_path / "thin.png", tmp_path / "good.png"
    Image.new("RGB", (2000, 2), (0, 0, 0)).save(thin)  # decodes, but ViLT's resize cannot take it
    Image.new("RGB", (32, 32), (0, 120, 0)).save(good)
    rows = [{"id": k, "split": "test", "task": "ner", "tokens": ["a", "car"], "tags": ["O", "O"], "image_id": k,
             "image_uri": str(path)} for k, path in (("thin", thin), ("good", good))]
    batch = pa.Table.from_pylist(rows, schema=base_schema("ner"))
    common = ["--checkpoint", str(mde_checkpoint), "--micro_batch_size", "2"]
    keep = score_divergence.ScoreDivergence(parse_config(score_divergence.Config, [*common, "--on_missing_image", "keep"]))
    scored = {r["id"]: r for r in keep(batch).to_pylist()}
    assert scored["thin"]["divergence"] is None and len(scored["good"]["divergence"]) == 3
    strict = score_divergence.ScoreDivergence(parse_config(score_divergence.Config, [*common, "--on_missing_image", "error"]))
    with pytest.raises(ValueError, match="'thin'.*cannot score"):
        strict(batch)
