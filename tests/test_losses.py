"""supervised_contrastive_loss (paper Eq. 6) against a slow loop over anchors written from the formula."""

import math

import pytest
import torch

from tmr_core.losses import supervised_contrastive_loss


def reference_supcon(features: torch.Tensor, labels: list[int], temperature: float) -> float:
    """Eq. 6 term by term in float64, mean over anchors that have a positive."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    n = len(labels)
    per_anchor = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in others)
        total = sum(math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator) for p in positives)
        per_anchor.append(-total / len(positives))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference_with_a_singleton_label(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(9, 6, generator=generator) * 3
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 3]  # label 3 occurs once: its anchor is left out
    loss = supervised_contrastive_loss(features, torch.tensor(labels), temperature=0.5)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(reference_supcon(features, labels, 0.5), rel=1e-5)


def test_small_temperature_stays_finite_and_matches():
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(6, 4, generator=generator)
    labels = [0, 1, 0, 1, 2, 2]
    loss = supervised_contrastive_loss(features, torch.tensor(labels), temperature=0.01)
    assert torch.isfinite(loss)
    # exp(1/0.01) overflows float32, so the float64 reference uses a shifted log-sum-exp.
    z = torch.nn.functional.normalize(features.double(), dim=1)
    sim = z @ z.T / 0.01
    expected = []
    for i in range(6):
        others = [a for a in range(6) if a != i]
        lse = torch.logsumexp(sim[i, others], dim=0)
        positives = [p for p in others if labels[p] == labels[i]]
        expected.append(-sum(float(sim[i, p] - lse) for p in positives) / len(positives))
    assert loss.item() == pytest.approx(sum(expected) / 6, rel=1e-4)


def test_gradient_pulls_positives_together():
    features = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    before = supervised_contrastive_loss(features, labels, temperature=0.5)
    before.backward()
    with torch.no_grad():
        after = supervised_contrastive_loss(features - 0.1 * features.grad, labels, temperature=0.5)
    assert after < before


def test_no_positive_in_batch_gives_zero_loss_with_grad():
    features = torch.randn(4, 3, requires_grad=True)
    loss = supervised_contrastive_loss(features, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    single = supervised_contrastive_loss(torch.randn(1, 3, requires_grad=True), torch.tensor([2]))
    assert single.item() == 0.0


def test_is_invariant_to_feature_scale_and_row_order():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(8, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = supervised_contrastive_loss(features, labels)
    order = torch.randperm(8, generator=generator)
    assert supervised_contrastive_loss(features[order] * 7.0, labels[order]).item() == pytest.approx(
        loss.item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("features", "labels", "temperature", "message"),
    [
        (torch.randn(4), torch.tensor([0, 1, 0, 1]), 0.1, "features"),
        (torch.randn(4, 3), torch.tensor([0, 1, 0]), 0.1, "labels"),
        (torch.randn(4, 3), torch.tensor([[0, 1, 0, 1]]), 0.1, "labels"),
        (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 0.0, "temperature"),
    ],
)
def test_rejects_bad_inputs_naming_the_argument(features, labels, temperature, message):
    with pytest.raises(ValueError, match=message):
        supervised_contrastive_loss(features, labels, temperature)
