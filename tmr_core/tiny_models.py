"""Tiny, seeded versions of every model TMR loads, built offline from the real library classes.

Every job loads its models with ``from_pretrained(name_or_path)``; the paper configs name the
full-size hub checkpoints, the tiny configs name the folders written here. Nothing is downloaded:
each model is made from its library config with a fixed seed and saved with ``save_pretrained``,
and the tokenizers are trained offline with the ``tokenizers`` package on the synthetic benchmark's
text (:func:`tmr_core.synthetic.synthetic_corpus`, default seed).

| role (key)        | folder           | tiny model (built here)                                               | paper / full-size config      |
|-------------------|------------------|-----------------------------------------------------------------------|-------------------------------|
| ``text_encoder``  | ``text-encoder`` | ``BertModel`` 2 layers, hidden 64, 2 heads, max 128 positions; WordPiece vocab (~830) trained on the benchmark, ``BertTokenizerFast`` (lowercase) | ``bert-base-uncased`` (§4, App. B) |
| ``image_encoder`` | ``image-encoder``| ``ResNetModel`` basic blocks, depths 1-1-1, widths 16-32-64 (16× downsampling); ``ConvNextImageProcessor`` to 112×112 → last feature map 7×7 = 49 patches | ``microsoft/resnet-50`` (ResNet-50, 49 patches, §3.2) |
| ``text_to_image`` | ``text-to-image``| ``StableDiffusionPipeline``: UNet2DConditionModel (32-64 channels), AutoencoderKL (16-32-32, ×4), CLIPTextModel (2 layers, hidden 32), CLIP BPE tokenizer trained on the benchmark; ``EulerDiscreteScheduler``; 64×64 output; no safety checker | ``stabilityai/stable-diffusion-2`` + Euler (768×768) |
| ``detector``      | ``detector``     | ``OwlViTForObjectDetection`` (text/vision 2 layers, hidden 32, 64×64 input, patch 8 → 64 boxes) + ``OwlViTProcessor`` (same CLIP BPE) | ``google/owlv2-base-patch16-ensemble`` (paper: one-stage grounding) |
| ``mde_backbone``  | ``mde-backbone`` | ``ViltModel`` 2 layers, hidden 64, 2 heads, 64×64 image, patch 8; ``ViltProcessor`` (WordPiece vocab above, max 40 tokens) | ``dandelin/vilt-b32-mlm`` (ViLT, §3.4, App. B.3) |

``ensure_tiny_models()`` rebuilds only when a folder is missing or the build spec changed (sizes,
seed, the benchmark text the tokenizers learn from, library versions); a stamp file records the
spec's hash, and a file lock lets several processes share one cache directory.

**Paper size** (``ensure_models("paper")``, ``jobs.make_tiny_models --size paper``): the same five
folders and keys, random-initialised from the paper models' architectures written here (no
download), so a benchmark pays the real FLOPs (5.9 GB on disk, ``.cache/tmr-models-paper``):

| key               | architecture (config written in code)                                                   | params |
|-------------------|-----------------------------------------------------------------------------------------|--------|
| ``text_encoder``  | ``BertConfig()`` defaults = bert-base-uncased: 12 layers, hidden 768, 12 heads, 512 positions | 109 M |
| ``image_encoder`` | ``ResNetConfig()`` defaults = ResNet-50 (bottleneck 3-4-6-3, 256…2048); 224 px → 7×7 | 24 M |
| ``text_to_image`` | Stable Diffusion v1.5: UNet (320-640-1280-1280, cross-attention 768), SD's AutoencoderKL (128-256-512-512, 8×), CLIP ViT-L/14 text encoder; 128 px by default (``PaperModelSpec.diffusion_image_size``) | 1066 M |
| ``detector``      | ``OwlViTConfig()`` defaults = OWL-ViT B/32 (768 px, 576 patches; OWLv2-B/16 would be 4× the tokens) | 153 M |
| ``mde_backbone``  | ``ViltConfig()`` defaults = ViLT-B/32 (384 px, patch 32)                              | 112 M |

Tokenizers: the tiny build's, trained on the same benchmark text (a sentence tokenises to the same
pieces at both sizes), with their vocabularies padded by never-produced entries (``[unused…]``,
``<|unused…|>``) to the paper models' embedding rows: 30,522 WordPiece (BERT, ViLT) and 49,408 CLIP
BPE with ``<|startoftext|>``/``<|endoftext|>`` at 49406/49407, as in CLIP. So every embedding table
has its published size; only its reachable rows are fewer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_MODEL_NAMES = {
    "text_encoder": "text-encoder",
    "image_encoder": "image-encoder",
    "text_to_image": "text-to-image",
    "detector": "detector",
    "mde_backbone": "mde-backbone",
}
PAPER_MODEL_NAMES = {  # what the paper configs load in place of each tiny model
    "text_encoder": "bert-base-uncased",
    "image_encoder": "microsoft/resnet-50",
    "text_to_image": "stabilityai/stable-diffusion-2",
    "detector": "google/owlv2-base-patch16-ensemble",
    "mde_backbone": "dandelin/vilt-b32-mlm",
}
DEFAULT_CACHE_DIR = ".cache/tmr-models"
MODEL_SIZES = ("tiny", "paper")
DEFAULT_CACHE_DIRS = {"tiny": DEFAULT_CACHE_DIR, "paper": ".cache/tmr-models-paper"}
STAMP_NAME = "build-spec.json"
BUILD_VERSION = 2  # bump when the build code changes in a way the spec does not show

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(10)]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (contractions, letters, single digits, other symbols)
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SD_SCHEDULER_CONFIG = {  # Stable Diffusion's noise schedule; a scheduler class ignores keys it lacks
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,  # PNDM needs it to run without PRK warm-up steps
}


@dataclass
class TinyModelSpec:
    """Everything that decides the tiny models' bytes; its hash names a build."""

    seed: int = 0
    corpus_seed: int = 0  # the synthetic benchmark seed whose text trains the tokenizers
    wordpiece_vocab_size: int = 1000
    bpe_vocab_size: int = 1000
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_max_positions: int = 128
    # three stages downsample 16× (ResNet-50's four: 32×), so 112 px gives the paper's 7×7 = 49
    # patches at a quarter of 224 px's pixels: the synthetic images are 64 px anyway
    resnet_widths: tuple[int, ...] = (16, 32, 64)
    resnet_input_size: int = 112
    scheduler: str = "EulerDiscreteScheduler"
    diffusion_image_size: int = 64
    detector_image_size: int = 64
    detector_patch_size: int = 8
    vilt_image_size: int = 64
    vilt_patch_size: int = 8
    vilt_max_text_len: int = 40

    @property
    def resnet_downsampling(self) -> int:
        """Stem (conv + max-pool) 4×, then 2× per stage after the first."""
        return 4 * 2 ** max(0, len(self.resnet_widths) - 1)

    def __post_init__(self) -> None:
        problems = []
        if self.resnet_input_size % self.resnet_downsampling:
            problems.append(
                f"resnet_input_size must be a multiple of {self.resnet_downsampling} (a {len(self.resnet_widths)}-stage "
                f"ResNet downsamples {self.resnet_downsampling}×), got {self.resnet_input_size}"
            )
        if self.diffusion_image_size % 4:
            problems.append(f"diffusion_image_size must be a multiple of 4 (the tiny VAE downsamples 4×), got {self.diffusion_image_size}")
        if self.detector_image_size % self.detector_patch_size or self.vilt_image_size % self.vilt_patch_size:
            problems.append("image sizes must be multiples of their patch sizes")
        if not self.resnet_widths:
            problems.append("resnet_widths: at least one stage")
        if self.text_hidden_size % self.text_heads:
            problems.append("text_hidden_size must be divisible by text_heads")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class PaperModelSpec:
    """The paper models' architectures at full size, random-initialised; its hash names a build.

    Layer counts and widths are the library configs' defaults or Stable Diffusion v1.5's, written
    in the builders below; only what a benchmark may want to shrink is a field here.
    """

    seed: int = 0
    corpus_seed: int = 0  # the tokenizers are the tiny build's, learnt from this benchmark seed's text
    learned_wordpiece_size: int = 1000  # = TinyModelSpec.wordpiece_vocab_size: the same pieces as tiny
    learned_bpe_size: int = 1000  # = TinyModelSpec.bpe_vocab_size
    wordpiece_vocab_size: int = 30522  # bert-base-uncased's and ViLT's embedding rows
    clip_vocab_size: int = 49408  # CLIP's (SD's text encoder, OWL-ViT's text tower)
    scheduler: str = "EulerDiscreteScheduler"
    # SD v1.5 runs at 512 px (64×64 latents); 128 px (16×16) keeps a CPU run to seconds per image
    # while every layer stays full width; the job's height/width may ask for any multiple of 8
    diffusion_image_size: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.diffusion_image_size % 64:
            problems.append(f"diffusion_image_size must be a multiple of 64 (SD's VAE 8× then the UNet's 8×), "
                            f"got {self.diffusion_image_size}")
        if self.wordpiece_vocab_size < self.learned_wordpiece_size or self.clip_vocab_size < self.learned_bpe_size:
            problems.append("the padded vocab sizes must be at least the learnt ones")
        if problems:
            raise ValueError("; ".join(problems))


