"""The back-translator's and the grounder's training jobs under real DDP: two Ray Train workers (gloo
on CPU) on the shared 4-CPU local cluster, tiny models, one short epoch each.

What shows that DDP ran and is right: each job records, per epoch, the world size the loop saw,
every rank's step count and whether every rank holds the weights rank 0 checkpoints
(``rank_agreement``). Each rank trains on its own shard, so the ranks' weights stay equal only when
their gradients are averaged and clipped alike (and the back-translator's VAE, trained outside DDP on
every rank, is rank 0's everywhere); a rank that stepped a different number of times would have hung
DDP's all-reduce. Each rank's shard is half the rows, so the run takes half the steps of a one-worker
run on the same data. The exported model is the checkpoint rank 0 wrote, it loads, and it trained.

Two DDP bugs are pinned without Ray: the grounder's loss divides by the target count averaged over
the ranks, and the VAE phase leaves no gradient behind for the denoising steps' clipping.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

TWO_WORKERS = ["--ray.num_workers", "2", "--ray.cpus_per_worker", "1", "--optim.epochs", "1",
               "--tracking.enabled", "false"]


def last_epoch(folder: Path) -> tuple[dict, dict]:
    state = json.loads((folder / "checkpoint_epoch_0001" / "train_state.json").read_text())
    return state, state["history"][-1]


@pytest.mark.timeout(300)  # a rank that steps more often than the other hangs DDP's all-reduce
def test_text_to_image_ddp_two_ranks_train_in_step_and_rank_zero_exports(
        ray_local, tiny_models, tiny_benchmark, ner_pairs, tmp_path, repo_root, monkeypatch):
    from diffusers import DiffusionPipeline

    from jobs import finetune_text_to_image
    from tmr_core.text_to_image_training import TextToImageModel

    monkeypatch.chdir(repo_root)
    start = time.perf_counter()
    # 16 pairs, 4 per step: one worker would step 4 times an epoch, each of 2 ranks (8 pairs) steps twice
    assert finetune_text_to_image.main([
        # a path relative to the driver's working directory, as the tiny configs name it: the workers
        # (actors, started in Ray's own directory) get it made absolute
        "--config", "configs/finetune_text_to_image.tiny.yaml",
        "--model.base", os.path.relpath(tiny_models["text_to_image"], repo_root),
        "--data.datasets", f"[{ner_pairs}]", "--data.ground_truth", str(tiny_benchmark / "ground_truth.jsonl"),
        "--output", str(tmp_path / "out"), "--ray.storage_path", str(tmp_path / "ray"), "--ray.name", "t2i-ddp",
        "--data.max_train_rows", "16", "--optim.batch_size", "4", "--optim.vae_steps", "2",
        "--debug.max_eval_rows", "4", "--probe.enabled", "false", *TWO_WORKERS]) == 0
    print(f"text-to-image, 2 workers: {time.perf_counter() - start:.1f}s")

    state, last = last_epoch(tmp_path / "ray" / "t2i-ddp")
    assert last["world_size"] == 2 and last["rank_steps"] == [2, 2] and state["global_step"] == 2
    assert last["ranks_agree"] is True  # UNet and text encoder averaged, the VAE rank 0's on both ranks

    checkpoint = TextToImageModel.from_pretrained(str(tmp_path / "ray" / "t2i-ddp" / "checkpoint_epoch_0001" / "model"))
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "out" / "model")
    base = DiffusionPipeline.from_pretrained(tiny_models["text_to_image"])
    for name in ("unet", "text_encoder", "vae"):
        exported, saved, untrained = (dict(getattr(p, name).named_parameters()) for p in (pipeline, checkpoint, base))
        assert all(torch.equal(exported[k], saved[k]) for k in exported), name  # the export is rank 0's checkpoint
        assert any(not torch.equal(exported[k], untrained[k]) for k in exported), name  # and it trained
    assert pipeline.vae.config.scaling_factor == pytest.approx(float(checkpoint.latent_scale))


@pytest.mark.timeout(300)
def test_grounder_ddp_two_ranks_train_in_step_and_rank_zero_exports(
        ray_local, tiny_models, tiny_benchmark, tmp_path, repo_root, monkeypatch):
    from transformers import AutoModelForZeroShotObjectDetection

    from jobs import finetune_grounder
    from tests.test_finetune_grounder import phrase_tables

    monkeypatch.chdir(repo_root)
    ner, re_ = phrase_tables(tiny_benchmark, tmp_path)
    start = time.perf_counter()
    # 64 images, 16 per step: one worker would step 4 times, each of 2 ranks (32 images) steps twice
    assert finetune_grounder.main([
        "--config", "configs/finetune_grounder.tiny.yaml", "--data.datasets", f"[{ner},{re_}]",
        "--data.ground_truth", str(tiny_benchmark / "ground_truth.jsonl"), "--model.detector", tiny_models["detector"],
        "--output", str(tmp_path / "out"), "--ray.storage_path", str(tmp_path / "ray"), "--ray.name", "grounder-ddp",
        "--data.max_train_rows", "64", "--debug.max_eval_rows", "8", "--eval_untrained", "false", *TWO_WORKERS]) == 0
    print(f"grounder, 2 workers: {time.perf_counter() - start:.1f}s")

    state, last = last_epoch(tmp_path / "ray" / "grounder-ddp")
    assert last["world_size"] == 2 and last["rank_steps"] == [2, 2] and state["global_step"] == 2
    assert last["ranks_agree"] is True

    load = AutoModelForZeroShotObjectDetection.from_pretrained
    exported = dict(load(str(tmp_path / "out" / "model")).named_parameters())
    saved = dict(load(str(tmp_path / "ray" / "grounder-ddp" / "checkpoint_epoch_0001" / "model")).named_parameters())
    untrained = dict(load(tiny_models["detector"]).named_parameters())
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in exported)
    tower = [k for k in exported if k.startswith("owlvit.vision_model.")]
    assert tower and any(not torch.equal(exported[k], untrained[k]) for k in tower)  # the towers trained, not only the reset heads


def test_grounder_loss_divides_by_the_ranks_mean_target_count_so_ddp_equals_one_big_batch(monkeypatch):
    """DDP averages the ranks' gradients: with each rank's loss divided by the target count averaged
    over the ranks (DETR's num_boxes), the average of two ranks' losses is the one-process loss of
    the batch holding both ranks' images, although one rank has 1 target box and the other 3. Each
    rank divided by its own count before: the 1-box rank's terms weighed 3 times the other's."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch import nn

    from tmr_core.grounder_training import GrounderWithLoss, GroundingLossConfig

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=generator)  # 2 images, 6 boxes, 3 phrase queries
    boxes = torch.cat([torch.rand(2, 6, 2, generator=generator) * 0.6 + 0.2,
                       torch.rand(2, 6, 2, generator=generator) * 0.2 + 0.05], dim=-1)

    class Detector(nn.Module):  # image i's outputs, in whatever batch it comes
        def forward(self, pixel_values, input_ids, attention_mask):
            return SimpleNamespace(logits=logits[pixel_values], pred_boxes=boxes[pixel_values])

    targets = [{"class_labels": torch.tensor([0]), "boxes": boxes[0, [2]] + 0.05},
               {"class_labels": torch.tensor([0, 1, 2]), "boxes": boxes[1, [0, 3, 5]] - 0.03}]
    model = GrounderWithLoss(Detector(), GroundingLossConfig())

    def loss(images: list[int]) -> float:
        return model(torch.tensor(images), None, None, torch.ones(len(images), 3, dtype=torch.bool),
                     [targets[i] for i in images]).loss.item()

    whole = loss([0, 1])  # one process, both images
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    ranks = []
    for rank in (0, 1):  # rank r holds image r; the all-reduce adds the other rank's count
        other = float(len(targets[1 - rank]["class_labels"]))
        monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, o=other, **kwargs: tensor.add_(o))
        ranks.append(loss([rank]))
    assert sum(ranks) / 2 == pytest.approx(whole, rel=1e-6)


