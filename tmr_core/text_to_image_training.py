"""Training the back-translator: a text-to-image diffusion pipeline fitted to text–image pairs (Eq. 3).

TMR back-translates a sentence t into an image v' = argmax_v̂ p(v̂ | t) with Stable Diffusion
(§3.3, Eq. 3). Off the shelf that is a pretrained model; on the synthetic world, or to adapt SD
to a domain, the pipeline is fitted to pairs whose image agrees with its text. This module is
the noise-prediction objective of diffusers' ``examples/text_to_image/train_text_to_image.py``
and ``train_text_to_image_lora.py``:

    z0 = VAE.encode(v) · scaling_factor,  ε ~ N(0, I),  τ ~ U{0, …, T-1}
    z_τ = noise_scheduler.add_noise(z0, ε, τ)          (DDPM forward process)
    L = ‖ UNet(z_τ, τ, TextEncoder(t)) − target ‖²      target = ε, or v for v-prediction

with the noise scheduler ``DDPMScheduler.from_config`` of the pipeline's own scheduler config.

What trains is a config choice (:class:`TextToImageTrainingConfig`): the UNet fully or through
LoRA adapters on its attention projections (peft, the field's standard for SD fine-tuning), the
text encoder, and the VAE. A VAE that is itself untrained (the tiny pipeline of
:mod:`tmr_core.tiny_models`) gets a short reconstruction phase first (:meth:`TextToImageModel.
reconstruction_loss`), after which its latent scale is measured (:meth:`calibrate_latent_scale`)
so the UNet sees unit-variance latents, as SD's fixed 0.18215 gives for SD's VAE.

A checkpoint (:meth:`TextToImageModel.save_pretrained`) holds the config and the *trained*
tensors only (for LoRA: the adapters), since the rest is the base pipeline; the finished model is
exported as a plain diffusers pipeline folder (:meth:`TextToImageModel.to_pipeline`, LoRA fused)
that ``DiffusionPipeline.from_pretrained`` loads with no knowledge of this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tmr_core import storage

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODULES = ("unet", "text_encoder", "vae")


@dataclass
class TextToImageTrainingConfig:
    """What is fitted and how.

    Args:
        base: the diffusers pipeline fine-tuned: a hub name or a folder with ``model_index.json``.
        revision: hub revision of ``base``.
        resolution: training images are resized to this square size (pixels, multiple of 8).
        train_unet, train_text_encoder, train_vae: which modules are fitted fully. With
            ``lora_rank`` > 0 the UNet is fitted through LoRA adapters instead.
        lora_rank, lora_alpha: LoRA adapter rank (0: no LoRA) and scale numerator.
        lora_target_modules: UNet module names that get adapters (the attention projections).
        caption_dropout: probability of training a sample with the empty prompt (lets
            classifier-free guidance be used at sampling time).
        kl_weight: weight of the VAE's KL term in the reconstruction phase.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` keeps the scheduler's.
        snr_gamma: Min-SNR-γ loss weighting (Hang et al., 2023; diffusers' ``--snr_gamma``): low-noise
            steps weigh less, so the high-noise steps, where the text decides the layout and
            colours, are learned sooner; ``None``: plain MSE.

    Raises:
        ValueError: naming the field that is out of range.
    """

    base: str
    revision: str | None = None
    resolution: int = 512
    train_unet: bool = True
    train_text_encoder: bool = False
    train_vae: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    caption_dropout: float = 0.0
    kl_weight: float = 1e-6
    prediction_type: str | None = None
    snr_gamma: float | None = None
    latent_scale: float | None = None  # filled by calibrate_latent_scale; None: the VAE config's

    def __post_init__(self) -> None:
        self.lora_target_modules = tuple(self.lora_target_modules)
        problems = []
        if not self.base:
            problems.append("base: name a diffusers pipeline (hub name or folder)")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"resolution: must be a positive multiple of 8, got {self.resolution}")
        if self.lora_rank < 0:
            problems.append(f"lora_rank: must be ≥ 0, got {self.lora_rank}")
        if self.lora_rank and not self.lora_target_modules:
            problems.append("lora_target_modules: name at least one UNet module for the adapters")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            problems.append(f"prediction_type: epsilon | v_prediction | null, got {self.prediction_type!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"snr_gamma: must be > 0 or null, got {self.snr_gamma}")
        if not (self.train_unet or self.lora_rank or self.train_text_encoder or self.train_vae):
            problems.append("nothing to train: set train_unet, lora_rank, train_text_encoder or train_vae")
        if problems:
            raise ValueError("invalid TextToImageTrainingConfig: " + "; ".join(problems))


@dataclass
class TextToImageOutput:
    """``loss``: the scalar objective of the batch; ``per_sample``: [B] losses (evaluation)."""

    loss: torch.Tensor
    per_sample: torch.Tensor | None = None


@dataclass
class PipelineParts:
    """The pieces of a loaded diffusers pipeline this module uses."""

    pipeline: Any
    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    noise_scheduler: Any
    extra: dict = field(default_factory=dict)


def load_parts(base: str, revision: str | None = None) -> PipelineParts:
    """The pipeline's UNet, text encoder, VAE, tokenizer and a ``DDPMScheduler`` from its scheduler config."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(base, revision=revision)
    missing = [name for name in ("unet", "text_encoder", "vae", "tokenizer") if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(f"base {base!r}: a {type(pipeline).__name__} has no {missing}; fine-tune a Stable Diffusion pipeline")
    return PipelineParts(pipeline, pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer,
                         DDPMScheduler.from_config(pipeline.scheduler.config))


class TextToImageModel(nn.Module):
    """A Stable-Diffusion-class pipeline's trainable modules with the noise-prediction loss.

    Args:
        config: what trains (see :class:`TextToImageTrainingConfig`).
        parts: the base pipeline's pieces (:func:`load_parts`); loaded from ``config.base`` if None.

    ``state_dict`` / ``load_state_dict`` cover the tensors that train (all of a fully trained
    module, only the adapters of a LoRA UNet) plus the latent scale; the frozen rest is the base.
    The VAE's parameters stay frozen outside :func:`reconstruction_phase`.
    """

    def __init__(self, config: TextToImageTrainingConfig, parts: PipelineParts | None = None):
        super().__init__()
        self.config = config
        parts = parts or load_parts(config.base, config.revision)
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.noise_scheduler
        self._pipeline = parts.pipeline
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        scale = config.latent_scale if config.latent_scale is not None else float(self.vae.config.scaling_factor)
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        self.unet.requires_grad_(config.train_unet and not config.lora_rank)
        self.text_encoder.requires_grad_(config.train_text_encoder)
        self.vae.requires_grad_(config.train_vae)
        if config.lora_rank:
            self._add_lora()
        self._saved_names = frozenset(
            [name for name, p in self.named_parameters() if p.requires_grad] + ["latent_scale"])
        # the VAE trains in its own phase (reconstruction_phase), never under the denoising loss,
        # so the denoising optimizer holds the same parameters on a fresh start and on a resume
        self.vae.requires_grad_(False)

    def _add_lora(self) -> None:
        """LoRA adapters on the UNet's attention projections, as train_text_to_image_lora.py adds them."""
        from peft import LoraConfig

        lora = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha or self.config.lora_rank,
                          init_lora_weights="gaussian", target_modules=list(self.config.lora_target_modules))
        self.unet.add_adapter(lora)

    # ------------------------------------------------------------------ state: trained tensors only

    def state_dict(self, *, prefix: str = "", keep_vars: bool = False, **kwargs: Any) -> dict:  # type: ignore[override]
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars, **kwargs)
        return {k: v for k, v in full.items() if k[len(prefix):] in self._saved_names}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in self._saved_names]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"TextToImageModel.load_state_dict: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]} (a checkpoint of another config?)")
        return result._replace(missing_keys=missing)

    def trained_modules(self) -> list[str]:
        """Names of the modules with trained tensors (a LoRA UNet counts)."""
        return [name for name in MODULES if any(k.startswith(name + ".") for k in self._saved_names)]

    # ------------------------------------------------------------------ inputs

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, max_length] token ids, padded as the pipeline pads at sampling time."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    # ------------------------------------------------------------------ objectives

    def encode_latents(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, C, H/f, W/f] scaled latents z0 (no gradient into the VAE)."""
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample(generator)
        return latents * self.latent_scale

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                generator: torch.Generator | None = None) -> TextToImageOutput:
        """The denoising loss of a batch (Ho et al., 2020; Rombach et al., 2022).

        Args:
            pixel_values: [B, 3, H, W] images scaled to [-1, 1].
            input_ids: [B, L] prompt token ids (:meth:`tokenize`).
            generator: seeds noise, timesteps and VAE sampling (fixed for a comparable valid loss).

        Returns:
            :class:`TextToImageOutput` with the mean MSE and the per-sample MSE.
        """
        latents = self.encode_latents(pixel_values, generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        num_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_steps, (latents.shape[0],), generator=generator,
                                  device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self.text_encoder(input_ids, return_dict=False)[0]  # [B, L, D]
        prediction = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        target = self._target(latents, noise, timesteps)
        per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # [B]
        weighted = per_sample * self._snr_weights(timesteps) if self.config.snr_gamma else per_sample
        return TextToImageOutput(weighted.mean(), per_sample.detach())

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights, as diffusers' train_text_to_image.py computes them."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)  # [B]
        clipped = torch.clamp(snr, max=self.config.snr_gamma)
        prediction_type = self.config.prediction_type or self.noise_scheduler.config.prediction_type
        return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        prediction_type = self.config.prediction_type or self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"prediction_type: {prediction_type!r} is neither epsilon nor v_prediction")

    def reconstruction_loss(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The VAE's objective for a VAE trained from scratch: pixel MSE + ``kl_weight`` · KL."""
        posterior = self.vae.encode(pixel_values).latent_dist
        decoded = self.vae.decode(posterior.sample(generator)).sample
        return nn.functional.mse_loss(decoded, pixel_values) + self.config.kl_weight * posterior.kl().mean()

    @torch.no_grad()
    def calibrate_latent_scale(self, pixel_values: torch.Tensor) -> float:
        """Set the latent scale to 1 / std of the images' latents (SD's 0.18215 does this for SD's VAE)."""
        latents = self.vae.encode(pixel_values).latent_dist.sample()
        scale = float(1.0 / latents.std().clamp_min(1e-6))
        self.latent_scale.fill_(scale)
        self.config.latent_scale = scale
        return scale

    # ------------------------------------------------------------------ saving and export

    def save_pretrained(self, directory: str, options: storage.StorageOptions | None = None) -> None:
        """``config.json`` + ``model.safetensors`` (the trained tensors) in a local or s3:// folder."""
        from safetensors.torch import save

        self.config.latent_scale = float(self.latent_scale)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        storage.write_text_atomic(storage.join(directory, CONFIG_NAME), json.dumps(asdict(self.config), indent=2), options)
        storage.write_bytes_atomic(storage.join(directory, WEIGHTS_NAME), save(tensors), options)

    @classmethod
    def from_pretrained(cls, directory: str, device: str | torch.device = "cpu",
                        options: storage.StorageOptions | None = None) -> TextToImageModel:
        """A checkpoint folder (:meth:`save_pretrained`) on top of its base pipeline."""
        from safetensors.torch import load

        config = json.loads(storage.read_bytes(storage.join(directory, CONFIG_NAME), options))
        model = cls(TextToImageTrainingConfig(**config))
        model.load_state_dict(load(storage.read_bytes(storage.join(directory, WEIGHTS_NAME), options)))
        return model.to(device)

    def to_pipeline(self) -> Any:
        """The base pipeline carrying the trained modules (LoRA fused into the UNet's weights) and
        the calibrated latent scale: ``save_pretrained`` of it is a plain diffusers folder.

        Call it once, at the end: fusing changes this model's UNet in place.
        """
        if self.config.lora_rank:
            self.unet.fuse_lora()
            self.unet.unload_lora()
        self.vae.register_to_config(scaling_factor=float(self.latent_scale))
        pipeline = self._pipeline
        prediction_type = self.config.prediction_type
        if prediction_type and prediction_type != pipeline.scheduler.config.get("prediction_type"):
            # the sampler must read the UNet's output as what it was trained to predict
            pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                      prediction_type=prediction_type)
        for name in MODULES:
            setattr(pipeline, name, getattr(self, name))
        pipeline.register_modules(unet=self.unet, text_encoder=self.text_encoder, vae=self.vae)
        return pipeline.to("cpu")


