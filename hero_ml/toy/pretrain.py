"""Pretrain the toy Stable Diffusion from nothing: data, tokenizer, VAE, then text encoder + UNet.

Everything is made here: random scenes rendered with their captions (paraphrased, some colours left
open), a word-level BPE tokenizer over the caption grammar, an AutoencoderKL trained to reconstruct
the renders, then a CLIP text encoder and a UNet trained together with the epsilon-prediction loss
(captions dropped 10% of the time for classifier-free guidance, EMA weights kept). The result is a
standard diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads with no
custom code.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hero_ml.diffusion.pipeline import BOS_TOKEN, EOS_TOKEN
from hero_ml.toy.captions import caption, vocabulary
from hero_ml.toy.render import render
from hero_ml.toy.scene import random_scene

ARCHITECTURE = Path(__file__).parent / "architecture"
TRAINING_LOG = "training.json"

# on_progress(phase, step, total_steps, loss)
ProgressCallback = Callable[[str, int, int, float], None]


class PretrainConfig(BaseModel):
    """Every knob of a pretraining run; saved with the model so the run can be repeated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, ge=0, description="Seeds data, initialisation and training.")
    dataset_size: int = Field(20_000, ge=8, description="Rendered (image, caption) pairs.")
    defect_rate: float = Field(
        0.1, ge=0, le=1, description="Share of shapes drawn malformed, so the model learns to err."
    )
    region_rate: float = Field(0.25, ge=0, le=1, description="Share of captions that name a region.")
    colorless_rate: float = Field(
        0.15,
        ge=0,
        le=1,
        description='Share of caption groups that leave the colour out ("two circles"), so that a vague '
        "prompt means any colour, drawn as the data has it.",
    )
    vae_steps: int = Field(800, ge=1, description="VAE optimiser steps.")
    vae_batch: int = Field(32, ge=1, description="VAE batch size.")
    vae_lr: float = Field(1e-3, gt=0, description="VAE AdamW learning rate.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term (SD: about 1e-6).")
    unet_steps: int = Field(3000, ge=1, description="Text-encoder + UNet optimiser steps.")
    unet_batch: int = Field(64, ge=1, description="Text-encoder + UNet batch size.")
    unet_lr: float = Field(5e-4, gt=0, description="AdamW learning rate of text encoder and UNet.")
    warmup_steps: int = Field(200, ge=0, description="Linear learning-rate warm-up of both phases.")
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of captions replaced by the empty prompt (for CFG)."
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved UNet and text encoder.")
    log_every: int = Field(25, ge=1, description="Steps between points of the training curves.")


