"""Fine-tune the back-translator (Eq. 3's text-to-image pipeline) with Ray Train, tracked in MLflow.

    python -m jobs.finetune_text_to_image --config configs/finetune_text_to_image.yaml
    python -m jobs.finetune_text_to_image --config configs/finetune_text_to_image.tiny.yaml --optim.epochs 5

Reads the training split's text–image pairs of one or more prepared datasets (``jobs.prepare_dataset``
folders: ``id``, ``tokens``, ``image_uri``; the prompt is ``' '.join(tokens)`` as at generation
time) and keeps those whose image agrees with the text: with ``--data.ground_truth`` the rows whose
alignment is in ``data.keep_alignments`` (strengthen and complement: a weakening image would teach
the model to draw the wrong thing), without it every pair. A ``TorchTrainer`` (DDP; local mode with
``ray.num_workers: 0``) fits the pipeline with the denoising loss of
:mod:`tmr_core.text_to_image_training`: fully (the tiny pipeline: UNet, text encoder and, after a
short reconstruction phase, its VAE) or with LoRA on the UNet attention (Stable Diffusion). One
checkpoint per epoch (the trained tensors only), resumable; the best epoch on the valid denoising
loss (fixed noise) is exported as a diffusers pipeline folder ``<output>/model`` that
``DiffusionPipeline.from_pretrained`` and ``jobs.generate_back_translations`` load, with
``metrics.json``; ``--tracking.register_as tmr-t2i`` registers it as ``models:/tmr-t2i@champion``
(``tmr-t2i-ner`` / ``tmr-t2i-re``: a back-translator of one task's pairs, as ``run_pipeline
--back_translators per_task`` trains them).

With a ground truth, the back-translation fidelity probe (:mod:`tmr_core.probes`) samples v' for the
valid and test NER and RE texts with ``probe`` (keep it equal to generate_back_translations' sampling)
and reports how often v' shows the type(s) the text decides, for the base and the trained pipeline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from jobs._common import StorageConfig
from jobs._config import ConfigError, config_to_dict, opt, parse_config, print_config, run_main
from jobs._tracking import TrackingConfig
from jobs._train import DebugConfig, RayTrainConfig

JOB = "finetune_text_to_image"
MONITOR = "valid_neg_denoising_loss"  # higher is better, as TrainState compares
CONTENT_HASH_TAG = "tmr.content_hash"  # registry tag: the pipeline's cache identity, read without a download


@dataclass
class DataConfig:
    """The text–image pairs."""

    datasets: list[str] = opt(["outputs/dataset/ner"], "prepare_dataset folders (local or s3://) whose pairs train the model.")
    dataset_name: str = opt("synthetic", "Name of the data in run names and tags.")
    ground_truth: str | None = opt(
        None, "ground_truth.jsonl (synthetic benchmark): keep only pairs in keep_alignments, and run the fidelity probe; "
        "null: every pair trains."
    )
    keep_alignments: list[str] = opt(["strengthen", "complement"], "Alignments whose image agrees with the text.")
    train_split: str = opt("train", "Split trained on.")
    valid_split: str = opt("valid", "Split whose denoising loss selects the best epoch.")
    max_train_rows: int | None = opt(None, "Use only the first N kept training pairs; null: all.")
    crop_to: str | None = opt(
        None, "null: whole images train | focus_object: each train/valid image is cut to a square around the object "
        "its text is about (ground truth's box: the NER focus mention's, RE's head and tail boxes together; pairs "
        "without a box drop), so the text-decided glyph fills the image | object_panels: the same window per object "
        "the text decides, side by side (RE: head left, tail right; NER: the focus object alone). Synthetic only: "
        "real data has no boxes, and sampling never sees one."
    )
    crop_margin: float = opt(0.25, "focus_object crop: margin added on each side, as a share of the box's longer side.")


@dataclass
class ModelConfig:
    """The pipeline and what of it trains (tmr_core.text_to_image_training.TextToImageTrainingConfig)."""

    base: str = opt("stabilityai/stable-diffusion-2", "diffusers pipeline fine-tuned: hub name or folder.")
    revision: str | None = opt(None, "Hub revision of base.")
    resolution: int = opt(768, "Training image size (square, multiple of 8).")
    train_unet: bool = opt(False, "Fit every UNet weight (without LoRA).")
    train_text_encoder: bool = opt(False, "Fit the text encoder.")
    train_vae: bool = opt(False, "Fit the VAE in a reconstruction phase first (a VAE trained from scratch).")
    lora_rank: int = opt(8, "LoRA rank on the UNet attention projections; 0: no LoRA.")
    lora_alpha: float | None = opt(None, "LoRA alpha; null: the rank (scale 1).")
    lora_target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters.")
    caption_dropout: float = opt(0.1, "Share of samples trained with the empty prompt (classifier-free guidance).")
    snr_gamma: float | None = opt(5.0, "Min-SNR-γ loss weighting; null: plain MSE.")
    prediction_type: str | None = opt(None, "epsilon | v_prediction; null: the scheduler's.")
    kl_weight: float = opt(1e-6, "KL weight of the VAE reconstruction phase.")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and decay; the VAE phase has its own AdamW."""

    lr: float = opt(1e-4, "Peak learning rate of the denoising phase.")
    weight_decay: float = opt(1e-2, "AdamW weight decay on non-bias, non-norm weights.")
    warmup_ratio: float = opt(0.05, "Fraction of the steps spent warming up.")
    batch_size: int = opt(8, "Pairs per step per worker.")
    epochs: int = opt(10, "Passes over the kept training pairs (capped by max_steps).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps; null: epochs decide.")
    grad_clip: float = opt(1.0, "Max global gradient norm; 0 disables clipping.")
    text_encoder_lr_scale: float = opt(
        1.0, "The text encoder's learning rate is lr times this (a random tiny text encoder needs a larger one "
        "before the UNet's cross-attention reads it)."
    )
    vae_steps: int = opt(0, "Steps of the VAE reconstruction phase (model.train_vae).")
    vae_lr: float = opt(2e-3, "Learning rate of the VAE reconstruction phase.")
    vae_batch_size: int = opt(8, "Images per step of the VAE reconstruction phase (many small steps fit a VAE from scratch fastest).")
    eval_batch_size: int = opt(32, "Pairs per validation batch.")


