"""The trajectory sampler: DDIM with eta > 0 and classifier-free guidance, recording every step.

Each image has its own torch.Generator, drawn from for its initial noise (when none is given) and for
every step's noise, exactly as diffusers' StableDiffusionPipeline does with a list of generators. So an
image depends on its seed only, never on the sub-batch it was denoised in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hero_ml.diffusion.ddim import check_scheduler, ddim_step_mean_std, gaussian_log_prob

TRAJECTORY_FORMAT = "hero-trajectory/1"
PER_IMAGE_TENSORS = ("latents", "log_probs", "prompt_embeds", "negative_prompt_embeds", "images")
_TENSORS = (*PER_IMAGE_TENSORS, "timesteps")


@dataclass(frozen=True)
class Trajectory:
    """A batch of B sampled images with their whole DDIM trajectories of T steps, on the CPU."""

    prompts: list[str]
    latents: torch.Tensor  # (B, T+1, C, h, w) storage dtype: x_T, x_{T-1}, ..., x_0
    log_probs: torch.Tensor  # (B, T) float32: log p(x_{t-1} | x_t) of each step under the sampling policy
    timesteps: torch.Tensor  # (T,) int64: the t of each step, in sampling order
    prompt_embeds: torch.Tensor  # (B, L, D) text-encoder states of the prompts
    negative_prompt_embeds: torch.Tensor  # (B, L, D) of the negative prompt (CFG's unconditional branch)
    images: torch.Tensor  # (B, H, W, 3) uint8: the decoded x_0
    eta: float
    guidance_scale: float

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def initial_noise(self) -> torch.Tensor:
        """x_T, where feedback-guided generation starts the next round's samples from."""
        return self.latents[:, 0]

    @property
    def final_step_input(self) -> torch.Tensor:
        """x_1, the latent that enters the last denoising step: the feedback encoder's input."""
        return self.latents[:, -2]

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> Trajectory:
        return cls.from_bytes(path.read_bytes(), source=str(path))

    def to_bytes(self) -> bytes:
        """One safetensors blob: every tensor, plus prompts and sampling settings as metadata."""
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        metadata = {
            "format": TRAJECTORY_FORMAT,
            "prompts": json.dumps(self.prompts),
            "eta": repr(self.eta),
            "guidance_scale": repr(self.guidance_scale),
        }
        return save_tensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "trajectory") -> Trajectory:
        try:
            metadata = _safetensors_metadata(data)
            tensors = load_tensors(data)
        except (ValueError, SafetensorError) as err:
            raise ValueError(f"{source} is not a safetensors file: {err}") from None
        if metadata.get("format") != TRAJECTORY_FORMAT:
            raise ValueError(
                f"{source} is not a {TRAJECTORY_FORMAT} file (format={metadata.get('format')!r})"
            )
        missing = (set(_TENSORS) - set(tensors)) | ({"prompts", "eta", "guidance_scale"} - set(metadata))
        if missing:
            raise ValueError(f"{source} is an incomplete trajectory: missing {sorted(missing)}")
        try:
            prompts = json.loads(metadata["prompts"])
            eta, guidance_scale = float(metadata["eta"]), float(metadata["guidance_scale"])
        except ValueError as err:
            raise ValueError(f"{source}: unreadable metadata (prompts, eta, guidance_scale): {err}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{source}: metadata 'prompts' is not a list of strings")
        trajectory = cls(
            prompts=prompts,
            eta=eta,
            guidance_scale=guidance_scale,
            **{name: tensors[name] for name in _TENSORS},
        )
        trajectory.check_shapes(source)
        return trajectory

    def check_shapes(self, source: str = "trajectory") -> None:
        """The tensors agree with each other: B images, T steps (a file's may not)."""
        batch, steps = len(self.prompts), self.num_steps
        expected = {
            "latents": (batch, steps + 1),
            "log_probs": (batch, steps),
            "prompt_embeds": (batch,),
            "negative_prompt_embeds": (batch,),
            "images": (batch,),
        }
        for name, leading in expected.items():
            shape = tuple(getattr(self, name).shape)
            if shape[: len(leading)] != leading:
                raise ValueError(
                    f"{source}: {name} has shape {shape}, expected it to start with {leading} "
                    f"({batch} prompts, {steps} timesteps)"
                )
        if self.timesteps.ndim != 1:
            raise ValueError(f"{source}: timesteps has shape {tuple(self.timesteps.shape)}, expected (T,)")