def spec_hash(spec: TinyModelSpec | PaperModelSpec) -> str:
    """A hash of the spec, the tokenizer corpus, the build version and the library versions."""
    import diffusers
    import tokenizers
    import torch
    import transformers

    from tmr_core.synthetic import synthetic_corpus

    payload = {
        "spec": dataclasses.asdict(spec),
        # the tokenizers are trained on the benchmark text: a change in the generator means a rebuild
        "corpus": hashlib.sha256("\n".join(synthetic_corpus(seed=spec.corpus_seed, size="tiny")).encode()).hexdigest(),
        "build_version": BUILD_VERSION,
        "versions": [transformers.__version__, diffusers.__version__, tokenizers.__version__, torch.__version__],
    }
    if isinstance(spec, PaperModelSpec):  # the tiny payload stays as it was, so tiny caches stay valid
        payload["size"] = "paper"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tiny_model_paths(out_dir: str | Path = DEFAULT_CACHE_DIR) -> dict[str, str]:
    """Role key -> folder of each tiny model under ``out_dir`` (absolute paths)."""
    root = Path(out_dir).resolve()
    return {key: str(root / folder) for key, folder in TINY_MODEL_NAMES.items()}


# --------------------------------------------------------------------------- tokenizers


def learn_bpe_merges(words: dict[tuple[str, ...], int], max_merges: int, join, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE merge learning with a deterministic tie-break.

    ``tokenizers``' trainers break count ties by hash-map order, so two runs on the same text give
    different vocabularies (checked: 36 WordPiece tokens differed between two runs). The merge
    selection is therefore done here, by count and then by the pair's text; normalisation and
    pre-tokenisation stay ``tokenizers``' own, and the result loads into the real tokenizer classes.

    Args:
        words: each pre-tokenized word as its initial symbols -> its count in the corpus.
        max_merges: stop after this many merges.
        join: how two symbols merge into one (WordPiece drops the ``##`` of the right one).
        min_frequency: stop when the most frequent pair is rarer than this.
    """
    from collections import Counter

    current = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, count in current.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        merged = join(*best)
        updated: dict[tuple[str, ...], int] = {}
        for symbols, count in current.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            updated[tuple(out)] = updated.get(tuple(out), 0) + count
        current = updated
    return merges


def _word_counts(corpus: list[str], normalizer, pre_tokenizer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in corpus:
        for word, _offsets in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    return dict(sorted(counts.items()))


def train_wordpiece_vocab(corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A lowercase BERT WordPiece vocab trained on ``corpus``; the alphabet covers a-z, 0-9 and punctuation.

    Layout: the special tokens (``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``,
    ``[unused0-9]`` for the RE entity markers), the characters, the same with ``##``, then one
    token per merge.
    """
    from tokenizers import normalizers, pre_tokenizers

    counts = _word_counts(corpus, normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer())
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation) | {c for w in counts for c in w})
    words = {(w[0], *(f"##{c}" for c in w[1:])): n for w, n in counts.items()}
    base = BERT_SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    merges = learn_bpe_merges(words, max(vocab_size - len(base), 0), join=lambda a, b: a + b.removeprefix("##"))
    tokens = list(base)
    for a, b in merges:
        token = a + b.removeprefix("##")
        if token not in tokens:
            tokens.append(token)
    return {token: i for i, token in enumerate(tokens)}


