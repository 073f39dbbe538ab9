"""Rewards from the feedback encoder's features (before its projection head), in [0, 1]; with the
annotators' labels added, in [0, 2]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between each row of features (N, D) and each row of reference (M, D): (N, M)."""
    return (F.normalize(features, dim=1) @ F.normalize(reference, dim=1).T + 1) / 2


def similarity_to_best(features: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """HERO's reward: similarity of each image (N, D) to the best image (D,). Shape (N,)."""
    return similarity(features, best[None])[:, 0]


def mean_similarity_to_good(features: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """The variant: mean similarity of each image (N, D) to the good images (G, D), G >= 1. Shape (N,)."""
    if len(good) == 0:
        raise ValueError("mean similarity to good images needs at least one good image")
    return similarity(features, good).mean(dim=1)


def with_labels(rewards: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """The labels folded in: reward + 1 for a good image (good: (N,) bool), so every good image ranks
    above every bad one while the encoder still orders the images within each label. Shape (N,)."""
    if good.shape != rewards.shape or good.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor of the rewards' shape {tuple(rewards.shape)}")
    return rewards + good.to(rewards.dtype)