@dataclass
class ProbeConfig:
    """Back-translation fidelity probe (tmr_core.probes); runs with a ground truth."""

    enabled: bool = opt(True, "Sample v' for the probe splits' texts (NER, and RE when a dataset has it) and read their glyph types.")
    splits: list[str] = opt(["valid", "test"], "Splits probed (the ground truth's split field).")
    compare_base: bool = opt(True, "Probe the untrained base pipeline too (metrics base_<split>_bt_fidelity_*).")
    scheduler: str | None = opt("EulerDiscreteScheduler", "Sampling scheduler (as generate_back_translations).")
    steps: int = opt(50, "Denoising steps.")
    guidance_scale: float = opt(7.5, "Classifier-free guidance scale.")
    height: int = opt(768, "Image height.")
    width: int = opt(768, "Image width.")
    seed: int = opt(0, "Every prompt's seed (generate_back_translations' generation.seed).")
    batch_size: int = opt(16, "Prompts per pipeline call.")
    max_rows: int | None = opt(None, "Probe only the first N texts per split and task (NER, RE); null: all.")


@dataclass
class Config:
    """Fine-tune the text-to-image back-translator (TMR Eq. 3) with Ray Train."""

    seed: int = opt(0, "Seed for initialisation, data order, noise and timesteps.")
    force: bool = opt(False, "Train from scratch as a new run, discarding this config's checkpoints (default: resume).")
    output: str = opt("outputs/t2i", "Folder (or s3://) for model/ (a diffusers pipeline), metrics.json and config.yaml.")
    device: str = opt("cpu", "Device of the driver's export and probe (workers use Ray's device).")
    cpu_threads: int | None = opt(
        None, "torch intra-op threads of training and probe on CPU; null: torch's default. The tiny pipeline's small "
        "tensors gain little from more, and on a shared machine 2 threads ran the VAE phase 5x slower than 1."
    )
    data: DataConfig = opt(DataConfig, "The text–image pairs.")
    model: ModelConfig = opt(ModelConfig, "The pipeline.")
    optim: OptimConfig = opt(OptimConfig, "Optimisation.")
    probe: ProbeConfig = opt(ProbeConfig, "Fidelity probe.")
    ray: RayTrainConfig = opt(RayTrainConfig, "Ray Train workers, storage and retries.")
    tracking: TrackingConfig = opt(TrackingConfig, "MLflow.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")
    debug: DebugConfig = opt(DebugConfig, "Test knobs.")


