"""Feedback-guided initial noise: the next round starts near the initial noises of liked images.

HERO-REFERENCE.md: ceil(n * best_ratio) images start from the best image's x_T, the others from a
good image's x_T drawn uniformly with replacement (the engine passes the good images other than the
best, so the best's share is best_ratio, not more); each is perturbed as sqrt(1 - eps^2) * x + eps * n,
n ~ N(0, I). Since x ~ N(0, I), so is the result: the marginal stays the prior the model was trained
on, only correlated with liked noises. As in the reference (sony/hero, `ddpo_trainer.py`), a
best_ratio of 0 puts the best among the good ones instead.

Degenerate cases: a round with no good image besides the best starts every image near the best (the
reference crashes there); a best kept from an earlier round is passed in as `best` like a new one.
The first round has no best: the caller samples plain N(0, I) (as does guidance off).

A finished run leaves its last pool as a NoisePool, logged beside the LoRA: the LoRA sampled from
it is what HERO's training batches measure (and, most likely, the paper's evaluation: benchmarks/FINDINGS.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def guided_initial_noise(
    best: torch.Tensor,
    good: torch.Tensor,
    n: int,
    *,
    best_ratio: float,
    eps: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """n initial noises near `best` (C, h, w) and the good noises `good` (G, C, h, w); G may be 0."""
    if not 0 <= best_ratio <= 1 or not 0 <= eps <= 1:
        raise ValueError(f"best_ratio and eps must lie in [0, 1], got {best_ratio} and {eps}")
    if good.shape[1:] != best.shape:
        raise ValueError(f"good noises have shape {tuple(good.shape[1:])}, the best {tuple(best.shape)}")
    # the reference's `index < n * ratio`, on the product as written (100 x 0.07 is 7.000000000000001
    # in floats, which would give the best 8 noises)
    n_best = math.ceil(round(n * best_ratio, 9))
    pool = good if len(good) and best_ratio > 0 else torch.cat([good, best[None]])
    picks = torch.randint(len(pool), (n - n_best,), generator=generator)
    centres = torch.cat([best.expand(n_best, *best.shape), pool[picks]])
    perturbation = torch.randn(centres.shape, generator=generator, dtype=centres.dtype)
    return math.sqrt(1 - eps**2) * centres + eps * perturbation


@dataclass(frozen=True)
class NoisePool:
    """A run's last guidance pool: the best image's x_T (C, h, w), the good images' (G, C, h, w), how
    to mix them, and the prompt those images were drawn for. Saved as safetensors + JSON."""

    best: torch.Tensor
    good: torch.Tensor
    best_ratio: float
    eps: float
    prompt: str

    TENSORS: ClassVar[str] = "noise_pool.safetensors"
    SETTINGS: ClassVar[str] = "noise_pool.json"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return guided_initial_noise(
            self.best, self.good, n, best_ratio=self.best_ratio, eps=self.eps, generator=generator
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"best": self.best.contiguous().cpu(), "good": self.good.contiguous().cpu()},
            folder / self.TENSORS,
        )
        settings = {"best_ratio": self.best_ratio, "eps": self.eps, "prompt": self.prompt}
        (folder / self.SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> NoisePool:
        """The pool `save` wrote to `folder`; ValueError says what is missing or wrong."""
        try:
            tensors = load_file(folder / cls.TENSORS)
            settings = _PoolSettings.model_validate_json((folder / cls.SETTINGS).read_text())
            pool = cls(tensors["best"], tensors["good"], **settings.model_dump())
            pool.sample(1, torch.Generator())  # the shapes guided_initial_noise checks
        except (OSError, SafetensorError, ValueError, KeyError) as err:  # ValidationError is a ValueError
            raise ValueError(
                f"{folder} holds no readable noise pool ({cls.TENSORS} + {cls.SETTINGS}): {err}"
            ) from None
        return pool


class _PoolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    best_ratio: float = Field(ge=0, le=1)
    eps: float = Field(ge=0, le=1)
    prompt: str
