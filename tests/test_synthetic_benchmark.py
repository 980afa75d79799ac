"""The synthetic benchmark: same bytes per seed, real formats, and images that decide what text leaves open."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import make_synthetic_benchmark as job
from tmr_core import synthetic as syn
from tmr_core.readers import chunk_entities, re_sample_ids, read_mnre, read_rel2id, read_twitter_ner

SMALL = dict(ner_sizes=(24, 8, 8), re_sizes=(24, 8, 8), mde_sizes=(40, 8, 8, 8))
# sha256 over (relative path, content) of every file of the tiny version-1 benchmark, seed 0, as it
# was before version 2 existed (parquet tables compared up to the absolute image_uri root)
V1_TINY_SEED0_SHA256 = "e03c863f6bb8ec2f255be093e33b60b520d5cf0134e9999e063b189e98166066"


@pytest.fixture(scope="module")
def v1_benchmark(tmp_path_factory) -> Path:
    """The tiny preset in the version-1 world (the ``tiny_benchmark`` fixture is the default, version 2)."""
    out = tmp_path_factory.mktemp("tiny-benchmark-v1")
    syn.make_synthetic_benchmark(out, syn.preset("tiny", seed=0, version=1))
    return out


def _tree_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for name in syn.list_files(root):
        if name.endswith(".parquet"):
            data = json.dumps(_table_with_relative_uris(root / name, root.resolve()), sort_keys=True).encode()
        else:
            data = (root / name).read_bytes()
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _table_with_relative_uris(path: Path, root: Path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["image_uri"] = str(Path(row["image_uri"]).relative_to(root))
    return rows


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    cfg = syn.preset("tiny", seed=3, **SMALL)
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    syn.make_synthetic_benchmark(first, cfg)
    syn.make_synthetic_benchmark(second, cfg)
    syn.make_synthetic_benchmark(other, syn.preset("tiny", seed=4, **SMALL))
    files = syn.list_files(first)
    assert files == syn.list_files(second)
    assert len([f for f in files if f.startswith("images/")]) == 80
    for name in files:
        if name.endswith(".parquet"):  # image_uri is absolute, so compare the tables up to the root
            assert _table_with_relative_uris(first / name, first) == _table_with_relative_uris(second / name, second)
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "ner" / "train.txt").read_bytes() != (other / "ner" / "train.txt").read_bytes()


def test_files_round_trip_through_the_readers(tiny_benchmark):
    truth = {row["id"]: row for row in syn.read_ground_truth(tiny_benchmark / "ground_truth.jsonl")}
    seen_ids: set[str] = set()
    for split in ("train", "valid", "test"):
        path = tiny_benchmark / "ner" / f"{split}.txt"
        assert path.read_text().endswith("\n\n") and "\n\n\n" not in path.read_text()
        for sentence in read_twitter_ner(path):
            row = truth[sentence.image_id]
            assert row["split"] == split and re.fullmatch(r"syn_ner_\d{6}", sentence.image_id)
            gold = [(m["type"], m["start"], m["end"]) for m in row["mentions"]]
            assert chunk_entities(sentence.tags) == gold
            assert (tiny_benchmark / "images" / f"{sentence.image_id}.png").is_file()
            seen_ids.add(sentence.image_id)

    rel2id_text = (tiny_benchmark / "re" / "ours_rel2id.json").read_text()
    assert " " not in rel2id_text and "\n" not in rel2id_text
    rel2id = read_rel2id(tiny_benchmark / "re" / "ours_rel2id.json")
    assert list(rel2id)[0] == "None" and rel2id["None"] == 0
    real = read_rel2id(Path(__file__).resolve().parents[1].parent / "shared" / "tmr-data" / "mnre" / "ours_rel2id.json")
    assert set(rel2id) <= set(real)
    for split, file_split in (("train", "train"), ("valid", "val"), ("test", "test")):
        path = tiny_benchmark / "re" / f"ours_{file_split}.txt"
        lines = path.read_text().splitlines()
        for line in lines:  # exactly repr(dict) in MNRE key order
            record = ast.literal_eval(line)
            assert list(record) == ["token", "h", "t", "img_id", "relation"] and repr(record) == line
        instances = read_mnre(path, rel2id)
        ids = re_sample_ids(instances, path)
        assert len(ids) == len(lines) == 2 * len({i.image_id for i in instances})
        for sample_id, inst in zip(ids, instances, strict=True):
            row = truth[sample_id]
            assert row["split"] == split and row["relation"] == inst.relation
            assert (row["head"], row["tail"]) == (inst.head.name, inst.tail.name)
            assert (tiny_benchmark / "images" / inst.image_id).is_file()
            seen_ids.add(sample_id)
    assert seen_ids == set(truth), "every ground-truth row belongs to a sample in the data files"


def _rows(bench_dir: Path) -> list[dict]:
    return syn.read_ground_truth(bench_dir / "ground_truth.jsonl")


def test_alignment_fractions_and_ambiguity_follow_the_config(tiny_benchmark):
    rows = _rows(tiny_benchmark)
    wanted = dict(zip(("strengthen", "complement", "weaken"), syn.PRESETS["tiny"].alignment_fractions, strict=True))
    for task in ("ner", "re"):
        for split in ("train", "valid", "test"):
            units = [r for r in rows if r["task"] == task and r["split"] == split and (task == "ner" or r["id"].endswith("-0"))]
            counts = Counter(r["alignment"] for r in units)
            for category, fraction in wanted.items():
                assert abs(counts[category] / len(units) - fraction) <= 1 / len(units) + 1e-9, (task, split, category)
    # ambiguous <=> a focus name in a neutral context, which only complement samples have
    for row in rows:
        flags = [m["ambiguous"] for m in row["mentions"]] if row["task"] == "ner" else [row["ambiguous"]]
        assert any(flags) == (row["alignment"] == "complement" and (row["task"] == "ner" or row["id"].endswith("-0")))
    stats = json.loads((tiny_benchmark / "stats.json").read_text())
    expected_mentions = 1 + sum(k * p for k, p in enumerate(syn.PRESETS["tiny"].suffix_probs))
    assert stats["ner"]["ambiguous_share"] == pytest.approx(wanted["complement"] / expected_mentions, abs=0.04)
    assert stats["re"]["ambiguous_share"] == pytest.approx(wanted["complement"] / 2, abs=0.01)


def _glyph_pixel_counts(path: Path) -> Counter:
    colours = {rgb: etype for etype, kind in syn.TYPE_GLYPH.items() for rgb in [syn.GLYPHS[kind][1]]}
    return Counter(colours[p] for p in Image.open(path).convert("RGB").getdata() if p in colours)


def test_version_1_is_still_the_same_bytes(v1_benchmark):
    assert _tree_sha256(v1_benchmark) == V1_TINY_SEED0_SHA256
    assert "objects" not in _rows(v1_benchmark)[0]


def test_v1_the_largest_glyph_is_the_focus_type_unless_the_pair_is_weakened(v1_benchmark):
    """Version 1: a weakened sample shows another sample's image, of another type."""
    for row in _rows(v1_benchmark):
        if row["task"] != "ner" or row["split"] != "test":
            continue
        focus = next(m for m in row["mentions"] if m["context"] != "fixed")
        image = v1_benchmark / "images" / f"{row['id']}.png"
        shown = _glyph_pixel_counts(image).most_common(1)[0][0]
        if row["alignment"] == "weaken":
            assert shown != focus["type"]
            assert image.read_bytes() == (v1_benchmark / "images" / f"{row['image_from']}.png").read_bytes()
        else:
            assert shown == focus["type"] and row["image_from"] is None


