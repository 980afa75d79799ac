"""Eq. 4 fusion, Eq. 1–2 attention shapes and masking, and the BIO-constrained CRF (Eq. 8–9)."""

from __future__ import annotations

import random

import pytest
import torch

from tmr_core.attention import CrossModalAttention, MultiGrainedAttention
from tmr_core.encoders import ImageEncoder, TextEncoder, VisualFeatures
from tmr_core.fusion import divergence_fusion
from tmr_core.heads import NERHead, REHead, bio_constraints, is_valid_bio, left_align, repair_bio
from tmr_core.schema import NER_TAGS


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----- Eq. 4 --------------------------------------------------------------------------------


def test_divergence_fusion_matches_a_hand_computation():
    g_fine = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [0.0, -2.0]]])  # (2, 2, 2)
    g_coarse = torch.tensor([[[10.0, 0.0], [0.0, 10.0]], [[4.0, 8.0], [2.0, 2.0]]])
    alpha = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.25, 0.75]])
    # sample 0: 0.2*G^f + 0.5*G^c ; sample 1: 0*G^f + 0.25*G^c (α_w weights the zero block)
    expected = torch.tensor([[[5.2, 0.4], [0.6, 5.8]], [[1.0, 2.0], [0.5, 0.5]]])
    assert torch.allclose(divergence_fusion(g_fine, g_coarse, alpha), expected)
    assert torch.allclose(
        divergence_fusion(g_fine, None, alpha),
        torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[0.0, 0.0], [0.0, 0.0]]]),
    )
    assert torch.allclose(
        divergence_fusion(None, g_coarse, alpha), expected - divergence_fusion(g_fine, None, alpha)
    )


def test_divergence_fusion_rejects_rows_not_summing_to_one():
    g = torch.zeros(3, 4, 2)
    good = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.00005]])  # within 1e-4
    divergence_fusion(g, g, good)
    bad = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.1], [0.2, 0.2, 0.6]])
    with pytest.raises(ValueError, match=r"alpha: row 1 is \[0.5, 0.5, 0.1\]"):
        divergence_fusion(g, g, bad)
    with pytest.raises(ValueError, match="alpha: expected shape"):
        divergence_fusion(g, g, torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="alpha: expected shape"):
        divergence_fusion(g, g, torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="g_coarse: shape"):
        divergence_fusion(g, torch.zeros(3, 5, 2), good)
    with pytest.raises(ValueError, match="both None"):
        divergence_fusion(None, None, good)


# ----- Eq. 1–2 ------------------------------------------------------------------------------


def visual(batch, patches=49, regions=3, dim=12):
    return VisualFeatures(
        torch.randn(batch, patches, dim),
        torch.ones(batch, patches, dtype=torch.bool),
        torch.randn(batch, regions, dim),
        torch.ones(batch, regions, dtype=torch.bool),
    )


def test_multi_grained_attention_gives_one_vector_per_word_at_each_level():
    torch.manual_seed(0)
    module = MultiGrainedAttention(text_dim=16, image_dim=12, num_heads=4, dropout=0.0).eval()
    words, phrases = torch.randn(2, 7, 16), torch.randn(2, 3, 16)
    phrase_mask = torch.tensor([[True, True, False], [True, False, False]])
    levels = module(words, phrases, phrase_mask, visual(2))
    assert levels.fine.shape == levels.coarse.shape == (2, 7, 16)
    assert torch.allclose(levels.combined, levels.fine + levels.coarse)  # Eq. 2
    # Words differ, so their image-aware vectors differ (not one pooled vector per sentence).
    assert not torch.allclose(levels.fine[0, 0], levels.fine[0, 1])
    # A padded phrase slot has no effect on the coarse level.
    changed = phrases.clone()
    changed[0, 2] = 100.0
    assert torch.allclose(
        module(words, changed, phrase_mask, visual_same := visual(2)).coarse,
        module(words, phrases, phrase_mask, visual_same).coarse,
        atol=1e-6,
    )