# ---------------------------------------------------------------------- data


def prompt_and_image_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """``{id, prompt, image_uri}`` per row with an image and tokens (the prompt of Eq. 3's p(v̂ | t))."""
    from tmr_core.back_translation import prompt_from_tokens

    kept = []
    for row in rows:
        tokens = row.get("tokens") or []
        if row.get("image_uri") and tokens:
            kept.append({"id": row["id"], "prompt": prompt_from_tokens(tokens), "image_uri": row["image_uri"]})
    return kept


def agreeing_rows(rows: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]],
                  keep_alignments: Sequence[str]) -> tuple[list[Mapping[str, Any]], dict[str, int]]:
    """The rows whose image agrees with the text by the ground truth's alignment label, and whose
    text names the objects to draw.

    An RE row without a typed relation (``None``, and every reverse pair) names no argument types:
    its image's two glyphs are of types the text does not decide, so it would teach a name → some
    type; such rows are dropped (counted as ``"re_untyped"``).

    Returns:
        ``(kept rows, {alignment: count kept or dropped, "unlabelled": rows the truth lacks,
        "re_untyped": RE rows left out for their relation})``; unlabelled rows are dropped.
    """
    from tmr_core.synthetic import RELATIONS

    kept, counts = [], {}
    for row in rows:
        known = truth.get(row["id"], {})
        if known.get("task") == "re" and known.get("relation") not in RELATIONS:
            counts["re_untyped"] = counts.get("re_untyped", 0) + 1
            continue
        label = known.get("alignment", "unlabelled")
        counts[label] = counts.get(label, 0) + 1
        if label in keep_alignments:
            kept.append(row)
    return kept, counts


