"""Task heads (paper §3.5): the NER head (Eq. 7–9) and the RE head (Eq. 10–11).

NER: Ḡ = Multihead(G*, G'*) (Eq. 7). The extractor hands the head each view with its text state
beside the image's part, Q = T^w + G* and K = V = T^w + G'* (:mod:`tmr_core.extractor`); the
block attends Q over K/V and adds the result back to Q (the cross-attention block of
:mod:`tmr_core.attention`). Without a back-translation the same block attends Q over itself
(self-attention), so the no-back-translation ablation removes v' and nothing else. A linear
layer gives per-word emission scores and a CRF (pytorch-crf) scores whole BIO sequences (Eq. 8);
the loss is the CRF negative log-likelihood (Eq. 9, averaged over the batch). Invalid BIO moves
(start → I-X, O → I-X, B-X/I-X → I-Y) get a transition score of -1e4, re-imposed before every
use, so Viterbi decoding always yields valid BIO.

The CRF runs over the words that reach the model: tokens without a word piece (U+FE0F …) and
tokens cut by truncation are masked in T^w; the head packs the remaining words to the left for
the CRF (pytorch-crf needs contiguous masks) and scatters decoded tags back to their original
positions, where masked tokens read ``O`` (an ``I-X`` right after such a hole becomes ``B-X``, the
same conlleval chunk, so the whole sequence stays valid BIO).

RE: Ğ_ij = T_i ⊕ T_j ⊕ p ⊕ h (Eq. 10), softmax over relations, cross-entropy (Eq. 11). T_i, T_j are
the encoder states at the entity start markers (``[unused0]`` before the head, ``[unused2]``
before the tail), as TMR-RE's BERT entity encoder (OpenNRE) does; p is the sum of the phrase
vectors T^p; h is the mean over words of G* + G'* (of G* alone without a back-translation, zero
in the text-only ablation). h is not normalised: Eq. 4's α sets its size, so a pair the MDE
judges to weaken the text (α_w → 1) shrinks the image's vote, as the paper intends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchcrf import CRF

from tmr_core.attention import CrossModalAttention

IMPOSSIBLE = -1e4


def split_bio(tag: str) -> tuple[str, str]:
    """``"B-PER"`` → ``("B", "PER")``, ``"O"`` → ``("O", "")``.

    Raises:
        ValueError: ``tag`` is not ``O``, ``B-X`` or ``I-X``.
    """
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if prefix not in ("B", "I") or not sep or not kind:
        raise ValueError(f"labels: tag {tag!r} is not 'O', 'B-<TYPE>' or 'I-<TYPE>'")
    return prefix, kind


def is_valid_bio(tags: Sequence[str]) -> bool:
    """True when every ``I-X`` follows ``B-X`` or ``I-X`` (strict IOB2)."""
    previous = "O"
    for tag in tags:
        prefix, kind = split_bio(tag)
        if prefix == "I" and (previous == "O" or split_bio(previous)[1] != kind):
            return False
        previous = tag
    return True


def repair_bio(tags: Sequence[str]) -> list[str]:
    """Turn orphan ``I-X`` tags (after ``O`` or another type) into ``B-X``.

    Under conlleval semantics an orphan ``I-X`` already starts a chunk (Twitter-2015 has such
    tags), so this changes no entity; it only makes the sequence a path the CRF may take.
    """
    repaired, previous = [], "O"
    for tag in tags:
        prefix, kind = split_bio(tag)
        if prefix == "I" and (previous == "O" or split_bio(previous)[1] != kind):
            tag = f"B-{kind}"
        repaired.append(tag)
        previous = tag
    return repaired


def bio_constraints(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the forbidden moves: (start → tag) (T,) and (from → to) (T, T)."""
    parsed = [split_bio(tag) for tag in labels]
    count = len(labels)
    forbidden_start = torch.tensor([prefix == "I" for prefix, _ in parsed])
    forbidden = torch.zeros(count, count, dtype=torch.bool)
    for to, (to_prefix, to_kind) in enumerate(parsed):
        if to_prefix != "I":
            continue
        for source, (source_prefix, source_kind) in enumerate(parsed):
            forbidden[source, to] = source_prefix == "O" or source_kind != to_kind
    return forbidden_start, forbidden