def train_clip_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE (``</w>`` word ends) trained on ``corpus``.

    The vocab is laid out as CLIP's: the 256 byte symbols, the same with ``</w>``, one token per
    merge in merge order (first occurrence), then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id, which the
    CLIP/OWL-ViT text towers pool at).

    Returns:
        ``(vocab, merges)`` as written to ``vocab.json`` and ``merges.txt``.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    counts = _word_counts(corpus, normalizer, pre_tokenizer)
    words = {(*w[:-1], w[-1] + "</w>"): n for w, n in counts.items()}
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = byte_symbols + [s + "</w>" for s in byte_symbols]
    pairs = learn_bpe_merges(words, max(vocab_size - len(base) - 2, 0), join=lambda a, b: a + b)
    tokens = list(dict.fromkeys(base + [a + b for a, b in pairs]))  # two merges may yield one token
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}, [f"{a} {b}" for a, b in pairs]


def pad_wordpiece_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """``vocab`` followed by ``[unusedN]`` entries up to ``size`` ids (bert-base keeps 994 of them too).

    The pre-tokenizer splits ``[`` and ``]`` off, so text never produces a padding entry: the
    tokenisation is ``vocab``'s, only the embedding table grows to the paper model's rows.
    """
    if size < len(vocab):
        raise ValueError(f"size: {size} is smaller than the vocab ({len(vocab)})")
    padded = dict(vocab)
    n = 0
    while len(padded) < size:
        padded.setdefault(f"[unused{n}]", len(padded))
        n += 1
    return padded


