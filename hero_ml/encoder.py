"""The feedback encoder: a small CNN on SD latents plus a projection head, trained with a triplet
loss to pull good images towards the best and push bad ones away (HERO-REFERENCE.md, "Encoder").

Its input is the latent entering the last denoising step. The CNN is sized from the latent's shape
so that SD 1.5's 4x64x64 gives the reference network exactly: 3 x [conv3x3, ReLU, maxpool2] with
C -> 8 -> 16 -> 32 channels, flatten (2048), Linear 2048 -> 2048 + ReLU; head 2048 -> 2048 -> 1024
-> 512. Training is continual: the same encoder and optimiser carry over from round to round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = 3  # each halves h and w: latents must be divisible by 8


class FeedbackEncoder(nn.Module):
    def __init__(self, latent_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = latent_shape
        if height % 2**POOLINGS or width % 2**POOLINGS:
            raise ValueError(f"latent height and width must be multiples of 8, got {height}x{width}")
        flat = 32 * (height // 8) * (width // 8)
        self.latent_shape = latent_shape
        self.cnn = nn.Sequential(
            *_conv_block(channels, 8),
            *_conv_block(8, 16),
            *_conv_block(16, 32),
            nn.Flatten(),
            nn.Linear(flat, flat),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(flat, flat),
            nn.ReLU(),
            nn.Linear(flat, flat // 2),
            nn.ReLU(),
            nn.Linear(flat // 2, flat // 4),
        )

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """The representation rewards are computed on (before the head): (N, flat)."""
        return self.cnn(latents.float())

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """The projection the triplet loss is computed on: (N, flat // 4)."""
        return self.head(self.features(latents))


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1 - cos) / 2 between matching rows of a and b (N, D), in [0, 1]. Shape (N,).

    Per sample (dim 1): the reference code took the cosine across the batch (dim 0), a defect."""
    return (1 - F.cosine_similarity(a, b, dim=1)) / 2


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """mean(max(0, d(anchor, positive) - d(anchor, negative) + margin)) over the batch."""
    return F.relu(cosine_distance(anchor, positive) - cosine_distance(anchor, negative) + margin).mean()


@dataclass(frozen=True)
class TripletSource:
    """One round's labelled latents: anchor = the best (C, h, w), good (G, C, h, w): the good images
    other than the anchor, bad (B, C, h, w).

    A round with no good image but the anchor uses the anchor itself as the positive (the loss then
    only pushes the bad ones away); a round with no bad image has nothing to push away and yields no
    triplets."""

    anchor: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor


def train_encoder(
    encoder: FeedbackEncoder,
    optimizer: torch.optim.Optimizer,
    sources: Sequence[TripletSource],
    *,
    epochs: int,
    triplets_per_epoch: int,
    margin: float,
    generator: torch.Generator,
    on_epoch: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Train on triplets drawn anew each epoch (source uniformly, then a random good and bad of it);
    one optimiser step per epoch. Returns the loss of every epoch; empty when no source has a bad image.
    on_epoch(done, epochs): told 0 before the first epoch, then after each.

    The latents go to the encoder's device once, and an epoch embeds each distinct latent it uses once
    (a round has one anchor and some 64 labelled latents, an epoch 3 x 64 triplet rows): the loss and
    its gradient are those of embedding every row, at a third of the cost."""
    usable = [source for source in sources if len(source.bad)]
    if not usable:
        return []
    device = next(encoder.parameters()).device
    # one table of every latent: per source its anchor, its positive pool, its bad images
    parts, anchor_row, pool_rows, bad_rows = [], [], [], []
    offset = 0
    for source in usable:
        pool = source.good if len(source.good) else source.anchor[None]
        parts += [source.anchor[None], pool, source.bad]
        anchor_row.append(offset)
        pool_rows.append(torch.arange(offset + 1, offset + 1 + len(pool)))
        bad_rows.append(torch.arange(offset + 1 + len(pool), offset + 1 + len(pool) + len(source.bad)))
        offset += 1 + len(pool) + len(source.bad)
    table = torch.cat(parts).to(device)
    encoder.train()
    losses = []
    if on_epoch is not None:
        on_epoch(0, epochs)
    for epoch in range(epochs):
        which = torch.randint(len(usable), (triplets_per_epoch,), generator=generator)
        anchors, positives, negatives = [], [], []
        for index in range(len(usable)):
            count = int((which == index).sum())
            if count == 0:
                continue
            pool, bad = pool_rows[index], bad_rows[index]
            anchors.append(torch.full((count,), anchor_row[index]))
            positives.append(pool[torch.randint(len(pool), (count,), generator=generator)])
            negatives.append(bad[torch.randint(len(bad), (count,), generator=generator)])
        rows = torch.cat([torch.cat(anchors), torch.cat(positives), torch.cat(negatives)])
        used, position = torch.unique(rows, return_inverse=True)
        embedded = encoder(table[used.to(device)])
        anchor, positive, negative = embedded[position.to(device)].chunk(3)
        loss = triplet_loss(anchor, positive, negative, margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    encoder.eval()
    return losses