REGISTERED_NAMES = ("tmr-t2i", "tmr-t2i-ner", "tmr-t2i-re")


def check_config(cfg: Config) -> None:
    problems = []
    if not cfg.data.datasets:
        problems.append("--data.datasets: name at least one prepare_dataset folder")
    if cfg.optim.batch_size < 1:
        problems.append(f"--optim.batch_size: expected >= 1, got {cfg.optim.batch_size}")
    if cfg.optim.epochs < 1:
        problems.append(f"--optim.epochs: expected >= 1, got {cfg.optim.epochs}")
    if cfg.optim.max_steps is not None and cfg.optim.max_steps < 1:
        problems.append(f"--optim.max_steps: expected >= 1 or null, got {cfg.optim.max_steps}")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
        problems.append(f"--cpu_threads: expected >= 1 or null, got {cfg.cpu_threads}")
    if cfg.optim.vae_batch_size < 1:
        problems.append(f"--optim.vae_batch_size: expected >= 1, got {cfg.optim.vae_batch_size}")
    if not cfg.optim.text_encoder_lr_scale > 0:
        problems.append(f"--optim.text_encoder_lr_scale: expected > 0, got {cfg.optim.text_encoder_lr_scale}")
    if cfg.optim.vae_steps < 0:
        problems.append(f"--optim.vae_steps: expected >= 0, got {cfg.optim.vae_steps}")
    if cfg.model.train_vae and cfg.optim.vae_steps == 0:
        problems.append("--model.train_vae true needs --optim.vae_steps > 0 (the VAE trains in its own phase)")
    if cfg.data.crop_to not in (None, "focus_object", "object_panels"):
        problems.append(f"--data.crop_to {cfg.data.crop_to}: null, focus_object or object_panels")
    if cfg.data.crop_to and not cfg.data.ground_truth:
        problems.append(f"--data.crop_to {cfg.data.crop_to} needs --data.ground_truth (the objects' boxes)")
    if cfg.data.crop_margin < 0:
        problems.append(f"--data.crop_margin: expected >= 0, got {cfg.data.crop_margin}")
    if cfg.data.ground_truth and not cfg.data.ground_truth.startswith("s3://") and not os.path.isfile(cfg.data.ground_truth):
        problems.append(f"--data.ground_truth {cfg.data.ground_truth}: no such file")
    if cfg.tracking.register_as and cfg.tracking.register_as not in REGISTERED_NAMES:
        problems.append(f"--tracking.register_as {cfg.tracking.register_as}: the back-translator registers as "
                        f"{' or '.join(REGISTERED_NAMES)} (one for both tasks, or a task's own)")
    try:
        training_config(cfg)
    except ValueError as error:
        problems.append(f"--model: {error}")
    if problems:
        raise ConfigError(problems)


def run_name(cfg: Config) -> str:
    kind = f"lora{cfg.model.lora_rank}" if cfg.model.lora_rank else "full"
    return cfg.tracking.run_name or f"t2i/{cfg.data.dataset_name}/{kind}/seed{cfg.seed}"