CROP_CHOICES = (None, "focus_object", "object_panels")


def focus_box(truth_row: Mapping[str, Any]) -> list[float] | None:
    """The box ``[x0, y0, x1, y1]`` (image pixels) of the object a ground-truth row's text is about.

    NER: the focus mention's (the one whose context is not ``fixed``); RE: the union of the head's
    and the tail's boxes (both must be drawn). ``None`` when the image does not show it (a weaken
    donor's image, a missing glyph). Ground truth, so a training-time label only: real data has
    no boxes, and sampling never sees one.
    """
    if truth_row.get("task") == "re":
        head, tail = truth_row.get("head_box"), truth_row.get("tail_box")
        if not head or not tail:
            return None
        return [min(head[0], tail[0]), min(head[1], tail[1]), max(head[2], tail[2]), max(head[3], tail[3])]
    for mention in truth_row.get("mentions") or []:
        if mention.get("context") != "fixed":
            return list(mention["box"]) if mention.get("box") else None
    return None


def square_crop(box: Sequence[float], width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """A square pixel window around ``box`` with ``margin`` × its longer side added on each side,
    shifted (not shrunk) to stay inside the ``width`` × ``height`` image where it fits."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    side = int(round(min(max(side, 1.0), width, height)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(min(max(cx - side / 2.0, 0.0), width - side)))
    top = int(round(min(max(cy - side / 2.0, 0.0), height - side)))
    return left, top, left + side, top + side


def object_boxes(truth_row: Mapping[str, Any]) -> list[list[float]] | None:
    """The boxes of the objects a ground-truth row's text decides, one panel each: NER's focus
    object; RE's head, then its tail (``None`` when the image does not show them all)."""
    if truth_row.get("task") == "re":
        head, tail = truth_row.get("head_box"), truth_row.get("tail_box")
        return [list(head), list(tail)] if head and tail else None
    box = focus_box(truth_row)
    return [box] if box is not None else None


def crop_rows(rows: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]],
              crop_to: str | None) -> tuple[list[dict], int]:
    """Rows with ``crop`` for ``crop_to="focus_object"`` (the box of :func:`focus_box`) or
    ``"object_panels"`` (the list of :func:`object_boxes`: the collator puts each object's window
    side by side, the head left of the tail); rows without a box are dropped. Returns
    ``(rows, dropped)``; ``crop_to=None`` keeps rows as they are."""
    if crop_to not in CROP_CHOICES:
        raise ValueError(f"crop_to: one of {CROP_CHOICES}, got {crop_to!r}")
    if crop_to is None:
        return [dict(row) for row in rows], 0
    boxes_of = focus_box if crop_to == "focus_object" else object_boxes
    kept = []
    for row in rows:
        box = boxes_of(truth.get(row["id"], {}))
        if box is not None:
            kept.append({**row, "crop": box})
    return kept, len(rows) - len(kept)


