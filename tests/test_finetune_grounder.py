"""The phrase grounder: its probe on hand-made boxes, the DETR-style loss, and the training job.

The probe (``tmr_core.grounding.grounding_recall``) and the loss (``tmr_core.grounder_training``)
are checked on boxes whose answers are known by hand; ``jobs.finetune_grounder`` then trains the
tiny OWL-ViT in Ray Train local mode on the tiny synthetic benchmark (version 2: boxes) and must
turn a detector that finds no mention's object into one that finds most of them, save a folder
``PhraseGrounder`` loads, register ``tmr-grounder@champion`` and resume a resubmitted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tmr_core.grounder_training import (
    GrounderCollator,
    GroundingLossConfig,
    grounding_examples,
    grounding_loss,
    normalise_boxes,
)
from tmr_core.grounding import grounding_recall, regions_recall, shown_boxes

# --------------------------------------------------------------------------- the probe on hand-made boxes


def test_grounding_recall_counts_iou_hits_within_the_top_k_and_zero_area_boxes():
    gold = [[[0, 0, 10, 10]], [[20, 20, 30, 30], [40, 40, 50, 50]], [[0, 0, 10, 10]], []]
    predicted = [
        [[1, 1, 10, 10], [5, 5, 5, 9]],  # IoU 0.81: found; the second box has no width
        [[0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 5, 5], [20, 20, 30, 30]],  # the right box is 4th: not in the top 3
        [[0, 0, 10, 4.9]],  # IoU 0.49: just missed
        [[0, 0, 64, 64]],  # nothing to find: only counts as a returned box
    ]
    scores = grounding_recall(predicted, gold, iou_threshold=0.5, top_k=3)
    assert (scores["found"], scores["support"]) == (1, 4) and scores["recall"] == pytest.approx(0.25)
    assert scores["boxes"] == 2 + 3 + 1 + 1 and scores["zero_area_share"] == pytest.approx(1 / 7)
    assert grounding_recall(predicted, gold, top_k=4)["found"] == 2
    assert grounding_recall(predicted, gold, iou_threshold=0.45)["found"] == 2
    assert grounding_recall([[]], [[]]) == {"recall": 0.0, "found": 0.0, "support": 0.0, "zero_area_share": 0.0,
                                            "boxes": 0.0, "samples": 1.0}
    with pytest.raises(ValueError, match="one list per sample"):
        grounding_recall(predicted, gold[:2])


def test_shown_boxes_keep_the_objects_an_image_shows():
    ner = {"task": "ner", "mentions": [{"text": "Jordan", "box": [1, 2, 11, 12]}, {"text": "NASA", "box": None}]}
    re_row = {"task": "re", "head": "Paris", "tail": "Lincoln", "head_box": [0, 0, 9, 9], "tail_box": None}
    assert shown_boxes(ner) == [("Jordan", [1.0, 2.0, 11.0, 12.0])]
    assert shown_boxes(re_row) == [("Paris", [0.0, 0.0, 9.0, 9.0])]
    assert shown_boxes({"task": "ner", "mentions": [{"text": "Jordan"}]}) == []  # version 1: no boxes


def test_examples_target_exactly_the_phrases_equal_to_a_shown_mention():
    truth = {
        "n1": {"task": "ner", "mentions": [{"text": "Jordan", "box": [8, 8, 20, 20]}, {"text": "NASA", "box": [30, 30, 44, 44]}]},
        "n2": {"task": "ner", "mentions": [{"text": "Paris", "box": None}]},  # weaken: a donor image
        "r-0": {"task": "re", "head": "Paris", "tail": "Lincoln", "head_box": [2, 2, 14, 14], "tail_box": [40, 2, 52, 14]},
        "r-1": {"task": "re", "head": "Lincoln", "tail": "Paris", "head_box": [40, 2, 52, 14], "tail_box": [2, 2, 14, 14]},
    }
    phrases = lambda *texts: [{"text": t, "start": 0, "end": 1} for t in texts]  # noqa: E731
    rows = [
        {"id": "n1", "task": "ner", "image_uri": "n1.png", "phrases": phrases("Jordan", "a new photo", "NASA")},
        {"id": "n2", "task": "ner", "image_uri": "n2.png", "phrases": phrases("Paris", " ")},
        {"id": "r-0", "task": "re", "image_uri": "r.png", "phrases": phrases("Paris", "Lincoln")},
        {"id": "r-1", "task": "re", "image_uri": "r.png", "phrases": phrases("Paris", "Lincoln")},
        {"id": "n3", "task": "ner", "image_uri": "n3.png", "phrases": []},  # nothing to ground: skipped
    ]
    n1, n2, pair = grounding_examples(rows, truth)
    assert n1["queries"] == ["Jordan", "a new photo", "NASA"] and n1["target_queries"] == [0, 2]
    assert n1["target_boxes"] == [[8, 8, 20, 20], [30, 30, 44, 44]] == n1["gold_boxes"]
    assert n2["queries"] == ["Paris"] and n2["target_boxes"] == n2["gold_boxes"] == []  # the phrase must stay quiet
    # an MNRE sentence's two instances: one image, one phrase list, one example with both boxes
    assert pair["target_queries"] == [0, 1] and len(pair["gold_boxes"]) == 2
    with pytest.raises(KeyError, match="no row for sample 'x'"):
        grounding_examples([{"id": "x", "image_uri": "x.png", "phrases": phrases("a")}], truth)


# --------------------------------------------------------------------------- the loss


def _scene(batch: int = 1, boxes: int = 6, queries: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, boxes, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(batch, boxes, 2, generator=generator) * 0.2 + 0.05
    logits = torch.full((batch, boxes, queries), -6.0)
    return logits, torch.cat([centres, sizes], dim=-1)


def _in_listed_order(outputs, targets):
    """A 'matcher' that pairs the i-th prediction with the i-th target: what a broken one would do."""
    return [(torch.arange(len(t["boxes"])), torch.arange(len(t["boxes"]))) for t in targets]


def test_a_perfect_prediction_has_no_box_loss_and_permuted_targets_are_matched():
    logits, pred_boxes = _scene()
    logits[0, 4, 1] = logits[0, 1, 0] = 6.0  # box 4 answers query 1, box 1 answers query 0
    targets = [{"class_labels": torch.tensor([1, 0]), "boxes": pred_boxes[0, [4, 1]].clone()}]  # listed out of order
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = GroundingLossConfig()
    out = grounding_loss(logits, pred_boxes, mask, targets, cfg)
    assert out.matched == 2 and out.loss_bbox < 1e-6 and out.loss_giou < 1e-6
    assert out.loss_class < 0.01  # every logit is confidently right
    broken = grounding_loss(logits, pred_boxes, mask, targets, cfg, matcher=_in_listed_order)
    assert broken.loss_bbox > 0.1 and broken.loss_giou > 0.1 and broken.loss > out.loss + 1
    # a box in the wrong place costs box loss, and the loss pulls it towards the target
    moved = pred_boxes.clone().requires_grad_(True)
    shifted = moved + torch.tensor([0.1, 0.0, 0.0, 0.0])
    loss = grounding_loss(logits, shifted, mask, targets, cfg)
    assert loss.loss_bbox > 0.1
    loss.loss.backward()
    assert moved.grad[0, [4, 1], 0].gt(0).all()  # descending the gradient moves both boxes back left


def test_padded_queries_take_no_part_and_an_image_without_targets_only_learns_to_stay_quiet():
    logits, pred_boxes = _scene(batch=2, queries=3)
    mask = torch.tensor([[True, True, True], [True, False, False]])  # image 1 has one real query
    targets = [{"class_labels": torch.tensor([2]), "boxes": pred_boxes[0, [3]].clone()},
               {"class_labels": torch.tensor([], dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    cfg = GroundingLossConfig()
    base = grounding_loss(logits, pred_boxes, mask, targets, cfg)
    noisy = logits.clone()
    noisy[1, :, 1:] = 50.0  # padded queries' logits: ignored
    assert grounding_loss(noisy, pred_boxes, mask, targets, cfg).loss.item() == pytest.approx(base.loss.item())
    loud = logits.clone()
    loud[1, :, 0] = 5.0  # the target-less image's real query fires everywhere: classification loss
    assert grounding_loss(loud, pred_boxes, mask, targets, cfg).loss_class > base.loss_class + 1
    with pytest.raises(ValueError, match="padded or missing query"):
        grounding_loss(logits, pred_boxes, mask, [targets[0], {"class_labels": torch.tensor([1]),
                                                                "boxes": pred_boxes[1, [0]]}], cfg)


def test_boxes_are_normalised_as_the_detector_predicts_them(tiny_models, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    assert normalise_boxes([[0, 0, 50, 50]], 100, 50, square=False).tolist() == [[0.25, 0.5, 0.5, 1.0]]
    assert normalise_boxes([[0, 0, 50, 50]], 100, 50, square=True).tolist() == [[0.25, 0.25, 0.5, 0.5]]  # OWLv2 pads
    images = {f"{i}.png": Image.new("RGB", (64, 64), (200, 200, 200)) for i in range(2)}
    collate = GrounderCollator(AutoProcessor.from_pretrained(tiny_models["detector"]), images.__getitem__)
    batch = collate([
        {"image_uri": "0.png", "queries": ["Jordan"], "target_boxes": [[16, 16, 32, 48]], "target_queries": [0]},
        {"image_uri": "1.png", "queries": ["Paris", "a photo", "NASA"], "target_boxes": [], "target_queries": []},
    ])
    assert batch["query_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["targets"][0]["boxes"].tolist() == [[0.375, 0.5, 0.25, 0.5]] and batch["targets"][1]["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------- the job


def phrase_tables(benchmark: Path, out: Path) -> list[Path]:
    """prepare_dataset + the gold trees' noun phrases (extract_phrases --parser trees, without Ray)."""
    from jobs import prepare_dataset
    from tmr_core.phrases import noun_phrases, read_trees_file

    tables = []
    for task, max_len in (("ner", 4), ("re", 6)):
        folder = out / f"phrases-{task}"
        assert prepare_dataset.main(["--format", "synthetic", "--task", task, "--data_dir", str(benchmark),
                                     "--output", str(folder)]) == 0
        for split in ("train", "valid", "test"):
            table = pq.read_table(folder / f"{split}.parquet")
            trees = read_trees_file(benchmark / "trees" / task / f"{split}.txt")
            keys = zip(table.column("image_id").to_pylist(), table.column("id").to_pylist(), strict=True)
            phrases = [[{"text": p.text, "start": p.start, "end": p.end}
                        for p in noun_phrases(trees.get(image_id, trees.get(sample_id)), max_len)]
                       for image_id, sample_id in keys]
            pq.write_table(table.append_column("phrases", pa.array(phrases)), folder / f"{split}.parquet")
        (folder / "_SUCCESS.json").unlink()  # the tables changed after prepare_dataset's marker
        tables.append(folder)
    return tables