def pad_clip_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """A CLIP BPE vocab grown to ``size`` ids with ``<|unusedN|>`` entries before BOS/EOS.

    BOS and EOS stay the last two ids (49406/49407 at CLIP's 49,408, as in CLIP); no merge
    produces a padding entry, so the tokenisation is unchanged.
    """
    if size < len(vocab):
        raise ValueError(f"size: {size} is smaller than the vocab ({len(vocab)})")
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in (CLIP_BOS, CLIP_EOS)]
    tokens += [f"<|unused{n}|>" for n in range(size - len(tokens) - 2)] + [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}


def _write_clip_files(directory: Path, vocab: dict[str, int], merges: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def _clip_tokenizer(vocab_path: Path, merges_path: Path, max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=max_length)


# --------------------------------------------------------------------------- models


def build_text_encoder(spec: TinyModelSpec, vocab: dict[str, int]):
    """``(BertModel, BertTokenizerFast)``: the tiny stand-in for bert-base-uncased."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=spec.text_max_positions)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=spec.text_hidden_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        intermediate_size=spec.text_hidden_size * 2,
        max_position_embeddings=spec.text_max_positions,
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(spec.seed)
    return BertModel(config).eval(), tokenizer


def build_image_encoder(spec: TinyModelSpec):
    """``(ResNetModel, image processor)`` whose last feature map is 7×7 for the processor's output."""
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3,
        embedding_size=spec.resnet_widths[0],
        hidden_sizes=list(spec.resnet_widths),
        depths=[1] * len(spec.resnet_widths),
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
    )
    # ResNet-50's processor recipe: resize the short side to size/0.875, centre-crop size
    processor = ConvNextImageProcessorPil(size={"shortest_edge": spec.resnet_input_size}, crop_pct=0.875)
    torch.manual_seed(spec.seed + 1)
    return ResNetModel(config).eval(), processor


def scheduler_from_name(name: str, config: dict | None = None):
    """A diffusers scheduler by class name (e.g. ``EulerDiscreteScheduler``) on Stable Diffusion's schedule."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class (e.g. EulerDiscreteScheduler, DDIMScheduler)")
    base = dict(SD_SCHEDULER_CONFIG)
    base.update(config or {})
    # keep only the keys this class takes, so no "unexpected config" warnings are logged
    return cls.from_config({k: v for k, v in base.items() if k in _init_params(cls)})


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def build_text_to_image(spec: TinyModelSpec, clip_vocab: Path, clip_merges: Path):
    """A tiny ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder + tokenizer, scheduler)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer(clip_vocab, clip_merges, max_length=77)
    latent_size = spec.diffusion_image_size // 4
    torch.manual_seed(spec.seed + 2)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),  # 3 blocks → 4× downsampling
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=spec.diffusion_image_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler_from_name(spec.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_detector(spec: TinyModelSpec, clip_vocab: Path, clip_merges: Path):
    """``(OwlViTForObjectDetection, OwlViTProcessor)``: a zero-shot detector queried with phrases."""
    import torch
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil, OwlViTProcessor

    tokenizer = _clip_tokenizer(clip_vocab, clip_merges, max_length=16)  # OWL-ViT queries are 16 tokens
    size = {"height": spec.detector_image_size, "width": spec.detector_image_size}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tokenizer)
    config = OwlViTConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": spec.detector_image_size, "patch_size": spec.detector_patch_size,
        },
        projection_dim=32,  # must equal the towers' hidden size for the box/class heads
    )
    torch.manual_seed(spec.seed + 3)
    return OwlViTForObjectDetection(config).eval(), processor


