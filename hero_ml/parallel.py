"""Data parallelism over several processes (one per GPU), on torch.distributed: sampling and learning.

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

Two ways in: `DataParallel.launched()` in each process `torchrun` started (benchmarks/gpu_round.py),
and `DataParallel.join()` at a FileStore, as a training run with model.processes > 1 and the processes
it starts meet (hero_ml/run_processes.py). Tensors move over NCCL on GPUs and gloo on the CPU; rank
0's commands to the others (`send`/`receive`) over a gloo group of their own, whose timeout is a run's
longest wait. On torch.distributed itself rather than accelerate: a run opens and leaves a group once per
flow run in a process that may open another later, which accelerate's process-wide state (read from
the environment once) does not allow. A single process needs none of this (`parallel=None`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How long a collective waits for every process: a compile in one (minutes on SD 1.5) holds the rest
TIMEOUT = timedelta(minutes=30)
# How long a process waits for rank 0's next command: rank 0 may wait for annotators in between
COMMAND_TIMEOUT = timedelta(days=30)


class DataParallel:
    def __init__(self, rank: int, world: int, device: torch.device, commands: dist.ProcessGroup | None):
        """This process's place in a process group already initialised (launched, join); `commands`:
        the group rank 0's commands go over (join's), None where there are none (launched)."""
        self.rank = rank
        self.world = world
        self.device = device
        self._commands = commands

    @classmethod
    def launched(cls) -> DataParallel:
        """This process of those `torchrun` started (its environment: RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT): GPU LOCAL_RANK when there are GPUs, else the CPU."""
        local = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _initialise(rank, world, device)
        return cls(rank, world, device, commands=None)

    @classmethod
    def join(cls, store: dist.Store, rank: int, world: int, device: torch.device) -> DataParallel:
        """Process `rank` of `world`, meeting the others at `store` (a FileStore on one machine), with
        a group for rank 0's commands."""
        _initialise(rank, world, device, store=store)
        return cls(rank, world, device, commands=dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT))

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
        """Every process's share (each of the same shape) concatenated in rank order (dim 0), on this
        process's device."""
        share = share.to(self.device).contiguous()
        shares = [torch.empty_like(share) for _ in range(self.world)]
        dist.all_gather(shares, share)
        return torch.cat(shares)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of `tensor`, on every process."""
        tensor = tensor.to(self.device).contiguous()
        dist.broadcast(tensor, src=0)
        return tensor

    def share(self, units: torch.Tensor) -> torch.Tensor:
        """This process's units of an accumulation group."""
        return units[self.rank :: self.world]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the processes (one all-reduce for all)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        dist.all_reduce(total)
        offset = 0
        for p in params:
            p.grad = total[offset : offset + p.numel()].view_as(p).to(p.device).clone()
            offset += p.numel()

    def send(self, command: Any) -> None:
        """Rank 0 of joined processes: a picklable command to every other (each takes it with receive)."""
        dist.broadcast_object_list([command], src=0, group=self._command_group())

    def receive(self) -> Any:
        """Not rank 0, joined: rank 0's next command (waits up to COMMAND_TIMEOUT)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._command_group())
        return box[0]

    def _command_group(self) -> dist.ProcessGroup:
        if self._commands is None:
            raise RuntimeError("commands go between processes that joined (DataParallel.join), not launched")
        return self._commands

    def close(self) -> None:
        """Leave the process group, in every process at its end: a process that exits without it can
        abort (SIGABRT) while the interpreter tears down the backend's threads (pytorch#190489), and a
        process that opens another group later needs the default one gone."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _initialise(rank: int, world: int, device: torch.device, **rendezvous: Any) -> None:
    """The default process group: NCCL between GPUs, gloo between CPU processes."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT, **rendezvous)
