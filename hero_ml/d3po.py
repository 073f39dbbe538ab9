"""D3PO (github yk7333/D3PO), the pairwise baseline: learn from "this image over that one" directly,
with no reward model, against the frozen starting policy (HERO-REFERENCE.md, "D3PO").

A round's labels become preference pairs (a good image over a bad one); at a denoising step j both
images' steps are scored by the log-ratio of the current policy to the reference (the same UNet with
its LoRA disabled), each ratio clipped to [1 - eps, 1 + eps]:

    L = -log sigmoid(beta * (log clip(ratio_winner) - log clip(ratio_loser)))

Where this differs from D3PO's own runs, by the protocol every method here shares: D3PO compares two
images sampled from one x_T (the preference then reflects the denoising alone); here both are any
good and any bad image of a round, from their own x_T, since annotators label images one by one. And
it trains the timesteps DDPO trains (ddpo.timesteps_per_trajectory a trajectory), not every step, so
that the methods spend the same compute a round; its lr (d3po.lr) was tuned on the toy that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from hero_ml.ddpo import StepObjective
from hero_ml.diffusion.lora import adapters_disabled
from hero_ml.diffusion.sampler import Trajectory, recompute_log_probs


def preference_pairs(good: Sequence[int], bad: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """(winner, loser) index pairs, (P, 2): both sides shuffled and the shorter cycled, so every
    labelled image is in at least one pair and P = max(#good, #bad). No pairs without both kinds."""
    if not good or not bad:
        return torch.empty(0, 2, dtype=torch.long)
    count = max(len(good), len(bad))
    winners = torch.tensor(good)[torch.randperm(len(good), generator=generator)]
    losers = torch.tensor(bad)[torch.randperm(len(bad), generator=generator)]
    return torch.stack(
        [winners.repeat(-(-count // len(good)))[:count], losers.repeat(-(-count // len(bad)))[:count]], 1
    )


def d3po_loss(
    log_prob_winner: torch.Tensor,
    ref_log_prob_winner: torch.Tensor,
    log_prob_loser: torch.Tensor,
    ref_log_prob_loser: torch.Tensor,
    *,
    beta: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D3PO's loss averaged over pairs, with (approx_kl, clip_fraction) against the reference policy."""
    log_ratio = torch.cat([log_prob_winner - ref_log_prob_winner, log_prob_loser - ref_log_prob_loser])
    ratio = torch.exp(log_ratio)
    clipped = torch.log(ratio.clamp(1 - eps, 1 + eps))
    winner, loser = clipped.chunk(2)
    loss = -F.logsigmoid(beta * (winner - loser)).mean()
    approx_kl = 0.5 * (log_ratio**2).mean()
    clip_fraction = ((ratio - 1).abs() > eps).float().mean()
    return loss, approx_kl.detach(), clip_fraction.detach()


def d3po_objective(
    pipe: StableDiffusionPipeline, trajectory: Trajectory, pairs: torch.Tensor, *, beta: float, eps: float
) -> StepObjective:
    """D3PO's loss on pairs `units` at `steps`: the same step index for winner and loser."""

    def objective(
        units: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.cat([pairs[units, 0], pairs[units, 1]])
        both_steps = torch.cat([steps, steps])
        with torch.no_grad(), adapters_disabled(pipe.unet):
            reference = recompute_log_probs(pipe, trajectory, rows, both_steps)
        log_prob = recompute_log_probs(pipe, trajectory, rows, both_steps)
        winner, loser = log_prob.chunk(2)
        ref_winner, ref_loser = reference.chunk(2)
        return d3po_loss(winner, ref_winner, loser, ref_loser, beta=beta, eps=eps)

    return objective