@pytest.mark.parametrize("residual", [True, False], ids=["attention", "evidence"])
def test_a_row_without_image_keeps_its_text_state_or_gets_no_evidence_and_never_nan(residual):
    torch.manual_seed(0)
    attention = CrossModalAttention(query_dim=8, key_dim=6, num_heads=2, dropout=0.0, residual=residual)
    queries, keys = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = attention(queries, keys, mask)
    assert torch.isfinite(out).all()
    without_image = attention.norm(queries[1]) if residual else torch.zeros(5, 8)  # text only / no evidence
    assert torch.allclose(out[1], without_image, atol=1e-6)
    assert not torch.allclose(out[0], attention.norm(queries[0]) if residual else torch.zeros(5, 8), atol=1e-4)
    out.sum().backward()
    assert attention.attention.in_proj_weight is None and attention.attention.q_proj_weight.grad is not None


def test_ablated_levels_are_not_built():
    only_fine = MultiGrainedAttention(16, 12, 4, 0.0, use_coarse=False)
    only_coarse = MultiGrainedAttention(16, 12, 4, 0.0, use_fine=False)
    assert only_fine.phrase_region is None and only_fine.word_phrase is None
    assert only_coarse.fine is None
    levels = only_coarse(
        torch.randn(1, 3, 16),
        torch.randn(1, 2, 16),
        torch.ones(1, 2, dtype=torch.bool),
        VisualFeatures(None, None, torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)),
    )
    assert levels.fine is None and levels.coarse.shape == (1, 3, 16)
    with pytest.raises(ValueError, match="use_fine/use_coarse"):
        MultiGrainedAttention(16, 12, 4, 0.0, use_fine=False, use_coarse=False)
    with pytest.raises(ValueError, match="num_heads"):
        MultiGrainedAttention(16, 12, 3, 0.0)


def test_text_encoder_pools_words_and_phrases():
    states = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    word_starts = torch.tensor([[1, 3, 0], [2, 0, 0]])
    word_mask = torch.tensor([[True, True, False], [True, False, False]])
    words = TextEncoder.word_features(states, word_starts, word_mask)
    assert torch.equal(words[0, :2], states[0, [1, 3]]) and torch.equal(words[0, 2], torch.zeros(2))
    spans = torch.tensor([[[1, 4], [0, 0]], [[2, 3], [0, 0]]])
    phrase_mask = torch.tensor([[True, False], [True, False]])
    phrases = TextEncoder.phrase_features(states, spans, phrase_mask)
    assert torch.allclose(phrases[0, 0], states[0, 1:4].mean(0)) and torch.equal(
        phrases[0, 1], torch.zeros(2)
    )
    assert torch.allclose(phrases[1, 0], states[1, 2])


