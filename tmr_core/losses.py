"""Losses of the divergence estimator: supervised contrastive loss (paper Eq. 6).

TMR trains the Multimodal Divergence Estimator with the supervised contrastive loss of Khosla et
al. (2020) instead of plain cross-entropy, so the estimator cannot win by telling the source
datasets apart (paper §3.4, Table 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supervised_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Supervised contrastive loss, paper Eq. 6 (Khosla et al., 2020, the ``L^sup_out`` form).

    With z the L2-normalised features, for each anchor i the positives P(i) are the other samples
    with label ``labels[i]`` and A(i) is every sample but i:

        L = mean_{i : |P(i)| > 0}  -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

    The paper writes a sum over anchors; we take the mean so the loss scale does not depend on the
    batch size. Anchors whose label occurs only once in the batch have no positive and are left
    out of the mean (they still serve as negatives for the others). The denominator is a
    log-sum-exp, so large ``1/τ`` does not overflow; the maths runs in float32 whatever the input
    dtype.

    Args:
        features: (N, D) embeddings; normalised here, so any scale works.
        labels: (N,) integer class of each row.
        temperature: τ > 0.

    Returns:
        A 0-dim float32 tensor. When no anchor has a positive (every label occurs once, or N < 2)
        the loss is ``0 * features.sum()``: zero, and still connected to the graph (``grad_fn``
        set when ``features`` requires grad) so a training step can call ``backward`` on it and
        get zero gradients instead of an error.

    Raises:
        ValueError: ``features`` is not 2-D, ``labels`` is not (N,), or ``temperature`` <= 0.
    """
    if features.dim() != 2:
        raise ValueError(f"features: expected shape (N, D), got {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels: expected shape ({features.shape[0]},) to match features {tuple(features.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")

    n = features.shape[0]
    z = F.normalize(features.float(), dim=1)
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    positive_mask = (labels[:, None] == labels[None, :]) & ~self_mask  # (N, N): P(i) per row
    positive_counts = positive_mask.sum(dim=1)
    has_positive = positive_counts > 0
    if not bool(has_positive.any()):
        return features.sum().float() * 0.0

    similarity = (z @ z.T) / temperature  # (N, N)
    similarity = similarity.masked_fill(self_mask, float("-inf"))  # drop i from A(i)
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positive_log_prob = torch.where(positive_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -positive_log_prob[has_positive] / positive_counts[has_positive]
    return per_anchor.mean()