def training_config(cfg: Config):
    from tmr_core.text_to_image_training import TextToImageTrainingConfig

    m = cfg.model
    return TextToImageTrainingConfig(
        base=m.base, revision=m.revision, resolution=m.resolution, train_unet=m.train_unet,
        train_text_encoder=m.train_text_encoder, train_vae=m.train_vae, lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha, lora_target_modules=tuple(m.lora_target_modules), caption_dropout=m.caption_dropout,
        kl_weight=m.kl_weight, prediction_type=m.prediction_type, snr_gamma=m.snr_gamma,
    )


# --------------------------------------------------------------------------- data (driver)


def load_ground_truth(path: str | None, options) -> dict[str, dict]:
    if not path:
        return {}
    from tmr_core import storage

    text = storage.read_bytes(path, options).decode("utf-8")
    return {row["id"]: row for row in (json.loads(line) for line in text.splitlines() if line.strip())}


def pair_rows(cfg: Config, split: str, truth: dict[str, dict], log: bool = False) -> list[dict]:
    """``{id, prompt, image_uri}`` of every dataset's ``split``, kept by alignment when there is a truth."""
    from jobs import _train
    from tmr_core.text_to_image_training import agreeing_rows, crop_rows, prompt_and_image_rows

    options = cfg.storage.options()
    rows: list[dict] = []
    for dataset in cfg.data.datasets:
        rows.extend(prompt_and_image_rows(_train.read_rows(dataset, split, options)))
    if not truth:
        if log:
            print(f"[{JOB}] {split}: no --data.ground_truth, so all {len(rows)} text–image pairs train "
                  "(a weakening image teaches the wrong picture; give the ground truth to keep agreeing pairs)", flush=True)
        return rows
    kept, counts = agreeing_rows(rows, truth, cfg.data.keep_alignments)
    if log:
        print(f"[{JOB}] {split}: kept {len(kept)} of {len(rows)} pairs with alignment in "
              f"{cfg.data.keep_alignments} (by alignment: {dict(sorted(counts.items()))})", flush=True)
    if cfg.data.crop_to:
        kept, dropped = crop_rows(kept, truth, cfg.data.crop_to)
        if log:
            print(f"[{JOB}] {split}: {len(kept)} images cropped to their {cfg.data.crop_to} "
                  f"(margin {cfg.data.crop_margin}); {dropped} without a box dropped", flush=True)
    return kept


# --------------------------------------------------------------------------- train loop (every worker)


def build_model(cfg: Config):
    from tmr_core.text_to_image_training import TextToImageModel
    from tmr_core.training import set_seed

    set_seed(cfg.seed)
    return TextToImageModel(training_config(cfg))


def denoising_optimizer(model, cfg: Config):
    """AdamW over the trainable parameters (no decay on biases and norms, as build_optimizer), the
    text encoder's at ``optim.text_encoder_lr_scale`` × ``optim.lr`` (the scheduler scales every group)."""
    import torch

    from tmr_core.training import build_optimizer, parameter_groups

    if cfg.optim.text_encoder_lr_scale == 1.0:
        return build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)
    text_encoder = {id(p) for p in model.text_encoder.parameters()}
    groups = []
    for group in parameter_groups(model, cfg.optim.weight_decay):
        rest = [p for p in group["params"] if id(p) not in text_encoder]
        text = [p for p in group["params"] if id(p) in text_encoder]
        groups += [{**group, "params": rest}] if rest else []
        groups += [{**group, "params": text, "lr": cfg.optim.lr * cfg.optim.text_encoder_lr_scale}] if text else []
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def cpu_math(cfg: Config) -> None:
    """Flush subnormal floats to zero on CPU, and set ``cpu_threads``. The tiny pipeline's Adam moments
    and activations go subnormal after a few hundred steps, and x86 arithmetic on them is ~100x
    slower: the VAE phase took 336 s instead of 22 s, denoising steps 20x longer, without it."""
    import torch

    torch.set_flush_denormal(True)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)


