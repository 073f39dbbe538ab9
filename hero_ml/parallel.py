"""Data parallelism over several processes (one per GPU) with accelerate: sampling and learning.

Sampling: each process denoises a contiguous share of the round's images (every image has its own
random stream, so which process samples it does not change it) and the shares are gathered, so every
process ends with the whole round, as one process would have sampled it.

Learning: every process runs the same update pass from the same seeds, so they agree on the order of
units and on the timesteps trained; each computes the loss of its share of every accumulation group
(units rank, rank + world, ..., in micro-batches of train_batch_size), weighted by the *global* group
size, and before each optimiser step the LoRA
gradients are summed over the processes. Every process then holds the gradient of the whole group,
clips and steps identically, and the adapters stay equal without being broadcast. The encoder, trained
on every process from the same inputs, is broadcast from rank 0 after its update, so that kernel
nondeterminism on one GPU cannot make the processes' rewards (computed by each from it) drift apart.

Launch with `torchrun` (or `accelerate launch --multi_gpu`); a single process needs none of this
(`parallel=None`). The engine and `benchmarks/gpu_round.py` run this way; a training run (`hero run`,
a deployment) is one process and refuses a multi-process launch (training.multi_process_launch).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast


class DataParallel:
    def __init__(self, accelerator: Accelerator | None = None):
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        """This process's device (its GPU under a multi-GPU launch)."""
        return self.accelerator.device

    def images(self, count: int) -> slice:
        """This process's contiguous share of a round of `count` images."""
        if count % self.world:
            raise ValueError(
                f"images_per_round ({count}) must be a multiple of the number of processes "
                f"({self.world}) to share a round between them"
            )
        share = count // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def gather(self, share: torch.Tensor) -> torch.Tensor:
        """Every process's share concatenated in rank order (dim 0), on this process's device."""
        return self.accelerator.gather(share.to(self.device).contiguous())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of `tensor`, on every process."""
        return broadcast(tensor.to(self.device).contiguous(), from_process=0)

    def share(self, units: torch.Tensor) -> torch.Tensor:
        """This process's units of an accumulation group."""
        return units[self.rank :: self.world]

    def close(self) -> None:
        """Leave the process group, in every process at its end: a process that exits without it can
        abort (SIGABRT) while the interpreter tears down the backend's threads (pytorch#190489)."""
        self.accelerator.end_training()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the processes (one all-reduce for all)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for p in params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