def per_image_generators(seed: int | Sequence[int], count: int) -> list[torch.Generator]:
    """Independent CPU generators, one per image, derived from (seed, index) by numpy's SeedSequence.

    seed may be a tuple such as (run_seed, round): each round then has its own streams.
    """
    states = np.random.SeedSequence(seed).spawn(count)
    return [torch.Generator("cpu").manual_seed(int(s.generate_state(1, np.uint64)[0])) for s in states]


def guided_noise_pred(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """The UNet's classifier-free-guided prediction at x_t; timesteps: one per sample (may differ)."""
    sample = sample.to(unet.dtype)
    if guidance_scale == 1.0:  # the unconditional branch cancels out
        return unet(sample, timesteps, encoder_hidden_states=prompt_embeds).sample
    both = unet(
        torch.cat([sample, sample]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_trajectories(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    initial_noise: torch.Tensor | None = None,
    negative_prompt: str = "",
    sub_batch_size: int = 8,
    storage_dtype: torch.dtype = torch.float32,
    on_step: Callable[[], None] | None = None,
) -> Trajectory:
    """Sample len(prompts) images, recording x_T, every latent, every step's log-prob and the images.

    initial_noise: x_T of shape (B, C, h, w); drawn from each image's generator when None.
    Latents are rounded to storage_dtype as they are sampled and the chain continues from the rounded
    value, so the stored trajectory is exactly the one walked and its log-probs can be recomputed.
    on_step: called after every denoising step of every sub-batch (for progress bars).
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 to learn from samples (got {eta}): the DDIM step with eta = 0 is "
            "deterministic and has no log-probability. HERO samples with eta = 1.0."
        )
    batch = len(prompts)
    if len(generators) != batch:
        raise ValueError(f"need one generator per image: {batch} prompts, {len(generators)} generators")
    if sub_batch_size < 1:
        raise ValueError(f"sub_batch_size must be >= 1, got {sub_batch_size}")

    device = pipe.unet.device
    scheduler = _scheduler_at(pipe, num_steps)
    timesteps = scheduler.timesteps

    latent_shape = (
        pipe.unet.config.in_channels,
        pipe.unet.config.sample_size,
        pipe.unet.config.sample_size,
    )
    if initial_noise is None:
        initial_noise = torch.cat(
            [randn_tensor((1, *latent_shape), generator=g, dtype=torch.float32) for g in generators]
        )
    elif tuple(initial_noise.shape) != (batch, *latent_shape):
        raise ValueError(
            f"initial_noise has shape {tuple(initial_noise.shape)}, expected {(batch, *latent_shape)}"
        )

    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        list(prompts),
        device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=[negative_prompt] * batch,
    )

    latents, log_probs, images = [], [], []
    for start in range(0, batch, sub_batch_size):
        part = slice(start, start + sub_batch_size)
        part_generators = list(generators[part])
        x = initial_noise[part].to(device=device, dtype=storage_dtype)
        step_noise = _step_noise(part_generators, len(timesteps), latent_shape, device)
        # Kept on the device while the sub-batch denoises (no per-step sync), then moved to the CPU.
        part_latents, part_log_probs = [x], []

        for i, t in enumerate(timesteps):
            t_batch = t.expand(x.shape[0])
            noise_pred = guided_noise_pred(
                pipe.unet, x, t_batch, prompt_embeds[part], negative_prompt_embeds[part], guidance_scale
            )
            mean, std = ddim_step_mean_std(scheduler, noise_pred, t_batch, x, eta)
            x = (mean + std * step_noise[:, i]).to(storage_dtype)
            part_log_probs.append(gaussian_log_prob(x, mean, std))
            part_latents.append(x)
            if on_step is not None:
                on_step()

        latents.append(_offload(torch.stack(part_latents, dim=1)))
        log_probs.append(_offload(torch.stack(part_log_probs, dim=1)))
        images.append(_offload(decode_latents(pipe, x)))
    if device.type == "cuda":  # the offloads were queued behind the sampling; wait for them once
        torch.cuda.current_stream(device).synchronize()

    return Trajectory(
        prompts=list(prompts),
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        timesteps=timesteps.cpu(),
        prompt_embeds=prompt_embeds.cpu(),
        negative_prompt_embeds=negative_prompt_embeds.cpu(),
        images=torch.cat(images),
        eta=eta,
        guidance_scale=guidance_scale,
    )


def recompute_step(
    pipe: StableDiffusionPipeline,
    trajectory: Trajectory,
    rows: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM step under the pipeline's current UNet at transitions (rows[i],
    steps[i]) of a trajectory, and the recorded x_{t-1} of each.

    With gradients unless the caller disables them, on a batch that mixes steps of several
    trajectories. Guidance and eta are the trajectory's own."""
    scheduler = _scheduler_at(pipe, trajectory.num_steps)
    if not torch.equal(scheduler.timesteps.cpu(), trajectory.timesteps):
        raise ValueError("the pipeline's scheduler does not reproduce the trajectory's timesteps")
    device = pipe.unet.device
    rows, steps = rows.cpu(), steps.cpu()
    sample = trajectory.latents[rows, steps].to(device)
    prev_sample = trajectory.latents[rows, steps + 1].to(device)
    timesteps = trajectory.timesteps[steps].to(device)
    prediction = guided_noise_pred(
        pipe.unet,
        sample,
        timesteps,
        trajectory.prompt_embeds[rows].to(device),
        trajectory.negative_prompt_embeds[rows].to(device),
        trajectory.guidance_scale,
    )
    mean, std = ddim_step_mean_std(scheduler, prediction, timesteps, sample, trajectory.eta)
    return mean, std, prev_sample


def recompute_log_probs(
    pipe: StableDiffusionPipeline,
    trajectory: Trajectory,
    rows: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """Log-probs of transitions (rows[i], steps[i]) of a trajectory under the pipeline's current UNet
    (DDPO's new policy; see recompute_step). Returns shape (len(rows),)."""
    mean, std, prev_sample = recompute_step(pipe, trajectory, rows, steps)
    return gaussian_log_prob(prev_sample, mean, std)


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode x_0 latents to uint8 images of shape (B, H, W, 3), on the latents' device."""
    vae = pipe.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _scheduler_at(pipe: StableDiffusionPipeline, num_steps: int) -> DDIMScheduler:
    """The pipeline's scheduler set to num_steps and checked, its timesteps and alpha_bar table on the
    UNet's device: moved once and kept there, as diffusers' own add_noise does (a copy at every step
    would make the host wait for the GPU at every step)."""
    device = pipe.unet.device
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    check_scheduler(scheduler)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


def _step_noise(
    generators: Sequence[torch.Generator], steps: int, latent_shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Every step's noise of a sub-batch, (B, steps, *latent_shape) float32 on `device`: each image's
    draws in step order from its own generator, the values diffusers' randn_tensor gives a step at a
    time, drawn up front and copied once (a draw a step would be a host-to-device copy and a wait)."""
    drawn = torch.stack(
        [
            torch.cat(
                [torch.randn((1, *latent_shape), generator=g, dtype=torch.float32) for _ in range(steps)]
            )
            for g in generators
        ]
    )
    if device.type == "cuda":
        return drawn.pin_memory().to(device, non_blocking=True)
    return drawn.to(device)


def _offload(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor`. From a GPU the copy is queued into pinned memory and not waited for,
    so the next sub-batch's kernels are launched at once; synchronise the stream before reading it."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (its JSON header, read without loading tensors)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length exceeds the data")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