def test_finetune_grounder_learns_to_find_the_objects_saves_registers_and_resumes(
        ray_local, tiny_models, tiny_benchmark, tmp_path, repo_root, monkeypatch):
    from jobs import _tracking, finetune_grounder
    from tmr_core.grounding import PhraseGrounder
    from tmr_core.images import load_image

    monkeypatch.chdir(repo_root)
    ner, re_ = phrase_tables(tiny_benchmark, tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", "configs/finetune_grounder.tiny.yaml", "--data.datasets", f"[{ner},{re_}]",
            "--data.ground_truth", str(tiny_benchmark / "ground_truth.jsonl"), "--model.detector", tiny_models["detector"],
            "--output", str(tmp_path / "out"), "--ray.storage_path", str(tmp_path / "ray"), "--ray.name", "grounder-run",
            "--tracking.tracking_uri", tracking, "--debug.max_eval_rows", "60"]
    assert finetune_grounder.main([*args, "--optim.epochs", "4"]) == 0

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # the untrained tiny detector finds nothing (its boxes mostly have no area); trained, most objects
    assert metrics["untrained_test_recall"] < 0.1 and metrics["untrained_test_zero_area_share"] > 0.5
    assert metrics["test_recall"] >= 0.6 and metrics["test_zero_area_share"] <= 0.05, metrics
    assert metrics["test_support"] > 40 and {"test_ner_recall", "valid_recall", "best_epoch"} <= set(metrics)

    # <output>/model is a detector folder: PhraseGrounder loads it, and the registered champion is the same model
    truth = {json.loads(line)["id"]: json.loads(line) for line in (tiny_benchmark / "ground_truth.jsonl").open()}
    rows = pq.read_table(ner / "test.parquet").sort_by("id").slice(0, 20).to_pylist()
    saved = PhraseGrounder(str(tmp_path / "out" / "model"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # download_artifacts reads models:/ from the global URI
    local = _tracking.resolve_model_uri("models:/tmr-grounder@champion", str(tmp_path / "download"))
    registered = PhraseGrounder(local)
    regions = []
    for row in rows:
        texts, image = [p["text"] for p in row["phrases"]], load_image(row["image_uri"])
        boxes = [r.box for r in saved(image, texts)]
        assert boxes == [r.box for r in registered(image, texts)]
        regions.append({**row, "regions": [{"box": box} for box in boxes]})
    assert regions_recall(regions, truth)["recall"] >= 0.5  # what a ground_phrases table of it scores

    # a resubmission with one more epoch resumes the run: epoch 5 only, the step count continues
    folder = tmp_path / "ray" / "grounder-run"
    state = json.loads((folder / "checkpoint_epoch_0004" / "train_state.json").read_text())
    assert finetune_grounder.main([*args, "--optim.epochs", "5"]) == 0
    resumed = json.loads((folder / "checkpoint_epoch_0005" / "train_state.json").read_text())
    assert (resumed["epoch"], resumed["attempts"]) == (5, 2)
    assert resumed["global_step"] == state["global_step"] * 5 // 4
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("tmr-grounder").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name='tmr-grounder'")] != []


def test_ground_truth_without_boxes_is_refused():
    from jobs import finetune_grounder
    from jobs._config import ConfigError

    with pytest.raises(ConfigError, match="version 2"):
        finetune_grounder.check_targets(finetune_grounder.Config(), [{"target_boxes": []}])