def build_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges spell every word of the caption grammar as one token.

    The merges are learned here by plain BPE with ties broken alphabetically, so the same grammar
    always gives the same ids (the tokenizers library's trainer breaks ties differently run to run).
    """
    merges = learn_bpe_merges([*vocabulary(), ","])
    symbols = sorted({c for word in [*vocabulary(), ","] for c in word})
    tokens = [BOS_TOKEN, EOS_TOKEN, *symbols, *(c + "</w>" for c in symbols)]
    tokens += ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE on a word list until every word is one symbol: most frequent pair first, ties alphabetically."""
    segmented = [(*word[:-1], word[-1] + "</w>") for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in itertools.pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = [_merge(symbols, best) for symbols in segmented]


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def make_dataset(config: PretrainConfig, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Rendered images in [-1, 1], shape (N, 3, size, size), and one paraphrased caption each."""
    rng = np.random.default_rng([config.seed, 1])
    images: list[np.ndarray] = []
    captions: list[str] = []
    while len(images) < config.dataset_size:
        composition, scene = random_scene(
            rng, size=size, defect_rate=config.defect_rate, region_rate=config.region_rate
        )
        images.append(render(scene))
        captions.append(caption(composition.without_colors(rng, config.colorless_rate), rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def pretrain(config: PretrainConfig, out: Path, on_progress: ProgressCallback | None = None) -> dict:
    """Train the toy pipeline and save it to `out` (a diffusers folder plus training.json)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(config.seed)
    arch = {
        name: json.loads((ARCHITECTURE / f"{name}.json").read_text())
        for name in ("unet", "vae", "text_encoder")
    }

    pixels, captions = make_dataset(config, size=arch["vae"]["sample_size"])
    tokenizer = build_tokenizer(arch["text_encoder"]["max_position_embeddings"])
    log: dict = {
        "config": config.model_dump(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "dataset": {
            "images": len(captions),
            "examples": captions[:8],
            "seconds": round(time.perf_counter() - started, 1),
        },
    }

    torch.manual_seed(config.seed)
    vae = AutoencoderKL.from_config(arch["vae"])
    phase_started = time.perf_counter()
    log["vae"] = _train_vae(vae, pixels, config, generator, on_progress)
    log["vae"]["seconds"] = round(time.perf_counter() - phase_started, 1)
    with torch.no_grad():
        means, stds = [], []
        for start in range(0, len(pixels), 256):
            dist = vae.encode(pixels[start : start + 256]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        latent_mean, latent_std = torch.cat(means), torch.cat(stds)
    scaling_factor = float(1 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log["vae"]["scaling_factor"] = scaling_factor

    text_config = CLIPTextConfig(
        **{**arch["text_encoder"], "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed + 1)  # each phase seeds its own initialisation
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel.from_config(arch["unet"])
    token_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    phase_started = time.perf_counter()
    log["unet"] = _train_denoiser(
        unet,
        text_encoder,
        latent_mean,
        latent_std,
        scaling_factor,
        token_ids,
        empty_ids,
        config,
        generator,
        on_progress,
    )
    log["unet"]["seconds"] = round(time.perf_counter() - phase_started, 1)

    scheduler = DDIMScheduler.from_config(json.loads((ARCHITECTURE / "scheduler.json").read_text()))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    log["seconds"] = round(time.perf_counter() - started, 1)
    # CPU time of this process: with the machine shared, wall time overstates the run's own cost
    log["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    (out / TRAINING_LOG).write_text(json.dumps(log, indent=1))
    return log


def _lr_scale(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _train_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    config: PretrainConfig,
    generator: torch.Generator,
    on_progress: ProgressCallback | None,
) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_scale(s, config.warmup_steps))
    curve = []
    vae.train()
    for step in range(config.vae_steps):
        batch = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        reconstruction = torch.nn.functional.l1_loss(recon, batch)
        loss = reconstruction + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            curve.append([step, round(reconstruction.item(), 5)])
        if on_progress is not None:
            on_progress("vae", step + 1, config.vae_steps, reconstruction.item())
    vae.eval()
    vae.requires_grad_(False)
    return {"curve_l1": curve, "final_l1": curve[-1][1]}


def _train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    config: PretrainConfig,
    generator: torch.Generator,
    on_progress: ProgressCallback | None,
) -> dict:
    noise_scheduler = DDPMScheduler.from_config(json.loads((ARCHITECTURE / "scheduler.json").read_text()))
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_scale(s, config.warmup_steps))
    ema_unet = EMAModel(unet.parameters(), decay=config.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=config.ema_decay)
    curve = []
    unet.train()
    text_encoder.train()
    for step in range(config.unet_steps):
        index = torch.randint(len(token_ids), (config.unet_batch,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(
            latent_mean[index].shape, generator=generator
        )
        latents = latents * scaling_factor
        ids = token_ids[index].clone()
        dropped = torch.rand(len(ids), generator=generator) < config.caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            noise_scheduler.config.num_train_timesteps, (len(ids),), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        if step % config.log_every == 0 or step == config.unet_steps - 1:
            curve.append([step, round(loss.item(), 5)])
        if on_progress is not None:
            on_progress("unet", step + 1, config.unet_steps, loss.item())
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()
    recent = [value for _, value in curve[-max(1, len(curve) // 10) :]]
    return {"curve_mse": curve, "final_mse": round(float(np.mean(recent)), 5) if recent else math.nan}
