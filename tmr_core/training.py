"""Plain PyTorch training utilities shared by the Ray Train jobs and the plain-loop benchmark.

The paper's optimisation (App. B.1–B.3): AdamW, linear warmup over the first 10% of the steps to
the peak learning rate, then linear decay to zero; weight decay 0.01 on every weight except
biases and normalisation weights. ``train_epoch`` and ``evaluate`` know nothing about the task:
the model returns its loss from ``model(**batch)``, and evaluation takes the task's prediction and
scoring functions from the caller.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

# Parameters of these modules are scales and shifts, not weights: they get no weight decay.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for tmr_core
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device


def move_to_device(batch: Any, device: str | torch.device) -> Any:
    """Move every tensor in a (nested) dict / list / tuple to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group (biases, norm weights).

    Shared (tied) parameters appear once; frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if name == "bias" or isinstance(module, _NORM_TYPES):
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on weights and none on biases or LayerNorm weights (App. B).

    Raises:
        ValueError: ``lr`` <= 0, ``weight_decay`` < 0, or the model has no trainable parameter.
    """
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    groups = [group for group in parameter_groups(model, weight_decay) if group["params"]]
    if not groups:
        raise ValueError(f"model: {type(model).__name__} has no parameter with requires_grad=True")
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then linear decay to 0 (App. B).

    Call ``scheduler.step()`` once per optimizer step; the rate peaks after the warmup steps and
    reaches zero at ``total_steps``.

    Raises:
        ValueError: ``total_steps`` < 1 or ``warmup_ratio`` outside [0, 1].
    """
    from transformers import get_linear_schedule_with_warmup

    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio: expected a fraction in [0, 1], got {warmup_ratio}")
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: str | torch.device,
    grad_clip: float | None = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``: ``model(**batch).loss``, backward, clip, optimizer and scheduler step.

    Args:
        model: returns an object with a scalar ``.loss`` from ``model(**batch)``.
        batches: dicts of keyword arguments for the model (moved to ``device`` here).
        optimizer, scheduler: stepped once per batch (``scheduler`` may be None).
        device: where the batch goes; the model must already be there.
        grad_clip: max global gradient norm; None or <= 0 disables clipping.
        on_step: called as ``on_step(step_index, loss)`` after each step (progress, logging).

    Returns:
        ``{"loss": mean training loss over the epoch, "steps": number of optimizer steps}``.

    Raises:
        ValueError: the model returned no loss for a batch.
        FloatingPointError: the loss is NaN or infinite (the step is not taken).
    """
    model.train()
    total_loss, steps = 0.0, 0
    for batch in batches:
        outputs = model(**move_to_device(batch, device))
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"model: {type(model).__name__}(**batch) returned no loss at step {steps}; "
                f"does the batch carry labels? keys: {sorted(batch)}"
            )
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {steps}; lower lr or check the batch")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(steps, loss_value)
        total_loss += loss_value
        steps += 1
    return {"loss": total_loss / steps if steps else float("nan"), "steps": steps}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    predict_fn: Callable[[nn.Module, Mapping[str, Any]], tuple[list, list]],
    score_fn: Callable[[list, list], dict],
    device: str | torch.device,
) -> dict:
    """Predict every batch in eval mode without gradients, then score all predictions at once.

    Args:
        predict_fn: ``predict_fn(model, batch) -> (gold, pred)``, two equally long lists for the
            batch (already on ``device``), e.g. tag sequences or relation labels.
        score_fn: ``score_fn(gold, pred) -> dict`` over the whole split, e.g.
            ``tmr_core.metrics.ner_scores``.

    Returns:
        ``score_fn``'s dict. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    gold, pred = [], []
    try:
        for batch in batches:
            batch_gold, batch_pred = predict_fn(model, move_to_device(batch, device))
            if len(batch_gold) != len(batch_pred):
                raise ValueError(
                    f"predict_fn returned {len(batch_gold)} gold and {len(batch_pred)} predicted items"
                )
            gold.extend(batch_gold)
            pred.extend(batch_pred)
    finally:
        model.train(was_training)
    return score_fn(gold, pred)
