"""Multi-grained cross-modal attention (paper Eq. 1–2).

Eq. 1 as printed, ``G = Σ softmax(W_d V Tᵀ/√d) T``, mixes text vectors with image-derived
weights and sums them away, while the CRF of Eq. 7–8 needs one vector per word. We read it the
way the HVPNeT lineage (which TMR builds on) does: **text queries attend over image keys/values**,
so each word gets its own image-derived vector and W_d becomes the learned query/key/value
projections of the multi-head attention:

    G = LayerNorm(Dropout(MultiHead(Q = T, K = V, V = V)))              (our reading of Eq. 1)

G is the *cross-modal evidence* a word draws from the image, normalised so each level has the
same scale whatever the image; it does not contain the text state itself. The extractor adds
T^w beside it after Eq. 4 (:mod:`tmr_core.extractor`), so that α_w — the weight of Eq. 4's zero
block — shrinks the image's part and never the text's (with T inside G, α_w → 1 would erase the
sentence, and a LayerNorm after α would cancel α's scale, which is what Eq. 4 is for).

- Fine level, G^f: words T^w attend over the 7×7 patch vectors V^s → one vector per word.
- Coarse level, G^c: phrases T^p attend over the region vectors V^r (Eq. 1 on the pair
  (T^p, V^r)), giving each phrase its region evidence R; then **each word attends over the
  phrases** (keys T^p, values R), gathering the region evidence of the phrases it resembles →
  one vector per word. (A word outside every phrase still sees the phrases' regions, weighted by
  similarity.)
- Eq. 2: G = G^f + G^c (:attr:`GrainedRepresentation.combined`); the extractor weights the two
  levels with the divergence scores instead (Eq. 4, :mod:`tmr_core.fusion`).

The same module (same weights) is applied to the real pair (t, v) and to the back-translated
pair (t, v') of Eq. 3, giving G and G'. A sample without an image, regions or phrases has all of
those keys masked; its evidence is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tmr_core.encoders import VisualFeatures


class CrossModalAttention(nn.Module):
    """Queries attend over keys/values of another modality, added back to the queries (Eq. 1).

    ``LayerNorm(Q + Dropout(MultiHead(Q, K, V)))``; with ``residual=False`` (:class:`CrossModalEvidence`)
    the queries are not added back and a row with no real key gives exactly zero.

    Args:
        query_dim: size of the query (text) vectors; also the output size.
        key_dim: size of the key vectors (e.g. the image backbone's channels).
        num_heads: attention heads; must divide ``query_dim``.
        dropout: dropout on attention weights and on the attended vectors.
        value_dim: size of the value vectors; defaults to ``key_dim``.
        residual: add the queries back before the LayerNorm.
    """

    def __init__(self, query_dim: int, key_dim: int, num_heads: int, dropout: float,
                 value_dim: int | None = None, residual: bool = True):
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the text hidden size {query_dim}")
        self.attention = nn.MultiheadAttention(
            query_dim, num_heads, dropout=dropout, kdim=key_dim, vdim=value_dim or key_dim, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(query_dim)
        self.residual = residual

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            queries: (batch, n, query_dim).
            keys: (batch, m, key_dim).
            key_mask: (batch, m) bool, True for real keys.
            values: (batch, m, value_dim); the keys when None.

        Returns:
            (batch, n, query_dim); rows with no real key get ``LayerNorm(queries)`` (residual) or
            zero (evidence).
        """
        has_key = key_mask.any(dim=-1)[:, None, None]  # (B, 1, 1)
        # A softmax over no keys is NaN: let such rows see key 0, then zero their output.
        safe_mask = key_mask.clone()
        safe_mask[:, 0] |= ~has_key[:, 0, 0]
        values = keys if values is None else values
        attended, _ = self.attention(queries, keys, values, key_padding_mask=~safe_mask, need_weights=False)
        attended = self.dropout(attended * has_key.to(attended.dtype))
        if self.residual:
            return self.norm(queries + attended)
        return self.norm(attended) * has_key.to(attended.dtype)


class CrossModalEvidence(CrossModalAttention):
    """What queries read from another modality, ``LayerNorm(Dropout(MultiHead(Q, K, V)))`` (Eq. 1):
    the evidence alone, so a caller can weight it (Eq. 4) without also weighting the text."""

    def __init__(self, query_dim: int, key_dim: int, num_heads: int, dropout: float, value_dim: int | None = None):
        super().__init__(query_dim, key_dim, num_heads, dropout, value_dim=value_dim, residual=False)


@dataclass
class GrainedRepresentation:
    """The two levels of Eq. 2, one vector per word: (batch, words, dim) each, None when ablated."""

    fine: torch.Tensor | None
    coarse: torch.Tensor | None

    @property
    def combined(self) -> torch.Tensor:
        """Eq. 2: G = G^f + G^c (only the present levels)."""
        levels = [g for g in (self.fine, self.coarse) if g is not None]
        return levels[0] if len(levels) == 1 else levels[0] + levels[1]


class MultiGrainedAttention(nn.Module):
    """G^f from (T^w, V^s) and G^c from (T^p, V^r), one vector per word (Eq. 1–2).

    Args:
        text_dim: text hidden size (BERT).
        image_dim: image feature size (ResNet's last stage channels).
        num_heads: heads of every attention block.
        dropout: dropout probability.
        use_fine: build the word→patch level (G^f).
        use_coarse: build the phrase→region and word→phrase levels (G^c).
    """

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        num_heads: int,
        dropout: float,
        use_fine: bool = True,
        use_coarse: bool = True,
    ):
        super().__init__()
        if not (use_fine or use_coarse):
            raise ValueError("use_fine/use_coarse: at least one granularity is needed for the image path")
        self.fine = CrossModalEvidence(text_dim, image_dim, num_heads, dropout) if use_fine else None
        self.phrase_region = CrossModalEvidence(text_dim, image_dim, num_heads, dropout) if use_coarse else None
        self.word_phrase = CrossModalEvidence(text_dim, text_dim, num_heads, dropout) if use_coarse else None

    def forward(
        self,
        words: torch.Tensor,
        phrases: torch.Tensor | None,
        phrase_mask: torch.Tensor | None,
        visual: VisualFeatures,
    ) -> GrainedRepresentation:
        """Args:
            words: T^w (batch, words, text_dim).
            phrases: T^p (batch, phrases, text_dim); needed with the coarse level.
            phrase_mask: (batch, phrases) bool.
            visual: V^s and/or V^r with their masks.

        Returns:
            :class:`GrainedRepresentation` with G^f and G^c, each (batch, words, text_dim).
        """
        fine = coarse = None
        if self.fine is not None:
            fine = self.fine(words, visual.patches, visual.patch_mask)  # (B, W, D)
        if self.phrase_region is not None:
            region_evidence = self.phrase_region(phrases, visual.regions, visual.region_mask)  # R (B, P, D)
            # Words pick phrases by their text (keys T^p) and take those phrases' region evidence;
            # a phrase with no region contributes zero, a sample with none gets G^c = 0.
            grounded = phrase_mask & visual.region_mask.any(dim=-1, keepdim=True)
            coarse = self.word_phrase(words, phrases, grounded, values=region_evidence)  # (B, W, D)
        return GrainedRepresentation(fine, coarse)
