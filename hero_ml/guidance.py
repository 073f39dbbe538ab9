"""Feedback-guided initial noise: the next round starts near the initial noises of liked images.

HERO-REFERENCE.md: floor(n * best_ratio) images start from the best image's x_T, the others from
an x_T drawn uniformly, with replacement, from the pool = the good images' x_T plus the best's; each
is perturbed as sqrt(1 - eps^2) * x + eps * n, n ~ N(0, I). Since x ~ N(0, I), so is the result:
the marginal stays the prior the model was trained on, only correlated with liked noises.

Degenerate cases: a round with no good image leaves the pool = the best alone; a best kept from an
earlier round is passed in as `best` like a new one. The first round has no best: the caller
samples plain N(0, I) (as does guidance off).
"""

from __future__ import annotations

import math

import torch


def guided_initial_noise(
    best: torch.Tensor,
    good: torch.Tensor,
    n: int,
    *,
    best_ratio: float,
    eps: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """n initial noises near `best` (C, h, w) and the pool `good` (G, C, h, w) + best; G may be 0."""
    if not 0 <= best_ratio <= 1 or not 0 <= eps <= 1:
        raise ValueError(f"best_ratio and eps must lie in [0, 1], got {best_ratio} and {eps}")
    if good.shape[1:] != best.shape:
        raise ValueError(f"good noises have shape {tuple(good.shape[1:])}, the best {tuple(best.shape)}")
    n_best = math.floor(n * best_ratio)
    pool = torch.cat([good, best[None]])
    picks = torch.randint(len(pool), (n - n_best,), generator=generator)
    centres = torch.cat([best.expand(n_best, *best.shape), pool[picks]])
    perturbation = torch.randn(centres.shape, generator=generator, dtype=centres.dtype)
    return math.sqrt(1 - eps**2) * centres + eps * perturbation