def build_mde_backbone(spec: TinyModelSpec, vocab: dict[str, int]):
    """``(ViltModel, ViltProcessor)``: the single-stream transformer of the MDE (§3.4)."""
    import torch
    from transformers import BertTokenizerFast, ViltConfig, ViltImageProcessorPil, ViltModel, ViltProcessor

    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=spec.vilt_max_text_len)
    image_processor = ViltImageProcessorPil(size={"shortest_edge": spec.vilt_image_size}, size_divisor=spec.vilt_patch_size)
    config = ViltConfig(
        vocab_size=len(vocab),
        hidden_size=spec.text_hidden_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        intermediate_size=spec.text_hidden_size * 2,
        image_size=spec.vilt_image_size,
        patch_size=spec.vilt_patch_size,
        max_position_embeddings=spec.vilt_max_text_len,
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(spec.seed + 4)
    return ViltModel(config).eval(), ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --------------------------------------------------------------------------- paper-size models


def build_paper_text_encoder(spec: PaperModelSpec, vocab: dict[str, int]):
    """``(BertModel, BertTokenizerFast)`` with bert-base-uncased's architecture (``BertConfig`` defaults)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig(vocab_size=len(vocab), pad_token_id=vocab["[PAD]"])  # 12 × 768, 12 heads, 3072, 512 pos
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=config.max_position_embeddings)
    torch.manual_seed(spec.seed)
    return BertModel(config).eval(), tokenizer


def build_paper_image_encoder(spec: PaperModelSpec):
    """``(ResNetModel, processor)``: ResNet-50 (``ResNetConfig`` defaults), 224 px → 7×7 = 49 patches."""
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    # microsoft/resnet-50's processor: short side to 224/0.875, centre crop 224
    processor = ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875)
    torch.manual_seed(spec.seed + 1)
    return ResNetModel(ResNetConfig()).eval(), processor


def sd15_unet(sample_size: int):
    """Stable Diffusion v1.5's UNet (860 M): the diffusers defaults with CLIP ViT-L/14's 768-wide context."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd_vae(sample_size: int):
    """Stable Diffusion's AutoencoderKL (84 M): 4 blocks 128-256-512-512, 8× downsampling, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def clip_vit_l14_text_config(tokenizer):
    """CLIP ViT-L/14's text tower (SD v1's text encoder, 123 M): 12 layers, hidden 768, 12 heads."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_paper_text_to_image(spec: PaperModelSpec, clip_vocab: Path, clip_merges: Path):
    """A ``StableDiffusionPipeline`` with SD v1.5's UNet, VAE and text encoder at ``diffusion_image_size``."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer(clip_vocab, clip_merges, max_length=77)
    torch.manual_seed(spec.seed + 2)
    unet = sd15_unet(spec.diffusion_image_size // 8)
    vae = sd_vae(spec.diffusion_image_size)
    text_encoder = CLIPTextModel(clip_vit_l14_text_config(tokenizer)).eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler_from_name(spec.scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_paper_detector(spec: PaperModelSpec, clip_vocab: Path, clip_merges: Path):
    """``(OwlViTForObjectDetection, OwlViTProcessor)``: OWL-ViT B/32 (``OwlViTConfig`` defaults, 768 px)."""
    import torch
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil, OwlViTProcessor

    tokenizer = _clip_tokenizer(clip_vocab, clip_merges, max_length=16)
    config = OwlViTConfig(text_config={
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    })
    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tokenizer)
    torch.manual_seed(spec.seed + 3)
    return OwlViTForObjectDetection(config).eval(), processor


def build_paper_mde_backbone(spec: PaperModelSpec, vocab: dict[str, int]):
    """``(ViltModel, ViltProcessor)``: ViLT-B/32 (``ViltConfig`` defaults, 384 px, 40 text tokens)."""
    import torch
    from transformers import BertTokenizerFast, ViltConfig, ViltImageProcessorPil, ViltModel, ViltProcessor

    config = ViltConfig(vocab_size=len(vocab), pad_token_id=vocab["[PAD]"])
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=config.max_position_embeddings)
    image_processor = ViltImageProcessorPil(size={"shortest_edge": config.image_size}, size_divisor=config.patch_size)
    torch.manual_seed(spec.seed + 4)
    return ViltModel(config).eval(), ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


def paper_tokenizer_files(spec: PaperModelSpec, work_dir: Path) -> tuple[dict[str, int], Path, Path]:
    """The tiny build's tokenizers padded to the paper vocab sizes: (WordPiece vocab, CLIP vocab.json, merges.txt)."""
    from tmr_core.synthetic import synthetic_corpus

    corpus = synthetic_corpus(seed=spec.corpus_seed, size="tiny")
    wordpiece = pad_wordpiece_vocab(train_wordpiece_vocab(corpus, spec.learned_wordpiece_size), spec.wordpiece_vocab_size)
    clip_vocab, clip_merges = train_clip_bpe(corpus, spec.learned_bpe_size)
    vocab_path, merges_path = _write_clip_files(work_dir, pad_clip_vocab(clip_vocab, spec.clip_vocab_size), clip_merges)
    return wordpiece, vocab_path, merges_path