def vae_batches(rows: list[dict], cfg: Config, collate):
    """``optim.vae_steps`` batches cycling over ``rows`` in seeded orders (same on every rank)."""
    step, epoch = 0, 0
    while step < cfg.optim.vae_steps:
        order = list(rows)
        random.Random(cfg.seed + 10_000 + epoch).shuffle(order)
        for start in range(0, len(order), cfg.optim.vae_batch_size):
            if step >= cfg.optim.vae_steps:
                return
            yield collate(order[start:start + cfg.optim.vae_batch_size])
            step += 1
        epoch += 1


def share_rank_zero_vae(model) -> None:
    """Under DDP, give every rank rank 0's VAE and latent scale after the reconstruction phase.

    The phase trains the VAE outside DDP (it is frozen when DDP wraps the model, so its gradients are
    never all-reduced), separately on each rank. On CPU the ranks' runs are bitwise equal, but CUDA's
    convolution backward is nondeterministic (torch.use_deterministic_algorithms' list), so the
    ranks' VAEs would drift apart over the phase's steps: each rank's UNet would then learn latents of
    another encoder while rank 0's alone is checkpointed and exported. (DDP's per-forward buffer
    broadcast already overwrites the latent scale, but not the VAE's weights nor ``config.latent_scale``.)
    """
    import torch

    from jobs import _train

    if _train.world_size() == 1:
        return
    core = _train.unwrap(model)
    with torch.no_grad():
        for tensor in [*core.vae.parameters(), *core.vae.buffers(), core.latent_scale]:
            torch.distributed.broadcast(tensor, src=0)
    core.config.latent_scale = float(core.latent_scale)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: (fresh run) the VAE phase, then DDP denoising epochs; rank 0 scores
    valid, logs and checkpoints each epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from jobs import _tracking, _train
    from tmr_core.text_to_image_training import TextImageCollator, reconstruction_phase, validation_loss
    from tmr_core.training import build_scheduler, train_epoch

    cfg: Config = loop["cfg"]
    rank0 = _train.is_rank_zero()
    cpu_math(cfg)
    model = build_model(cfg)
    options = cfg.storage.options()
    collate = TextImageCollator(model.tokenizer, cfg.model.resolution, options, cfg.model.caption_dropout,
                                seed=cfg.seed + _train.world_rank(), crop_margin=cfg.data.crop_margin)
    plain_collate = TextImageCollator(model.tokenizer, cfg.model.resolution, options, crop_margin=cfg.data.crop_margin)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    device = _train.device()
    optimizer = denoising_optimizer(_train.unwrap(model), cfg)
    scheduler = build_scheduler(optimizer, loop["total_steps"], cfg.optim.warmup_ratio)
    state = _train.restore_or_start(model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                                    loop["mlflow_run_id"])
    if rank0 and state.attempts > 1:
        print(f"[{JOB}] resumed at epoch {state.epoch}, step {state.global_step} (attempt {state.attempts})", flush=True)
    if cfg.model.train_vae and state.epoch == 0:
        # every rank runs the same phase on the same rows and seeds (no rank waits for another), and
        # share_rank_zero_vae then makes the VAEs equal: on CUDA the phase is not bitwise reproducible
        def vae_progress(step: int, loss: float) -> None:
            if rank0 and step % 50 == 0:
                print(f"[{JOB}] VAE step {step}/{cfg.optim.vae_steps} loss {loss:.4f}", flush=True)

        vae = reconstruction_phase(_train.unwrap(model), vae_batches(loop["train_rows"], cfg, plain_collate),
                                   cfg.optim.vae_lr, device, on_step=vae_progress)
        share_rank_zero_vae(model)
        if rank0:
            print(f"[{JOB}] VAE reconstruction phase: {vae['vae_steps']} steps, loss {vae['vae_loss']:.4f}, "
                  f"latent scale {vae['latent_scale']:.4f}", flush=True)
    if _train.world_size() > 1:
        # one seed on every rank would give each DDP step only batch_size noise and timestep draws
        # (the ranks' weights stay equal: DDP broadcast them and averages every gradient)
        torch.manual_seed(cfg.seed + 1_000_003 * _train.world_rank())
    _train.announce_pid(cfg.debug)
    train_shard = _train.ShardRows(ray.train.get_dataset_shard("train"), cfg.ray.cache_shard_rows)
    valid_rows = loop["valid_rows"] if rank0 else []
    progress = _train.Progress(JOB, cfg.optim.epochs)
    for epoch in range(state.epoch, cfg.optim.epochs):
        remaining = loop["total_steps"] - state.global_step
        if remaining <= 0:
            break
        cap = min(remaining, cfg.debug.max_steps_per_epoch or remaining)
        progress.epoch_start()
        batches = _train.shard_batches(train_shard, cfg.optim.batch_size, collate, cap, cfg.debug.step_delay_s,
                                       shuffle_seed=cfg.seed + epoch)
        stats = train_epoch(model, batches, optimizer, scheduler, device, cfg.optim.grad_clip,
                            on_step=lambda step, loss, e=epoch: rank0 and progress.step(e, step, state.global_step, loss))
        metrics = {"epoch": epoch + 1, "train_loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
                   **_train.rank_agreement(model, stats["steps"])}
        if rank0 and not metrics["ranks_agree"]:
            print(f"[{JOB}] warning: the ranks' weights differ after epoch {epoch + 1}; rank 0's are saved", flush=True)
        if rank0:
            loss = validation_loss(_train.unwrap(model),
                                   _train.shard_batches(valid_rows, cfg.optim.eval_batch_size, plain_collate),
                                   device, seed=cfg.seed)
            metrics |= {"valid_denoising_loss": loss, MONITOR: -loss}
        state.finish_epoch(metrics.get(MONITOR, 0.0), stats["steps"], metrics)
        metrics["global_step"] = state.global_step
        if rank0:
            progress.epoch_end(epoch + 1, metrics)
            if loop["tracking_uri"] and state.mlflow_run_id:
                _tracking.log_metrics(loop["tracking_uri"], state.mlflow_run_id, metrics, step=epoch + 1)
        _train.report_epoch(metrics, state, model, optimizer, scheduler, loop["run_folder"], loop["local_mode"],
                            options, keep=loop["checkpoints_to_keep"])