def left_align(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that moves the True positions of each row to the front, keeping their order.

    Args:
        mask: (batch, n) bool.

    Returns:
        ``order`` (batch, n) positions to gather, and ``packed`` (batch, n) bool, True for the
        first ``mask.sum(1)`` slots. ``packed[:, 0]`` is always True (pytorch-crf needs it); a row
        with no True position scores one dummy ``O`` step.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    counts = mask.sum(dim=1, keepdim=True)
    packed = torch.arange(mask.shape[1], device=mask.device)[None] < counts
    packed[:, 0] = True
    return order, packed


class NERHead(nn.Module):
    """Multi-head fusion of (G*, G'*) (Eq. 7), emissions and a BIO-constrained CRF (Eq. 8–9).

    Args:
        hidden: size of G* and G'*.
        labels: BIO tags, e.g. :data:`tmr_core.schema.NER_TAGS`; must include ``O``.
        num_heads: heads of the Eq. 7 attention.
        dropout: dropout probability.
    """

    def __init__(self, hidden: int, labels: Sequence[str], num_heads: int, dropout: float):
        super().__init__()
        if "O" not in labels:
            raise ValueError(f"labels: a BIO tag set needs 'O', got {list(labels)}")
        self.labels = tuple(labels)
        self.outside = self.labels.index("O")
        self.fusion = CrossModalAttention(hidden, hidden, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.emission = nn.Linear(hidden, len(self.labels))
        self.crf = CRF(len(self.labels), batch_first=True)
        forbidden_start, forbidden = bio_constraints(self.labels)
        self.register_buffer("forbidden_start", forbidden_start, persistent=False)
        self.register_buffer("forbidden", forbidden, persistent=False)
        self.enforce_bio()

    @torch.no_grad()
    def enforce_bio(self) -> None:
        """Pin the forbidden CRF scores to -1e4 (an optimizer step may have moved them)."""
        self.crf.start_transitions.masked_fill_(self.forbidden_start, IMPOSSIBLE)
        self.crf.transitions.masked_fill_(self.forbidden, IMPOSSIBLE)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor | None, word_mask: torch.Tensor) -> torch.Tensor:
        """Emission scores (batch, words, tags) from ``queries`` = T^w + G* and ``keys`` = T^w + G'*,
        both (batch, words, hidden); ``keys=None`` (no back-translation) attends the queries over
        themselves."""
        keys = queries if keys is None else keys
        features = self.fusion(queries, keys, word_mask)  # Eq. 7: queries G*, keys/values G'*
        return self.emission(self.dropout(features))

    def loss(self, emissions: torch.Tensor, labels: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Eq. 9: CRF negative log-likelihood, averaged over the batch.

        Args:
            emissions: (batch, words, tags).
            labels: (batch, words) tag ids, negative where masked.
            word_mask: (batch, words) bool.
        """
        self.enforce_bio()
        order, packed = left_align(word_mask)
        packed_emissions = emissions.gather(1, order[..., None].expand(-1, -1, emissions.shape[-1]))
        packed_labels = labels.gather(1, order)
        packed_labels = torch.where(packed & (packed_labels >= 0), packed_labels, self.outside)
        return -self.crf(packed_emissions, packed_labels, mask=packed, reduction="mean")

    def decode(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tag ids per original position (length ``words``), valid BIO, ``O`` where masked."""
        self.enforce_bio()
        order, packed = left_align(word_mask)
        packed_emissions = emissions.gather(1, order[..., None].expand(-1, -1, emissions.shape[-1]))
        paths = self.crf.decode(packed_emissions, mask=packed)
        counts = word_mask.sum(dim=1).tolist()
        ids = {tag: index for index, tag in enumerate(self.labels)}
        decoded = []
        for row, path in enumerate(paths):
            tags = [self.outside] * word_mask.shape[1]
            for slot, position in enumerate(order[row, : counts[row]].tolist()):
                tags[position] = path[slot]
            # An O in a hole can orphan the next I-X; as a B-X it marks the same conlleval chunk.
            decoded.append([ids[tag] for tag in repair_bio([self.labels[i] for i in tags])])
        return decoded


class REHead(nn.Module):
    """Eq. 10–11: classify T_i ⊕ T_j ⊕ p ⊕ h into relations.

    Args:
        hidden: text hidden size (all four parts have it).
        num_relations: size of the relation set.
        dropout: dropout on the concatenation.
    """

    def __init__(self, hidden: int, num_relations: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * hidden, num_relations)

    def forward(
        self, head: torch.Tensor, tail: torch.Tensor, phrases: torch.Tensor, pair: torch.Tensor
    ) -> torch.Tensor:
        """Relation logits (batch, relations) from four (batch, hidden) vectors: T_i, T_j, p, h."""
        features = torch.cat([head, tail, phrases, pair], dim=-1)  # (B, 4H), Eq. 10
        return self.classifier(self.dropout(features))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 11: cross-entropy of the softmax over relations, averaged over the batch."""
        return nn.functional.cross_entropy(logits, labels)
