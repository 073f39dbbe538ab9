"""The DDIM step as a Gaussian policy: its mean, its std, and the log-density of a transition.

Pure math on tensors, no models. With eta > 0, DDIM draws x_{t-1} ~ N(mean(x_t, eps), std_t^2 I)
(Song et al., eq. 12); DDPO treats each step as an action of that Gaussian policy. Log-probs are
averaged over latent elements (the DDPO convention). Timesteps may differ per sample, so a training
batch can mix steps of several trajectories.
"""

from __future__ import annotations

import math

import torch
from diffusers.schedulers import DDIMScheduler

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def check_scheduler(scheduler: DDIMScheduler) -> None:
    """Refuse scheduler settings this math does not implement, instead of silently diverging."""
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"HERO samples with DDIMScheduler, got {type(scheduler).__name__}")
    config = scheduler.config
    if config.clip_sample or config.thresholding:
        raise ValueError("DDIM log-probs need clip_sample=False and thresholding=False (SD's settings)")
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")
    if config.set_alpha_to_one:
        raise ValueError(
            "set_alpha_to_one=True makes the last DDIM step deterministic (std 0): its log-prob is "
            "undefined and DDPO's update would turn to NaN; use set_alpha_to_one=False (SD's setting)"
        )
    if config.get("rescale_betas_zero_snr") and config.prediction_type == "epsilon":
        raise ValueError(
            "rescale_betas_zero_snr=True with prediction_type 'epsilon' divides by alpha_bar_T = 0 at "
            "the first step; zero terminal SNR needs prediction_type 'v_prediction'"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) first")


def _alphas(
    scheduler: DDIMScheduler, timesteps: torch.Tensor, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar_t and alpha_bar_{t-1} per sample, shaped to broadcast over latents of `ndim` dims."""
    # a copy when the table is elsewhere (the sampler keeps it on the UNet's device: no copy a step)
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)
    final = float(scheduler.final_alpha_cumprod)  # a number: no copy to the device either
    prev_timesteps = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = alphas_cumprod[timesteps]
    alpha_prev = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final)
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_t.reshape(shape), alpha_prev.reshape(shape)


def ddim_step_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of p(x_{t-1} | x_t) for the DDIM step with stochasticity eta (float32).

    model_output: the (guided) UNet prediction at x_t; timesteps: int tensor, one per sample.
    std has shape (B, 1, 1, 1); it is 0 when eta is 0 (no density).
    """
    alpha_t, alpha_prev = _alphas(scheduler, timesteps, sample.ndim)
    sample, model_output = sample.float(), model_output.float()
    beta_t = 1 - alpha_t

    if scheduler.config.prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    else:  # v_prediction
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prev.sqrt() * pred_x0 + direction
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the batch dimension."""
    x = x.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per element, averaged over all but the batch dimension.

    Two DDIM steps from the same x_t share their std, so only the means differ."""
    return ((mean_p - mean_q) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean_p.ndim)))