# --------------------------------------------------------------------------- driver


def total_steps(cfg: Config, train_rows: int) -> int:
    workers = max(1, cfg.ray.num_workers)
    per_epoch = -(-train_rows // (cfg.optim.batch_size * workers))
    if cfg.debug.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.debug.max_steps_per_epoch)
    steps = per_epoch * cfg.optim.epochs
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


def probe_settings(cfg: Config, model: str):
    from tmr_core.back_translation import GenerationSettings

    p = cfg.probe
    return GenerationSettings(model=model, scheduler=p.scheduler, steps=p.steps, guidance_scale=p.guidance_scale,
                              height=p.height, width=p.width, device=cfg.device, model_identity="probe")


def probe_fidelity(cfg: Config, pipeline: Any, truth: dict[str, dict], prefix: str) -> dict[str, float]:
    """``<prefix><split>_bt_fidelity_*`` (NER texts) and ``<prefix>re_<split>_bt_fidelity_*`` (RE texts,
    when a dataset holds them) for each probe split: v' sampled through the back-translation code
    path (one seed for every prompt, as the batch job), read by the glyph reader."""
    from jobs import _train
    from tmr_core.back_translation import BackTranslator, generation_seed, prompt_from_tokens
    from tmr_core.probes import (
        back_translation_fidelity,
        probe_items,
        relation_back_translation_fidelity,
        relation_probe_items,
    )

    translator = BackTranslator(probe_settings(cfg, cfg.model.base), cache_uri="", pipeline=pipeline)

    def sample(split: str, wanted: set[str]) -> dict[str, Any]:
        rows = [row for dataset in cfg.data.datasets
                for row in _train.read_rows(dataset, split, cfg.storage.options()) if row["id"] in wanted]
        images: dict[str, Any] = {}
        for start in range(0, len(rows), cfg.probe.batch_size):
            chunk = rows[start:start + cfg.probe.batch_size]
            prompts = [prompt_from_tokens(row["tokens"]) for row in chunk]
            seeds = [generation_seed(row["id"], prompt, cfg.probe.seed) for row, prompt in zip(chunk, prompts, strict=True)]
            images.update(zip([row["id"] for row in chunk], translator.generate(prompts, seeds), strict=True))
        return images

    metrics: dict[str, float] = {}
    for split in cfg.probe.splits:
        items = probe_items(truth.values(), split)[:cfg.probe.max_rows]
        pairs = relation_probe_items(truth.values(), split)[:cfg.probe.max_rows]
        images = sample(split, {item.id for item in items} | {head.id for head, _ in pairs})
        if any(item.id in images for item in items):
            scores = back_translation_fidelity(items, images)
            metrics |= {f"{prefix}{split}_bt_fidelity_{key}": value for key, value in scores.items()}
        if any(head.id in images for head, _ in pairs):
            scores = relation_back_translation_fidelity(pairs, images)
            metrics |= {f"{prefix}re_{split}_bt_fidelity_{key}": value for key, value in scores.items()}
    return metrics


