"""Data-parallel learning over several processes (one per GPU) with accelerate.

Every process runs the same update pass from the same seeds, so they agree on the order of units and on
the timesteps trained; each computes the loss of its share of every micro-batch (units rank, rank +
world, ...), weighted by the *global* group size, and before each optimiser step the LoRA gradients are
summed over the processes. Every process then holds the gradient of the whole group, clips and steps
identically, and the adapters stay equal without being broadcast. Launch with `accelerate launch` or
`torchrun`; a single process needs none of this (update_pass's `parallel=None`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class DataParallel:
    def __init__(self, accelerator: Accelerator | None = None):
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes

    def share(self, units: torch.Tensor) -> torch.Tensor:
        """This process's units of a micro-batch."""
        return units[self.rank :: self.world]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the processes (one all-reduce for all)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for p in params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
