"""DDPO: the policy-gradient update of the LoRA from per-image rewards (HERO-REFERENCE.md, "Policy update").

Advantages are the round's rewards normalised and clipped; the loss is PPO's clipped surrogate on the
ratio of new to old log-probabilities of recorded denoising steps; an update pass trains a random
subset of each trajectory's steps, recomputing their log-probs under the current UNet (with CFG, as
sampled), and steps the optimiser every `gradient_accumulation_steps` micro-batches. The pass is
shared with D3PO (d3po.py), which trains preference pairs with its own objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline

from hero_ml.diffusion.ddim import gaussian_kl, gaussian_log_prob
from hero_ml.diffusion.lora import adapters_disabled
from hero_ml.diffusion.sampler import Trajectory, recompute_step
from hero_ml.faults import crash_point

if TYPE_CHECKING:
    from hero_ml.parallel import DataParallel


def advantages(rewards: torch.Tensor, clip: float) -> torch.Tensor:
    """(r - mean) / (std + 1e-8) over the round's finite rewards (population std), clipped to
    [-clip, clip]. Rewards equal to within float32's rounding (a spread of at most 1e-6 of their size)
    give zero advantages: nothing to learn from, where normalising would blow their last bits up to
    full-size advantages. A reward that is not finite gets 0 and stays out of the mean and std."""
    finite = rewards.isfinite()
    out = torch.zeros_like(rewards)
    usable = rewards[finite]
    if len(usable) < 2:
        return out
    spread = usable.std(unbiased=False)
    if spread <= 1e-6 * max(1.0, float(usable.abs().max())):
        return out
    centred = usable - usable.mean()
    out[finite] = (centred / (spread + 1e-8)).clamp(-clip, clip)
    return out


def ppo_clipped_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, negated for minimisation, averaged over the batch.

    Returns (loss, approx_kl, clip_fraction): approx_kl = mean((new - old)^2) / 2, clip_fraction = the
    share of ratios outside [1 - clip_range, 1 + clip_range]; both detached, for monitoring."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clip_fraction = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clip_fraction.detach()


# (units, steps) -> (loss, approx_kl, clip_fraction): the objective on a micro-batch of trained
# units (trajectories for DDPO, preference pairs for D3PO), each at one of its denoising steps.
StepObjective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def ddpo_objective(
    pipe: StableDiffusionPipeline,
    trajectory: Trajectory,
    advantage: torch.Tensor,
    clip_range: float,
    kl_to_base: float = 0.0,
) -> StepObjective:
    """PPO's clipped loss of trajectories `rows` at `steps`, new log-probs from the current UNet.

    kl_to_base > 0 adds kl_to_base x the KL from the current step's Gaussian to the base model's
    (the UNet with its adapters off) at the same x_t: a pull back towards what the base model does,
    at the cost of one more forward pass without gradients per trained step."""

    def objective(rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, std, prev_sample = recompute_step(pipe, trajectory, rows, steps)
        log_prob = gaussian_log_prob(prev_sample, mean, std)
        old = trajectory.log_probs[rows, steps].to(log_prob.device)
        loss, approx_kl, clip_fraction = ppo_clipped_loss(
            log_prob, old, advantage[rows].to(log_prob.device), clip_range
        )
        if kl_to_base > 0:
            with torch.no_grad(), adapters_disabled(pipe.unet):
                base_mean, _, _ = recompute_step(pipe, trajectory, rows, steps)
            loss = loss + kl_to_base * gaussian_kl(mean, base_mean, std).mean()
        return loss, approx_kl, clip_fraction

    return objective


@dataclass(frozen=True)
class UpdateStats:
    # means over the trained (unit, timestep) pairs of every process, a group refused by target_kl's too
    loss: float
    approx_kl: float
    clip_fraction: float
    optimizer_steps: int  # taken
    # L2 norm of the pass's change to the trained parameters: how far the round moved them. With
    # Adam each step has about the size lr whatever the loss says, so this grows with lr x steps
    # (consistent gradients) or lr x sqrt(steps) (noisy ones); the clip range does not bound it.
    step_norm: float
    # Steps not taken because their gradient was not finite (an fp16 overflow, a step of std 0): one
    # NaN would spread through every LoRA weight and stay in every later checkpoint.
    skipped_steps: int = 0


def update_pass(
    objective: StepObjective,
    optimizer: torch.optim.Optimizer,
    *,
    units: int,
    num_steps: int,
    timesteps_per_unit: int,
    train_batch_size: int,
    gradient_accumulation_steps: int,
    inner_epochs: int,
    max_grad_norm: float,
    generator: torch.Generator,
    target_kl: float | None = None,
    parallel: DataParallel | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> UpdateStats:
    """`inner_epochs` passes over `units` in random order, each training `timesteps_per_unit` distinct
    random steps of its `num_steps`.

    The loss of a micro-batch is weighted by its share of the accumulation group, so each optimiser
    step follows the mean loss of its group whatever the batch sizes. The optimiser must hold only the
    trainable (LoRA) parameters; their gradient norm is clipped to max_grad_norm before each step, and
    a step whose gradient is not finite is skipped (counted in skipped_steps).

    target_kl: the update stops (no more steps, in this pass or later ones) before an optimiser step
    whose group's mean approx-KL to the sampling policy exceeds it, as PPO implementations bound how
    far one batch of samples moves the policy. None: every step is taken.

    parallel: this process's share in data-parallel learning (hero_ml/parallel.py); each process
    trains its share of every accumulation group's units, in micro-batches of train_batch_size, and the
    gradients are summed before each step (a group of fewer units than processes leaves some idle).
    The loss, KL and clip fraction returned are the whole update's, over every process's units.

    scaler: a float16 model's loss scale. DDPO's per-element losses give the UNet's output gradients
    of ~1e-6, below float16's normal range (6e-5): unscaled, the backward pass through a float16 UNet
    rounds them to a few levels or to 0. The loss is scaled up for the backward pass and the gradients
    unscaled before clipping; a step that overflows is skipped and the scale lowered (dynamic loss
    scaling, as the reference's fp16 Accelerate runs). None: float32 or bfloat16 (no scaling needed).

    on_step(done, total): told 0 first, then after each accumulation group, taken or skipped, out of
    every pass's groups (fewer are done when target_kl stops the update)."""
    if timesteps_per_unit > num_steps:
        raise ValueError(
            f"{timesteps_per_unit} timesteps per unit exceed the {num_steps} steps of a trajectory"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    initial = [p.detach().clone() for p in params]
    kls: list[tuple[float, int]] = []  # each micro-batch's approx-KL and rows (a group's: target_kl)
    # loss, approx-KL and clip fraction summed over the trained (unit, timestep) pairs, and their count
    totals = torch.zeros(1, 4, dtype=torch.float64)
    optimizer_steps = skipped_steps = groups_done = 0
    groups = inner_epochs * math.ceil(math.ceil(units / train_batch_size) / gradient_accumulation_steps)
    stopped = False
    if on_step is not None:
        on_step(0, groups)
    for _ in range(inner_epochs):
        if stopped:
            break
        order = torch.randperm(units, generator=generator)
        steps = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(units)])
        steps = steps[:, :timesteps_per_unit]
        micro_batches = list(order.split(train_batch_size))
        for start in range(0, len(micro_batches), gradient_accumulation_steps):
            group = micro_batches[start : start + gradient_accumulation_steps]
            group_kls = len(kls)
            group_units = sum(len(batch) for batch in group)
            if parallel is not None:  # the group's units shared, so that every process has some to train
                share = parallel.share(torch.cat(group))  # none when the group has fewer units than processes
                group = list(share.split(train_batch_size)) if len(share) else []
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # its scale made, even in a process with no unit in this group
                scaler.scale(torch.zeros((), device=params[0].device))
            for mine in group:
                weight = len(mine) / (group_units * timesteps_per_unit)
                for j in range(timesteps_per_unit):
                    loss, approx_kl, clip_fraction = objective(mine, steps[mine, j])
                    scaled = loss * weight
                    (scaled if scaler is None else scaler.scale(scaled)).backward()
                    kls.append((approx_kl.item(), len(mine)))
                    figures = (loss.item(), approx_kl.item(), clip_fraction.item(), 1.0)
                    totals += torch.tensor(figures, dtype=torch.float64) * len(mine)
            if target_kl is not None and _group_kl(kls[group_kls:], parallel) > target_kl:
                optimizer.zero_grad(set_to_none=True)
                stopped = True
                break
            if parallel is not None:
                parallel.sum_gradients(params)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not torch.isfinite(grad_norm):  # every process sees the same summed gradient
                optimizer.zero_grad(set_to_none=True)
                skipped_steps += 1
                if scaler is not None:
                    scaler.update()  # the overflow lowers the scale
            else:
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)  # the gradients are finite: it steps
                    scaler.update()
                optimizer_steps += 1
                crash_point("ddpo.step")
            groups_done += 1
            if on_step is not None:
                on_step(groups_done, groups)

    if parallel is not None:  # the whole update's figures, as one process training it all reports them
        totals = parallel.gather(totals).sum(dim=0, keepdim=True).cpu()
    rows = float(totals[0, 3])
    means = [float(v) / rows for v in totals[0, :3]] if rows > 0 else [float("nan")] * 3
    return UpdateStats(
        loss=means[0],
        approx_kl=means[1],
        clip_fraction=means[2],
        optimizer_steps=optimizer_steps,
        skipped_steps=skipped_steps,
        step_norm=float(
            torch.stack([(p.detach() - p0).norm() for p, p0 in zip(params, initial, strict=True)]).norm()
        ),
    )


def _group_kl(kls: list[tuple[float, int]], parallel: DataParallel | None) -> float:
    """Mean approx-KL of an accumulation group's trained (unit, timestep) pairs, over every process's
    share (all agree to stop), as the reported approx_kl."""
    totals = torch.tensor(
        [[sum(kl * rows for kl, rows in kls), float(sum(rows for _, rows in kls))]], dtype=torch.float64
    )
    if parallel is not None:
        totals = parallel.gather(totals).sum(dim=0, keepdim=True).cpu()
    return float(totals[0, 0] / totals[0, 1]) if totals[0, 1] > 0 else 0.0