def panels(image: Any, boxes: Sequence[Sequence[float]], size: int, margin: float) -> Any:
    """A ``size`` × ``size`` image of each box's square window (:func:`square_crop`) side by side,
    left to right, each ``size // len(boxes)`` wide, vertically centred on the image's border colour.

    RE's head and tail lie anywhere in their halves of the scene; their union's window is most of
    the image at 32 px, and a tiny text-to-image model trained on it painted one prompt-independent
    blob (valid fidelity 0.16). Side by side in a fixed layout, each object's own window fills a panel
    (half the side: 1.4–3× the pixel share it had in the union's window) and its place says its role.
    """
    from PIL import Image

    rgb = image.convert("RGB")
    corners = [rgb.getpixel(p) for p in ((0, 0), (rgb.width - 1, 0), (0, rgb.height - 1), (rgb.width - 1, rgb.height - 1))]
    background = tuple(sum(c[i] for c in corners) // len(corners) for i in range(3))
    canvas = Image.new("RGB", (size, size), background)
    side = size // len(boxes)
    for index, box in enumerate(boxes):
        window = rgb.crop(square_crop(box, rgb.width, rgb.height, margin)).resize((side, side), Image.Resampling.BILINEAR)
        canvas.paste(window, (index * side, (size - side) // 2))
    return canvas


class TextImageCollator:
    """Rows ``{prompt, image_uri[, crop]}`` → ``{pixel_values [B, 3, R, R] in [-1, 1], input_ids [B, L]}``.

    Args:
        tokenizer: the pipeline's tokenizer (padded to its ``model_max_length``, as at sampling).
        resolution: square training size; images are resized (bilinear, antialiased). A row's
            ``crop`` box (:func:`crop_rows`) first cuts a square window around it
            (:func:`square_crop` with ``crop_margin``).
        caption_dropout: probability that a prompt is replaced by "" (for classifier-free guidance).
        seed: seeds the caption dropout, so a batch's inputs do not depend on global RNG state.
    """

    def __init__(self, tokenizer: Any, resolution: int, storage_options: storage.StorageOptions | None = None,
                 caption_dropout: float = 0.0, seed: int = 0, crop_margin: float = 0.25):
        import random

        self.tokenizer = tokenizer
        self.crop_margin = crop_margin
        self.resolution = resolution
        self.storage_options = storage_options
        self.caption_dropout = caption_dropout
        self.rng = random.Random(seed)
        self._images: dict[str, torch.Tensor] = {}

    def image_tensor(self, uri: str, crop: Sequence[Any] | None = None) -> torch.Tensor:
        """[3, R, R] in [-1, 1] of the image, of its window around ``crop`` (a box), or of the
        windows around each of ``crop``'s boxes side by side (:func:`panels`); decoded once per
        collator (the training set is re-read each epoch)."""
        key = f"{uri}#{crop!r}" if crop else uri
        if key not in self._images:
            from PIL import Image

            from tmr_core.images import load_image

            image = load_image(uri, self.storage_options)
            if crop and isinstance(crop[0], (list, tuple)):
                image = panels(image, crop, self.resolution, self.crop_margin)
            elif crop:
                image = image.crop(square_crop(crop, image.width, image.height, self.crop_margin))
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            pixels = pixels.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float()
            self._images[key] = pixels / 127.5 - 1.0
        return self._images[key]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [("" if self.caption_dropout and self.rng.random() < self.caption_dropout else row["prompt"])
                   for row in rows]
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": torch.stack([self.image_tensor(row["image_uri"], row.get("crop")) for row in rows]),
                "input_ids": ids}


def reconstruction_phase(model: TextToImageModel, batches: Iterable[Mapping[str, torch.Tensor]], lr: float,
                         device: str | torch.device, on_step: Any = None) -> dict[str, float]:
    """Fit the VAE as an autoencoder (a VAE trained from scratch), freeze it, calibrate the latent scale.

    Returns:
        ``{"vae_loss": last loss, "vae_steps": steps, "latent_scale": scale}``.
    """
    vae_params = [p for p in model.vae.parameters()]
    for p in vae_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae_params, lr=lr, weight_decay=0.0)
    model.vae.train()
    loss_value, steps, last = float("nan"), 0, None
    for batch in batches:
        pixels = batch["pixel_values"].to(device)
        loss = model.reconstruction_loss(pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value, steps, last = loss.item(), steps + 1, pixels
        if on_step:
            on_step(steps, loss_value)
    # drop the last step's gradients with the phase: left on the frozen VAE, they entered every later
    # denoising step's clip_grad_norm_ over model.parameters() (tmr_core.training.train_epoch). Alone a
    # small error in the norm (tiny pipeline: 0.06 next to 2.0), but under DDP each rank's stale
    # gradients differ (the VAE phase is not bitwise reproducible on CUDA), so each rank clipped by its
    # own factor and the ranks' UNets drifted apart although DDP averaged their gradients
    optimizer.zero_grad(set_to_none=True)
    for p in vae_params:
        p.requires_grad_(False)
    model.vae.eval()
    scale = model.calibrate_latent_scale(last) if last is not None else float(model.latent_scale)
    return {"vae_loss": loss_value, "vae_steps": steps, "latent_scale": scale}


@torch.no_grad()
def validation_loss(model: TextToImageModel, batches: Iterable[Mapping[str, torch.Tensor]],
                    device: str | torch.device, seed: int = 0) -> float:
    """Mean denoising loss with fixed noise and timesteps (``seed``), comparable across epochs."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        output = model(batch["pixel_values"].to(device), batch["input_ids"].to(device), generator=generator)
        total += float(output.per_sample.sum())
        count += len(output.per_sample)
    model.train(was_training)
    return total / count if count else float("nan")

