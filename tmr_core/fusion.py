"""Divergence fusion (paper Eq. 4): weight the fine and coarse representations by the MDE's scores.

    [G*, G'*, 0]ᵀ = [α_s, α_c, α_w]ᵀ · [[G^f, G'^f], [G^c, G'^c], [0, 0]],   α_s + α_c + α_w = 1

so G* = α_s·G^f + α_c·G^c (and G'* the same on the back-translated pair); α_w weights a zero
block, i.e. it only shrinks the representation of a pair judged to "weaken" the text.
"""

from __future__ import annotations

import torch

ALPHA_TOLERANCE = 1e-4


def check_alpha(alpha: torch.Tensor, batch_size: int) -> None:
    """Check ``alpha`` is (batch, 3) with non-negative rows summing to 1 (± 1e-4).

    Raises:
        ValueError: wrong shape, or the first bad row (its index and values).
    """
    if alpha.dim() != 2 or alpha.shape != (batch_size, 3):
        raise ValueError(
            f"alpha: expected shape ({batch_size}, 3) ordered (strengthen, complement, weaken), got {tuple(alpha.shape)}"
        )
    sums = alpha.detach().sum(dim=-1)
    bad = ((sums - 1).abs() > ALPHA_TOLERANCE) | (alpha.detach() < -ALPHA_TOLERANCE).any(dim=-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        values = [round(float(v), 6) for v in alpha[row]]
        raise ValueError(
            f"alpha: row {row} is {values} (sum {float(sums[row]):.6f}); each row must be non-negative "
            f"(strengthen, complement, weaken) scores summing to 1 within {ALPHA_TOLERANCE}"
        )


def divergence_fusion(
    g_fine: torch.Tensor | None, g_coarse: torch.Tensor | None, alpha: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: ``α_s·G^f + α_c·G^c`` per sample.

    Args:
        g_fine: G^f (or G'^f), (batch, words, dim); ``None`` when the fine level is ablated.
        g_coarse: G^c (or G'^c), (batch, words, dim); ``None`` when the coarse level is ablated.
        alpha: (batch, 3) scores ordered (strengthen, complement, weaken), rows summing to 1.

    Returns:
        G* (or G'*), (batch, words, dim). An ablated level contributes no term.

    Raises:
        ValueError: both levels are ``None``, the two shapes differ, or ``alpha`` is malformed.
    """
    present = [g for g in (g_fine, g_coarse) if g is not None]
    if not present:
        raise ValueError("divergence_fusion: g_fine and g_coarse are both None; at least one level is needed")
    if g_fine is not None and g_coarse is not None and g_fine.shape != g_coarse.shape:
        raise ValueError(
            f"g_coarse: shape {tuple(g_coarse.shape)} differs from g_fine's {tuple(g_fine.shape)}"
        )
    if present[0].dim() != 3:
        raise ValueError(f"g_fine/g_coarse: expected (batch, words, dim), got {tuple(present[0].shape)}")
    check_alpha(alpha, present[0].shape[0])
    alpha = alpha.to(present[0].dtype)
    fused = None
    if g_fine is not None:
        fused = alpha[:, 0, None, None] * g_fine  # (B, 1, 1) * (B, W, D)
    if g_coarse is not None:
        term = alpha[:, 1, None, None] * g_coarse
        fused = term if fused is None else fused + term
    return fused