def test_the_vae_phase_leaves_no_gradient_for_the_denoising_steps_to_clip(tiny_models):
    """The VAE phase's last gradients go with it. Left on the frozen VAE, they entered every later
    denoising step's clip_grad_norm_ over model.parameters() (train_epoch); under DDP each rank's
    differ (the VAE phase is not bitwise reproducible on CUDA), so each rank clipped by its own factor
    and the ranks' UNets drifted apart although DDP averaged their gradients (seen on CPU by giving
    rank 1 another VAE learning rate: ranks_agree false)."""
    from tmr_core.text_to_image_training import (
        TextToImageModel,
        TextToImageTrainingConfig,
        reconstruction_phase,
    )

    torch.manual_seed(0)
    model = TextToImageModel(TextToImageTrainingConfig(base=tiny_models["text_to_image"], resolution=32,
                                                       train_text_encoder=True, train_vae=True))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction_phase(model, [{"pixel_values": pixels}] * 2, lr=1e-3, device="cpu")
    assert all(p.grad is None for p in model.vae.parameters())

    model(pixels, model.tokenize(["Just landed in Jordan !", "Paris"])).loss.backward()
    clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # what train_epoch measures
    denoising = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.requires_grad]))
    assert clipped == pytest.approx(float(denoising), rel=1e-6)