def save_paper_models(spec: PaperModelSpec, out_dir: str | Path, work_dir: str | Path) -> dict[str, str]:
    """Build and ``save_pretrained`` each paper-size model in turn (one in memory at a time: SD alone is 4.3 GB)."""
    import gc

    wordpiece, vocab_path, merges_path = paper_tokenizer_files(spec, Path(work_dir))
    paths = tiny_model_paths(out_dir)
    builders = {
        "text_encoder": lambda: build_paper_text_encoder(spec, wordpiece),
        "image_encoder": lambda: build_paper_image_encoder(spec),
        "detector": lambda: build_paper_detector(spec, vocab_path, merges_path),
        "mde_backbone": lambda: build_paper_mde_backbone(spec, wordpiece),
    }
    for key, build in builders.items():
        model, processor = build()
        model.save_pretrained(paths[key])
        processor.save_pretrained(paths[key])
        del model
        gc.collect()
    pipeline = build_paper_text_to_image(spec, vocab_path, merges_path)
    pipeline.save_pretrained(paths["text_to_image"])
    tok = pipeline.tokenizer
    _write_clip_files(Path(paths["text_to_image"]) / "tokenizer", _ordered_vocab(tok), _merges_of(tok))
    return paths


@dataclass
class TinyModels:
    """The in-memory tiny models (each a model plus its processor/tokenizer, or a pipeline)."""

    text_encoder: tuple[Any, Any]
    image_encoder: tuple[Any, Any]
    text_to_image: Any
    detector: tuple[Any, Any]
    mde_backbone: tuple[Any, Any]


def build_tiny_models(spec: TinyModelSpec | None = None, work_dir: str | Path | None = None) -> TinyModels:
    """Train the tokenizers on the benchmark text and build every tiny model (not saved).

    Args:
        spec: sizes and seeds (defaults: :class:`TinyModelSpec`).
        work_dir: where the CLIP ``vocab.json``/``merges.txt`` are written (a temp dir when None).
    """
    import tempfile

    from tmr_core.synthetic import synthetic_corpus

    spec = spec or TinyModelSpec()
    corpus = synthetic_corpus(seed=spec.corpus_seed, size="tiny")
    wordpiece = train_wordpiece_vocab(corpus, spec.wordpiece_vocab_size)
    clip_vocab, clip_merges = train_clip_bpe(corpus, spec.bpe_vocab_size)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="tmr-clip-bpe-"))
    vocab_path, merges_path = _write_clip_files(work, clip_vocab, clip_merges)
    return TinyModels(
        text_encoder=build_text_encoder(spec, wordpiece),
        image_encoder=build_image_encoder(spec),
        text_to_image=build_text_to_image(spec, vocab_path, merges_path),
        detector=build_detector(spec, vocab_path, merges_path),
        mde_backbone=build_mde_backbone(spec, wordpiece),
    )