def set_scheduler(pipeline: Any, name: str | None) -> Any:
    import diffusers

    if name:
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pipeline(pipeline: Any, uri: str, options) -> str:
    """``pipeline.save_pretrained`` into a local folder or (through a temp folder) an s3:// prefix;
    returns a local folder holding the files (the registry uploads from it)."""
    from tmr_core import storage

    if not storage.is_remote(uri):
        partial = uri.rstrip("/") + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        pipeline.save_pretrained(partial, safe_serialization=True)
        shutil.rmtree(uri, ignore_errors=True)
        os.replace(partial, uri)  # a reader never sees half a pipeline
        return uri
    local = tempfile.mkdtemp(prefix="tmr-t2i-")
    pipeline.save_pretrained(local, safe_serialization=True)
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                relative = os.path.relpath(path, local).replace(os.sep, "/")
                storage.write_bytes_atomic(storage.join(uri, relative), handle.read(), options)
    return local


def finalize(cfg: Config, folder: str, tracking_uri: str | None, run_id: str | None, train_time_s: float,
             truth: dict[str, dict], train_rows: int) -> dict:
    """Best epoch → diffusers pipeline folder → fidelity probe → metrics, log, register."""
    from jobs import _tracking, _train
    from jobs._config import save_config
    from tmr_core import storage
    from tmr_core.text_to_image_training import TextToImageModel, load_parts

    options = cfg.storage.options()
    with tempfile.TemporaryDirectory() as tmp:
        best_dir, state = _train.best_model_dir(folder, tmp, options)
        model = TextToImageModel.from_pretrained(best_dir, device=cfg.device)
    metrics: dict = {"best_epoch": state.best_epoch, "best_" + MONITOR: state.best_metric,
                     "global_step": state.global_step, "train_time_s": train_time_s, "attempts": state.attempts,
                     "train_pairs": train_rows, "latent_scale": float(model.latent_scale)}
    pipeline = set_scheduler(model.to_pipeline(), cfg.probe.scheduler)
    model_dir = storage.join(cfg.output, "model")
    local_model = save_pipeline(pipeline, model_dir, options)
    if truth and cfg.probe.enabled:
        start = time.perf_counter()
        metrics |= probe_fidelity(cfg, pipeline.to(cfg.device), truth, "")
        if cfg.probe.compare_base:
            base = set_scheduler(load_parts(cfg.model.base, cfg.model.revision).pipeline, cfg.probe.scheduler)
            metrics |= probe_fidelity(cfg, base.to(cfg.device), truth, "base_")
        metrics["probe_time_s"] = time.perf_counter() - start
    storage.write_text_atomic(storage.join(cfg.output, "metrics.json"), json.dumps(metrics, indent=2), options)
    save_config(cfg, cfg.output, options=options)
    if cfg.tracking.enabled and run_id:
        _tracking.log_metrics(tracking_uri, run_id, metrics, step=state.epoch)
        with tempfile.TemporaryDirectory() as tmp:
            save_config(cfg, tmp)
            with open(os.path.join(tmp, "metrics.json"), "w") as handle:
                json.dump(metrics, handle, indent=2)
            _tracking.log_artifacts(tracking_uri, run_id, tmp, "outputs")
        if cfg.tracking.register_as:
            from tmr_core.back_translation import pipeline_identity

            # the version carries the folder's content hash: a back-translation cache key needs no download
            tags = {"kind": run_name(cfg).split("/")[2], CONTENT_HASH_TAG: pipeline_identity(local_model)}
            version = _tracking.register_model(tracking_uri, run_id, local_model, cfg.tracking.register_as,
                                               cfg.tracking.alias, tags=tags, required_files=("model_index.json",))
            print(f"[{JOB}] registered models:/{cfg.tracking.register_as}@{cfg.tracking.alias} (v{version})", flush=True)
        elif cfg.tracking.log_checkpoint:
            _tracking.log_artifacts(tracking_uri, run_id, local_model, "model")
        _tracking.finish_run(tracking_uri, run_id)
    if local_model != model_dir:
        shutil.rmtree(local_model, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    check_config(cfg)
    print_config(cfg, JOB)
    cpu_math(cfg)  # the driver's export and probe run the same modules
    import ray

    from jobs import _data, _tracking, _train

    options = cfg.storage.options()
    _train.init_ray(cfg.ray)
    splits = (cfg.data.train_split, cfg.data.valid_split)
    identity = _train.run_identity(cfg, cfg.data.datasets[0], options, splits)
    identity["inputs"] = {uri: _data.input_identity(uri, list(splits), options) for uri in cfg.data.datasets}
    name = cfg.ray.name or _train.default_run_name(run_name(cfg), identity)
    folder = _train.run_folder(cfg.ray, name)
    if cfg.force:
        _train.discard_run(folder, options)
    _train.claim_run_folder(folder, identity, options)
    truth = load_ground_truth(cfg.data.ground_truth, options)
    train_rows = pair_rows(cfg, cfg.data.train_split, truth, log=True)[:cfg.data.max_train_rows]
    valid_rows = pair_rows(cfg, cfg.data.valid_split, truth, log=True)[:cfg.debug.max_eval_rows]
    if not train_rows:
        raise ConfigError([f"--data.datasets {cfg.data.datasets}: no training pair (with an image and tokens) left"])
    tracking_uri = run_id = None
    if cfg.tracking.enabled:
        tracking_uri = _tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {"tmr.task": "t2i", "tmr.dataset": cfg.data.dataset_name, "tmr.seed": str(cfg.seed),
                "tmr.train_rows": str(len(train_rows)), "tmr.ray_run_name": name,
                "mlflow.source.git.commit": _tracking.git_commit() or "unknown"}
        run_id = _tracking.start_or_resume_run(tracking_uri, cfg.tracking.experiment or "tmr-t2i", run_name(cfg),
                                               config_to_dict(cfg), tags, folder, options)
        print(f"[{JOB}] MLflow run {run_id} at {tracking_uri}", flush=True)
    # pairs are URIs and short prompts: read here and shipped, so a restarted worker group needs no Ray Data read
    loop = {"cfg": cfg, "total_steps": total_steps(cfg, len(train_rows)), "run_folder": folder,
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "train_rows": train_rows, "valid_rows": valid_rows}
    start = time.perf_counter()
    try:
        _train.fit(train_loop_per_worker, loop, cfg.ray, name, {"train": ray.data.from_items(train_rows)}, options,
                   MONITOR)
    except Exception:
        if run_id:
            _tracking.finish_run(tracking_uri, run_id, status="FAILED")
        raise
    metrics = finalize(cfg, folder, tracking_uri, run_id, time.perf_counter() - start, truth, len(train_rows))
    shown = {k: round(v, 4) for k, v in metrics.items() if "deciding" in k and "_n" not in k or k == "best_epoch"}
    print(f"[{JOB}] {shown}; pipeline in {cfg.output}/model", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