def test_image_encoder_pools_to_the_patch_grid_and_encodes_only_present_images():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    backbone = ResNetModel(
        ResNetConfig(embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic")
    ).eval()
    encoder = ImageEncoder(backbone, num_patches=49)
    pixels, crops = (
        torch.randn(3, 3, 48, 48),
        torch.randn(3, 2, 3, 48, 48),
    )  # 48 px → a 6×6 map, pooled to 7×7
    image_mask = torch.tensor([True, False, True])
    region_mask = torch.tensor([[True, False], [False, False], [True, True]])
    features = encoder(pixels, image_mask, crops, region_mask)
    assert features.patches.shape == (3, 49, 8) and features.regions.shape == (3, 2, 8)
    assert torch.equal(features.patches[1], torch.zeros(49, 8)) and torch.equal(
        features.regions[0, 1], torch.zeros(8)
    )
    alone = encoder(pixels[2:], image_mask[2:], crops[2:], region_mask[2:])
    assert torch.allclose(alone.patches[0], features.patches[2], atol=1e-5)
    assert torch.allclose(alone.regions[0], features.regions[2], atol=1e-5)
    nothing = encoder(pixels, torch.zeros(3, dtype=torch.bool), None, None)
    assert nothing.regions is None and not nothing.patch_mask.any()
    with pytest.raises(ValueError, match="num_patches"):
        ImageEncoder(backbone, num_patches=50)


# ----- CRF (Eq. 8–9) -------------------------------------------------------------------------


def test_repair_bio_turns_orphans_into_chunk_starts():
    assert repair_bio(["O", "I-LOC", "I-LOC", "B-PER", "I-ORG"]) == ["O", "B-LOC", "I-LOC", "B-PER", "B-ORG"]
    assert is_valid_bio(repair_bio(["I-PER", "O", "I-MISC"]))
    assert not is_valid_bio(["B-PER", "I-LOC"]) and not is_valid_bio(["I-PER"])


def test_left_align_packs_kept_positions_in_order():
    mask = torch.tensor([[False, True, False, True], [False, False, False, False]])
    order, packed = left_align(mask)
    assert order[0, :2].tolist() == [1, 3]
    assert packed.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_crf_decoding_always_yields_valid_bio_even_after_training_moves_transitions():
    torch.manual_seed(0)
    random.seed(0)
    head = NERHead(hidden=8, labels=NER_TAGS, num_heads=2, dropout=0.0)
    forbidden_start, forbidden = bio_constraints(NER_TAGS)
    assert int(forbidden_start.sum()) == 4 and int(forbidden.sum()) == 4 * (1 + 6)  # to I-X from O, B-Y, I-Y
    # Push the forbidden transitions up, as a careless optimizer step could.
    with torch.no_grad():
        head.crf.transitions.add_(forbidden * 50.0)
        head.crf.start_transitions.add_(forbidden_start * 50.0)
    i_tags = [i for i, tag in enumerate(NER_TAGS) if tag.startswith("I-")]
    emissions = torch.randn(64, 9, len(NER_TAGS)) * 3
    emissions[..., i_tags] += 4.0  # emissions alone prefer I- tags everywhere
    mask = torch.rand(64, 9) > 0.25  # holes: tokens without word pieces
    mask[0] = False  # a sentence of zero-width tokens only
    paths = head.decode(emissions, mask)
    assert len(paths) == 64
    for row, path in enumerate(paths):
        tags = [NER_TAGS[i] for i in path]
        assert len(tags) == 9 and is_valid_bio(tags)
        assert all(tags[i] == "O" for i in range(9) if not mask[row, i])
        seen = [tags[i] for i in range(9) if mask[row, i]]
        assert is_valid_bio(seen)  # valid over the words the model saw, too
    assert float(head.crf.transitions.detach()[forbidden].max()) == pytest.approx(-1e4)


def test_crf_loss_ignores_masked_positions_and_keeps_labels_aligned():
    torch.manual_seed(0)
    head = NERHead(hidden=8, labels=NER_TAGS, num_heads=2, dropout=0.0)
    emissions = torch.randn(1, 4, len(NER_TAGS))
    b_per, i_per = NER_TAGS.index("B-PER"), NER_TAGS.index("I-PER")
    labels = torch.tensor([[b_per, -100, i_per, 0]])
    mask = torch.tensor([[True, False, True, True]])
    # The same words without the hole give the same loss: the hole does not shift labels.
    packed = head.loss(emissions[:, [0, 2, 3]], labels[:, [0, 2, 3]], mask[:, [0, 2, 3]])
    assert torch.allclose(head.loss(emissions, labels, mask), packed)
    assert torch.isfinite(head.loss(emissions, torch.full((1, 4), -100), torch.zeros(1, 4, dtype=torch.bool)))


def test_re_head_reads_the_size_of_h_that_alpha_sets():
    # Eq. 4 + 10: h = mean(α_s·G^f + α_c·G^c (+ G'*)); a large α_w must shrink the image's vote.
    # (A LayerNorm on h cancelled any common scale of α: 0.1·h gave the same logits as h.)
    torch.manual_seed(0)
    head = REHead(hidden=8, num_relations=3, dropout=0.0).eval()
    head_state, tail, phrases, pair = torch.randn(4, 2, 8).unbind(0)
    logits = head(head_state, tail, phrases, pair)
    assert not torch.allclose(head(head_state, tail, phrases, 0.1 * pair), logits, atol=1e-3)