def _focus(row: dict) -> dict:
    return next(m for m in row["mentions"] if m["context"] != "fixed")


def _colour_mask(image: np.ndarray, kind: str) -> np.ndarray:
    return (image == np.array(syn.GLYPHS[kind][1])).all(-1)


def _box_mask(box: list[float]) -> np.ndarray:
    """Pixels a box covers: the renderer paints its end coordinates too, so they are inclusive."""
    x1, y1, x2, y2 = (math.floor(v) for v in box)
    mask = np.zeros((64, 64), dtype=bool)
    mask[y1:y2 + 1, x1:x2 + 1] = True
    return mask


def test_v2_ner_images_show_one_object_of_a_type_the_focus_name_allows(tiny_benchmark):
    """Every glyph is listed with its box, its colour lies in its box only, boxes do not overlap,
    exactly one object has an allowed type, and it is the focus mention's (or absent when weakened)."""
    type_of = {kind: etype for etype, kind in syn.TYPE_GLYPH.items()}
    checked = 0
    for row in _rows(tiny_benchmark):
        if row["task"] != "ner":
            continue
        image = np.asarray(Image.open(tiny_benchmark / "images" / f"{row['id']}.png").convert("RGB"))
        kinds = [o["kind"] for o in row["objects"]]
        assert len(set(kinds)) == len(kinds) and 2 <= len(kinds) <= 5, row["id"]
        covered = np.zeros((64, 64), dtype=int)
        for obj in row["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and 10 <= x2 - x1 == y2 - y1 <= 18
            colour, inside = _colour_mask(image, obj["kind"]), _box_mask(obj["box"])
            assert not (colour & ~inside).any(), (row["id"], obj)  # the colour is in the box only
            assert (colour & inside).sum() > 0.3 * (x2 - x1) * (y2 - y1), (row["id"], obj)  # a bar fills a third
            covered += inside
        assert covered.max() == 1, row["id"]  # no two boxes share a pixel
        focus = _focus(row)
        if row["alignment"] == "weaken":
            assert all(m["box"] is None for m in row["mentions"])
            assert syn.TYPE_GLYPH[focus["type"]] not in kinds
            donor = tiny_benchmark / "images" / f"{row['image_from']}.png"
            assert (tiny_benchmark / "images" / f"{row['id']}.png").read_bytes() == donor.read_bytes()
            continue
        allowed = [o for o in row["objects"] if type_of.get(o["kind"]) in syn.AMBIGUOUS_NAMES[focus["text"]]]
        assert len(allowed) == 1 and allowed[0]["box"] == focus["box"], row["id"]
        assert allowed[0]["kind"] == syn.TYPE_GLYPH[focus["type"]]
        for mention in row["mentions"]:
            assert row["objects"][kinds.index(syn.TYPE_GLYPH[mention["type"]])]["box"] == mention["box"]
        checked += 1
    assert checked > 400


def test_v2_re_rows_box_the_head_and_tail_and_distractors_are_no_type(tiny_benchmark):
    type_kinds = set(syn.TYPE_GLYPH.values())
    rows = {r["id"]: r for r in _rows(tiny_benchmark) if r["task"] == "re"}
    distractors = 0
    for row_id, row in rows.items():
        kinds = [o["kind"] for o in row["objects"]]
        assert kinds[0] in type_kinds and kinds[1] in type_kinds and not set(kinds[2:]) & type_kinds and len(kinds) <= 3
        distractors += len(kinds) > 2
        if row["alignment"] == "weaken":
            assert row["head_box"] is None and row["tail_box"] is None
            continue
        focus_row = rows[row_id[:-1] + "0"]
        head, tail = focus_row["objects"][0]["box"], focus_row["objects"][1]["box"]
        assert head[2] < 32 < tail[0]  # head left, tail right
        image = np.asarray(Image.open(tiny_benchmark / "images" / f"{row_id[:-2]}.png").convert("RGB"))
        for obj in row["objects"]:  # head and tail can be the same kind (peer, contain)
            same_kind = np.any([_box_mask(o["box"]) for o in row["objects"] if o["kind"] == obj["kind"]], axis=0)
            colour = _colour_mask(image, obj["kind"])
            assert (colour & _box_mask(obj["box"])).any() and not (colour & ~same_kind).any(), (row_id, obj)
        expected = (head, tail) if row_id.endswith("-0") else (tail, head)
        assert (row["head_box"], row["tail_box"]) == expected
    assert 0.3 < distractors / len(rows) < 0.7


def test_re_images_link_the_pair_exactly_when_related(tiny_benchmark):
    for row in _rows(tiny_benchmark):
        if row["task"] != "re" or row["split"] != "valid" or not row["id"].endswith("-0") or row["alignment"] == "weaken":
            continue
        pixels = Image.open(tiny_benchmark / "images" / f"{row['id'][:-2]}.png").convert("RGB").getdata()
        linked = any(p == (0, 0, 0) for p in pixels)
        assert linked == (row["relation"] != "None"), row["id"]


def test_text_only_ceiling_is_the_bayes_rate_of_the_generator(tiny_benchmark):
    rows = _rows(tiny_benchmark)
    ambiguous = [m for r in rows if r["task"] == "ner" and r["split"] == "test" for m in r["mentions"] if m["ambiguous"]]
    by_hand = sum(1 / len(syn.AMBIGUOUS_NAMES[m["text"]]) for m in ambiguous) / len(ambiguous)
    ceiling = syn.text_only_ceiling(rows, "ner", "test")
    assert ceiling == pytest.approx(by_hand)
    assert 0.35 < ceiling < 0.5
    # a text-only rule fitted on train (majority type per name) does no better on test than the ceiling allows
    train_types = defaultdict(Counter)
    for r in rows:
        if r["task"] == "ner" and r["split"] == "train":
            for m in r["mentions"]:
                if m["ambiguous"]:
                    train_types[m["text"]][m["type"]] += 1
    hits = [train_types[m["text"]].most_common(1)[0][0] == m["type"] if train_types[m["text"]] else False for m in ambiguous]
    tolerance = 2.5 * (ceiling * (1 - ceiling) / len(ambiguous)) ** 0.5
    assert sum(hits) / len(hits) <= ceiling + tolerance

    re_ceiling = syn.text_only_ceiling(rows, "re", "test")
    assert 0.2 < re_ceiling < 0.6
    # In the metric the extractor is scored with: NER entity F1 = accuracy of the guess at every
    # ambiguous mention; RE micro F1 without None, which differs from the accuracy that counts None.
    assert syn.text_only_f1(rows, "ner", "test") == syn.text_only_accuracy(rows, "ner", "test")
    from tmr_core.metrics import re_scores

    items = [r for r in rows if r["task"] == "re" and r["split"] == "test" and r["ambiguous"]]
    expected = re_scores([r["relation"] for r in items], [r["text_only_best_guess"] for r in items])["f1"]
    assert syn.text_only_f1(rows, "re", "test") == expected != syn.text_only_accuracy(rows, "re", "test")
    with pytest.raises(ValueError, match="task must be"):
        syn.text_only_ceiling(rows, "mde")


def test_re_posterior_matches_the_generator_frequencies():
    """For every head name, the posterior summed over sentences predicts how often each relation occurs.

    That is the defining property of P(relation | text) for any function of the text; a posterior
    that ignored the names (e.g. the prior) fails it, since names rule types in or out.
    """
    cfg = syn.preset("tiny", alignment_fractions=(0.0, 1.0, 0.0))
    sentences = syn.generate_re_split(cfg, "train", 8000, 0)
    expected, variance, observed = defaultdict(float), defaultdict(float), Counter()
    for s in sentences:
        focus = s.instances[0]
        head, tail = (" ".join(s.tokens[a:b]) for a, b in (focus.head, focus.tail))
        posterior = syn.re_text_posterior(head, tail, "neutral", cfg.re_none_prob)
        assert sum(posterior.values()) == pytest.approx(1.0)
        assert focus.text_only_p == pytest.approx(max(posterior.values()))
        for relation, p in posterior.items():
            expected[head, relation] += p
            variance[head, relation] += p * (1 - p)
        observed[head, focus.relation] += 1
    assert set(observed) <= set(expected), "a relation occurred that the posterior rules out"
    for key, mean in expected.items():
        assert abs(observed[key] - mean) <= 4 * variance[key] ** 0.5 + 1, key


def test_mde_corpus_has_the_paper_ratio_and_every_style_carries_every_label(tiny_benchmark):
    for split in syn.MDE_SPLITS:
        table = pq.read_table(tiny_benchmark / "mde" / f"{split}.parquet")
        assert table.column_names == ["id", "caption", "image_uri", "label", "source", "objects_named", "objects_shown"]
        rows = table.to_pylist()
        labels = Counter(r["label"] for r in rows)
        assert labels["weaken"] == 2 * labels["strengthen"] == 2 * labels["complement"] > 0
        sources = {(r["source"], r["label"]) for r in rows}
        styles = ("sbu_like",) if split == "test_out_of_domain" else ("coco_like", "laion_like")
        # version 2: no style is a label shortcut (version 1's coco_like = strengthen, laion_like = complement)
        assert sources == {(style, lab) for style in styles for lab in ("strengthen", "complement", "weaken")}
        assert all(Path(r["image_uri"]).is_absolute() and Path(r["image_uri"]).is_file() for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)


def test_mde_captions_name_all_some_or_none_of_the_shown_objects():
    rows, scenes = syn.generate_mde_split(syn.preset("tiny"), "test_out_of_domain", 400)
    for row in rows:
        named = {kind for kind in syn.GLYPHS if kind in row.caption.lower()}
        shown = {g.kind for g in scenes[row.image_name].glyphs}
        if row.label == "strengthen":
            assert named == shown
        elif row.label == "complement":
            assert named and named < shown
        else:
            assert named and not named & shown


def test_job_writes_config_stats_and_rejects_bad_fractions(tmp_path, capsys):
    out = tmp_path / "bench"
    assert job.main(["--out", str(out), "--ner_sizes", "[8,4,4]", "--re_sizes", "[8,4,4]", "--mde_sizes", "[16,4,4,4]"]) == 0
    assert (out / "config.yaml").is_file() and json.loads((out / "stats.json").read_text())["ner"]["samples"]["train"] == 8
    printed = capsys.readouterr().out
    assert "best text-only model" in printed and "world v2: the largest type colour is the focus type on" in printed
    from jobs._config import ConfigError

    with pytest.raises(ConfigError, match="alignment_fractions"):
        job.main(["--out", str(out), "--alignment_fractions", "[0.5,0.6,0.1]"])


def _histogram_rule_accuracy(bench_dir: Path) -> float:
    """On NER test images that show the focus object: is the type whose colour covers most pixels the focus type?"""
    hits = [
        _glyph_pixel_counts(bench_dir / "images" / f"{row['id']}.png").most_common(1)[0][0] == _focus(row)["type"]
        for row in _rows(bench_dir)
        if row["task"] == "ner" and row["split"] == "test" and row["image_from"] is None
    ]
    return sum(hits) / len(hits)


def test_a_global_colour_histogram_decides_version_1_but_not_version_2(tiny_benchmark, v1_benchmark):
    v1, v2 = _histogram_rule_accuracy(v1_benchmark), _histogram_rule_accuracy(tiny_benchmark)
    assert v1 == 1.0 and v2 < 0.7
    world = json.loads((tiny_benchmark / "stats.json").read_text())["world"]
    assert world["version"] == 2 and world["histogram_rule_accuracy"] == pytest.approx(v2)
    assert world["median_focus_area_share"] < 0.06
    assert syn.image_evidence(syn.generate_benchmark(syn.preset("tiny", seed=0, version=1)))["histogram_rule_accuracy"] == 1.0
    assert all(share > 0 for task in ("ner", "re") for share in world["weaken_share"][task].values())


def test_version_2_has_weaken_samples_in_every_split_even_where_rounding_gives_none():
    import random

    fractions = syn.PRESETS["tiny"].alignment_fractions
    assert "weaken" not in syn._alignments(random.Random(0), 2, fractions)
    assert "weaken" in syn._alignments(random.Random(0), 2, fractions, weaken_in_every_split=True)
    bench = syn.generate_benchmark(syn.preset("tiny", seed=1, ner_sizes=(40, 8, 4), re_sizes=(40, 8, 4), mde_sizes=(8, 8, 8, 8)))
    for task in (bench.ner, bench.re):
        for split, samples in task.items():
            assert any(s.alignment == "weaken" and s.image_from for s in samples), split


def test_place_glyphs_puts_every_glyph_whole_and_apart():
    import random

    kinds = ["red circle", "green triangle", "purple cross", "orange bar", "blue square"]
    for seed in range(50):
        scene = syn.place_glyphs(random.Random(seed), kinds, 64)
        assert [g.kind for g in scene.glyphs] == kinds
        boxes = [syn.glyph_box(g, 64) for g in scene.glyphs]
        for g, (x1, y1, x2, y2) in zip(scene.glyphs, boxes, strict=True):
            assert 10 <= g.size <= 18 and 0 < x1 and 0 < y1 and x2 < 64 and y2 < 64
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]
    assert syn.place_glyphs(random.Random(3), kinds, 64) == syn.place_glyphs(random.Random(3), kinds, 64)
    with pytest.raises(ValueError, match="cannot place"):
        syn.place_glyphs(random.Random(0), ["red circle"] * 30, 64)
    with pytest.raises(ValueError, match="not glyphs"):
        syn.place_glyphs(random.Random(0), ["pink star"], 64)


def test_version_is_checked_and_the_tokenizer_corpus_covers_both_versions(tmp_path):
    from jobs._config import ConfigError

    with pytest.raises(ValueError, match="version must be one of"):
        syn.SyntheticConfig(version=3)
    with pytest.raises(ConfigError, match="version"):
        job.main(["--out", str(tmp_path), "--version", "3"])
    corpus = set(syn.synthetic_corpus())
    for version in syn.WORLD_VERSIONS:
        bench = syn.generate_benchmark(syn.preset("tiny", version=version))
        assert {" ".join(s.tokens) for split in bench.ner.values() for s in split} <= corpus, version
        assert {r.caption for rows in bench.mde.values() for r in rows} <= corpus, version
