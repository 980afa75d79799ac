"""Plain training utilities: the paper's schedule and decay groups, a tiny model that learns."""

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tmr_core.metrics import classification_scores
from tmr_core.training import (
    build_optimizer,
    build_scheduler,
    evaluate,
    move_to_device,
    set_seed,
    train_epoch,
)


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, features, labels=None):
        logits = self.head(torch.relu(self.norm(self.embed(features))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(loss, logits)


def toy_batches(seed: int, count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 4, generator=generator) * 3
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 3, (16,), generator=generator)
        batches.append(
            {"features": centers[labels] + 0.5 * torch.randn(16, 4, generator=generator), "labels": labels}
        )
    return batches


def test_schedule_warms_up_over_ten_percent_then_decays_to_zero():
    optimizer = build_optimizer(TinyClassifier(), lr=1e-3)
    scheduler = build_scheduler(optimizer, total_steps=50)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == 0.0
    assert max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 5  # 10% of 50 steps
    assert all(a < b for a, b in zip(rates[:5], rates[1:6], strict=True))  # rising during warmup
    assert all(a > b for a, b in zip(rates[5:50], rates[6:51], strict=True))  # falling after it
    assert rates[50] == 0.0
    assert rates[25] == pytest.approx(1e-3 * 25 / 45)  # linear decay


def test_schedule_rejects_bad_arguments():
    optimizer = build_optimizer(TinyClassifier(), lr=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(optimizer, total_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        build_scheduler(optimizer, total_steps=10, warmup_ratio=1.5)


def test_no_weight_decay_on_biases_and_layernorm():
    model = TinyClassifier()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    expected = {
        "embed.weight": 0.01,
        "head.weight": 0.01,
        "embed.bias": 0.0,
        "head.bias": 0.0,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
    }
    assert {name: decay_of[id(p)] for name, p in model.named_parameters()} == expected
    assert isinstance(optimizer, torch.optim.AdamW)


def test_optimizer_skips_frozen_and_shared_parameters():
    model = TinyClassifier()
    model.embed.requires_grad_(False)
    model.extra = nn.Linear(3, 16)
    model.extra.weight = model.embed.weight  # shared and frozen: must not appear
    model.head2 = model.head  # same module twice: its parameters appear once
    optimizer = build_optimizer(model, lr=1e-3)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params})
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        build_optimizer(model.embed, lr=1e-3)


def test_tiny_model_trains_and_evaluates():
    set_seed(0)
    model = TinyClassifier()
    batches = toy_batches(seed=1)
    optimizer = build_optimizer(model, lr=3e-2)
    scheduler = build_scheduler(optimizer, total_steps=6 * len(batches))
    steps = []
    first = train_epoch(
        model, batches, optimizer, scheduler, "cpu", on_step=lambda i, loss: steps.append(loss)
    )
    for _ in range(5):
        last = train_epoch(model, batches, optimizer, scheduler, "cpu")
    assert first["steps"] == len(batches) and len(steps) == len(batches)
    assert last["loss"] < 0.3 * first["loss"]
    assert scheduler.get_last_lr()[0] == 0.0

    def predict(model, batch):
        return batch["labels"].tolist(), model(batch["features"]).logits.argmax(-1).tolist()

    model.train()
    scores = evaluate(
        model,
        toy_batches(seed=1, count=2),
        predict,
        lambda g, p: classification_scores(g, p, [0, 1, 2]),
        "cpu",
    )
    assert scores["accuracy"] > 0.9 and scores["support"] == 32
    assert model.training  # mode restored


def test_train_epoch_names_a_missing_or_broken_loss():
    model = TinyClassifier()
    optimizer = build_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="returned no loss"):
        train_epoch(model, [{"features": torch.randn(2, 4)}], optimizer, None, "cpu")
    bad = {"features": torch.full((2, 4), float("nan")), "labels": torch.tensor([0, 1])}
    with pytest.raises(FloatingPointError, match="step 0"):
        train_epoch(model, [bad], optimizer, None, "cpu")


def test_move_to_device_walks_nested_containers():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), ("x", torch.ones(1, dtype=torch.long))], "c": 3}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["a"].device.type == "meta"
    assert moved["b"][0].device.type == "meta" and moved["b"][1][1].device.type == "meta"
    assert isinstance(moved["b"][1], tuple) and moved["b"][1][0] == "x" and moved["c"] == 3


def test_set_seed_makes_runs_repeat():
    set_seed(5)
    first = (random.random(), torch.rand(3))
    set_seed(5)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])