def save_tiny_models(models: TinyModels, out_dir: str | Path) -> dict[str, str]:
    """``save_pretrained`` every tiny model into its folder under ``out_dir``; returns the paths."""
    paths = tiny_model_paths(out_dir)
    for key in ("text_encoder", "image_encoder", "detector", "mde_backbone"):
        model, processor = getattr(models, key)
        model.save_pretrained(paths[key])
        processor.save_pretrained(paths[key])
    models.text_to_image.save_pretrained(paths["text_to_image"])
    tokenizer_dir = Path(paths["text_to_image"]) / "tokenizer"
    # keep CLIP's own file pair beside tokenizer.json, as the real checkpoints ship it
    tok = models.text_to_image.tokenizer
    _write_clip_files(tokenizer_dir, _ordered_vocab(tok), _merges_of(tok))
    return paths


def _ordered_vocab(tokenizer) -> dict[str, int]:
    return dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def _merges_of(tokenizer) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _quiet_libraries() -> None:
    """No progress bars while building (they flood job and test logs)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def ensure_tiny_models(out_dir: str | Path = DEFAULT_CACHE_DIR, spec: TinyModelSpec | PaperModelSpec | None = None,
                       force: bool = False) -> dict[str, str]:
    """The models of ``spec`` (tiny by default) under ``out_dir``, built only when missing or when the build spec changed.

    A stamp file (``build-spec.json``) holds the spec's hash; a file lock (``.lock``) makes
    concurrent callers wait for one build. Models are built in a temp folder and moved into place.

    Returns:
        Role key (``TINY_MODEL_NAMES``) -> absolute folder path, each loadable with ``from_pretrained``.
    """
    import fcntl

    spec = spec or TinyModelSpec()
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    paths = tiny_model_paths(root)
    wanted = spec_hash(spec)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _stamp_hash(root) == wanted and all(Path(p).is_dir() for p in paths.values()):
            return paths
        _quiet_libraries()
        started = time.perf_counter()
        staging = root / f".build-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staged = _build_into(spec, staging)
        (root / STAMP_NAME).unlink(missing_ok=True)  # a crash below leaves no stale stamp
        for key, folder in TINY_MODEL_NAMES.items():
            shutil.rmtree(root / folder, ignore_errors=True)
            os.replace(staged[key], root / folder)
        shutil.rmtree(staging, ignore_errors=True)
        stamp = {"hash": wanted, "size": model_size_of(spec), "spec": dataclasses.asdict(spec),
                 "build_seconds": round(time.perf_counter() - started, 2)}
        (root / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return paths


def _build_into(spec: TinyModelSpec | PaperModelSpec, staging: Path) -> dict[str, str]:
    """Build ``spec``'s models and save them under ``staging``; returns the saved folders."""
    if isinstance(spec, PaperModelSpec):
        return save_paper_models(spec, staging, work_dir=staging / "_clip-bpe")
    return save_tiny_models(build_tiny_models(spec, work_dir=staging / "_clip-bpe"), staging)


def model_size_of(spec: TinyModelSpec | PaperModelSpec) -> str:
    return "paper" if isinstance(spec, PaperModelSpec) else "tiny"


def spec_for_size(size: str, **fields: Any) -> TinyModelSpec | PaperModelSpec:
    """The build spec of ``size`` (``tiny`` or ``paper``) with ``fields`` overridden."""
    if size not in MODEL_SIZES:
        raise ValueError(f"size: expected one of {list(MODEL_SIZES)}, got {size!r}")
    return (PaperModelSpec if size == "paper" else TinyModelSpec)(**fields)


def ensure_models(size: str = "tiny", out_dir: str | Path | None = None) -> dict[str, str]:
    """The five models at ``size`` (``tiny``: seconds, 8 MB; ``paper``: the published architectures,
    random weights, ~5.9 GB and ~40 s on the first call), built only when missing or stale.

    Args:
        size: ``tiny`` or ``paper``.
        out_dir: the cache folder; default ``DEFAULT_CACHE_DIRS[size]`` (under the git-ignored ``.cache/``).

    Returns:
        The same keys as :func:`ensure_tiny_models`: role -> absolute folder for ``from_pretrained``.
    """
    spec = spec_for_size(size)
    return ensure_tiny_models(out_dir or DEFAULT_CACHE_DIRS[size], spec)


def _stamp_hash(root: Path) -> str | None:
    try:
        return json.loads((root / STAMP_NAME).read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


def folder_size_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
