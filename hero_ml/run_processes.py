"""A training run over several processes (model.processes > 1), data parallel (hero_ml/parallel.py).

The run's own process is rank 0: it holds the lease, reads and writes storage, tracks, labels and
evaluates. It starts ranks 1..N-1 itself (`python -m hero_ml.run_processes`), so a flow run, a
deployment and `hero run` use several GPUs without a launcher, and a flow run that resumes after a
suspension starts them again. Each loads the model and follows rank 0's commands:

    ("engine", None)               a new engine
    ("engine", state_json, blob)   the engine of rank 0's checkpoint (its two files, read by rank 0)
    ("generate",)                  sample the round with rank 0: each its share, then the gather
    ("batch", batch)               the round rank 0 read from storage (committed before a resume)
    ("learn", round, feedback)     learn the current round (it must be `round`) with rank 0
    ("stop",)                      leave the group and exit

They get the config and environment without secrets and never touch the run's storage or a
service. One whose command fails prints why and exits; rank 0's collective with it then fails (at
once over gloo; over NCCL possibly only at torch's collective timeout, parallel.TIMEOUT) and
RunProcesses.command names it. One whose rank 0 is gone (killed) removes the rendezvous folder and
exits within a second, so a crashed run leaves no process behind; they are in a process group of
their own, so a terminal's Ctrl-C reaches rank 0 only, which stops them as it closes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hero_ml.config import HeroConfig, secret_variables
from hero_ml.errors import HeroError
from hero_ml.faults import CRASH_ENV
from hero_ml.parallel import DataParallel

STARTUP_TIMEOUT_S = 300.0  # for the others to start (import torch and this package) and join
STOP_TIMEOUT_S = 60.0  # for the others to exit after "stop", before they are killed
LOOPBACK_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")  # where gloo and NCCL open sockets


class ProcessesError(HeroError, RuntimeError):
    """A process of a run over several processes failed, or could not start."""


def device_of(device: str, rank: int) -> torch.device:
    """Process `rank`'s device under model.device `device` ('cuda' or 'cpu'): GPU `rank`, or the CPU."""
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """The others' environment: rank 0's without its secrets (they use no service) or its crash
    point (a fault-injection test's, for rank 0), their sockets on the loopback (they are all here)."""
    secrets = set(secret_variables())  # pydantic-settings reads names in any case
    env = {k: v for k, v in environ.items() if k.upper() not in secrets and k != CRASH_ENV}
    if (loopback := _loopback()) is not None:
        env |= dict.fromkeys(LOOPBACK_VARIABLES, loopback)
    return env


def cpu_share(threads: int, world: int) -> int:
    """Each process's torch threads when `world` processes share a CPU of `threads`."""
    return max(1, threads // world)


def _loopback() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


@contextmanager
def _on_loopback() -> Iterator[None]:
    """gloo and NCCL open this process's sockets on the loopback within the block; its environment is
    restored after."""
    saved = {name: os.environ.get(name) for name in LOOPBACK_VARIABLES}
    if (loopback := _loopback()) is not None:
        os.environ.update(dict.fromkeys(LOOPBACK_VARIABLES, loopback))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RunProcesses:
    def __init__(self, config: HeroConfig, timeout_s: float = STARTUP_TIMEOUT_S):
        """Start ranks 1..N-1 of a run on config.model.processes processes and join them as rank 0;
        `parallel` is this process's place among them. Refused (ProcessesError) when the GPUs are
        fewer than the processes, or when one exits or has no device ready within timeout_s."""
        self.world = world = config.model.processes
        self.run_id = config.run_id
        if config.model.device == "cuda" and (gpus := torch.cuda.device_count()) < world:
            raise ProcessesError(
                f"model.processes is {world} but {gpus} GPU(s) are visible: lower it "
                "(HERO_MODEL__PROCESSES), or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
                if gpus
                else f"model.device is cuda but torch sees no GPU (torch {torch.__version__}): set "
                "HERO_MODEL__DEVICE=cpu, or install a CUDA build of torch on a machine with GPUs"
            )
        device = config.model.device
        self._folder = Path(tempfile.mkdtemp(prefix="hero-processes-"))  # mode 0700
        self.children: list[subprocess.Popen] = []
        self._settled = True  # False while a command is in flight: the others may be in a collective
        self._threads = torch.get_num_threads()  # this process's own, given back at close
        rendezvous = self._folder / "rendezvous"
        try:
            store = dist.FileStore(str(rendezvous), world)
            for k in range(1, world):
                argv = [str(rendezvous), str(k), str(world), str(os.getpid()), device]
                self.children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "hero_ml.run_processes", *argv],
                        env=child_environment(dict(os.environ)),
                        process_group=0,  # a terminal's Ctrl-C is rank 0's to act on: it stops them
                    )
                )
            self._wait_ready(store, timeout_s)
            with _on_loopback():
                self.parallel = DataParallel.join(store, 0, world, device_of(device, 0))
            self.parallel.send(config.without_secrets())  # they use no service
        except BaseException:
            self._kill()
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        if device == "cpu":  # the processes share the cores, as each of the others does
            torch.set_num_threads(cpu_share(self._threads, world))

    def _wait_ready(self, store: dist.FileStore, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        keys = [f"ready/{k}" for k in range(1, self.world)]
        while not store.check(keys):
            if (failed := self.exited()) is not None:
                raise ProcessesError(f"{failed} before it joined the run")
            if time.monotonic() > deadline:
                raise ProcessesError(
                    f"the run's other processes did not start within {timeout_s:.0f} s (import torch, "
                    "initialise their GPU): the machine is overloaded; lower model.processes"
                )
            time.sleep(0.1)

    def exited(self) -> str | None:
        """The first of the others that has exited, said as "process K of N exited with code C (its
        output above says why)" or "... was killed by SIGKILL (...)"."""
        for rank, child in enumerate(self.children, start=1):
            if (code := child.poll()) is None:
                continue
            if code >= 0:
                return f"process {rank} of {self.world} exited with code {code} (its output above says why)"
            try:
                killer = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                killer = f"signal {-code}"
            why = " (the kernel's out-of-memory killer, or a person)" if -code == signal.SIGKILL else ""
            return f"process {rank} of {self.world} was killed by {killer}{why}"
        return None

    @contextmanager
    def command(self, *command: Any) -> Iterator[None]:
        """Send a command to the others (see the module's docstring), then do rank 0's part of it in
        the block. An error raised by torch.distributed while one of them has exited is raised as
        ProcessesError naming it; any error leaves the command unsettled, so close() kills the others
        rather than wait for them."""
        self._settled = False
        try:
            self.parallel.send(command)
            yield
        except RuntimeError as err:  # gloo raises RuntimeError, NCCL DistError (a RuntimeError)
            if isinstance(err, HeroError):  # the engine's own (EngineError): every process raised it
                raise
            deadline = time.monotonic() + 2.0  # its exit may be a moment behind the broken connection
            while (failed := self.exited()) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if failed is None:
                raise
            raise ProcessesError(
                f"{failed}, which stopped this process's work with it; resume run {self.run_id!r} to go on "
                "from its last checkpoint"
            ) from err
        self._settled = True

    def close(self) -> None:
        """Stop the others and leave the group. They are told to stop when they wait for a command;
        killed at once when a command failed (they may be inside a collective that will never
        complete) or one of them has exited, and after STOP_TIMEOUT_S otherwise."""
        if self._settled and self.exited() is None:
            with suppress(RuntimeError):  # one has just gone: the rest are killed below
                self.parallel.send(("stop",))
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for child in self.children:
                with suppress(subprocess.TimeoutExpired):  # killed below
                    child.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        self.parallel.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        torch.set_num_threads(self._threads)

    def _kill(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait()


def follow(parallel: DataParallel) -> None:
    """Rank > 0: load the model, then do what rank 0 says until it says stop."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from hero_ml.diffusion.pipeline import load_configured_pipeline  # after the join: rank 0 waits for it
    from hero_ml.engine import Engine, RoundBatch

    diffusers_logging.disable_progress_bar()  # rank 0 shows the run's progress
    transformers_logging.disable_progress_bar()
    config: HeroConfig = parallel.receive()
    if parallel.device.type == "cpu":  # the processes share the cores
        torch.set_num_threads(cpu_share(torch.get_num_threads(), parallel.world))
    pipe = load_configured_pipeline(config.model.model_copy(update={"device": str(parallel.device)}))
    engine: Engine | None = None
    batch: RoundBatch | None = None
    while True:
        command, *args = parallel.receive()
        if command == "stop":
            return
        if command == "engine":
            if engine is not None:
                engine.detach()
            if args[0] is None:
                engine = Engine(config, pipe, parallel)
            else:
                state_json, blob = args
                engine = Engine.restored(config, pipe, state_json, blob, "rank 0's checkpoint", parallel)
            continue
        assert engine is not None, f"{command!r} before an engine"
        if command == "generate":
            batch = engine.generate()
        elif command == "batch":
            batch = args[0]
        elif command == "learn":
            round_index, feedback = args
            if batch is None or batch.round != round_index:
                raise ValueError(
                    f"told to learn round {round_index}, holding {None if batch is None else batch.round}"
                )
            engine.learn(batch, feedback)
        else:
            raise ValueError(f"unknown command {command!r}")


def _orphaned(folder: Path) -> None:
    """Exit (code 1) as a process whose rank 0 is gone: removing the rendezvous folder it made."""
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(1)


def _exit_with(parent: int, folder: Path) -> None:
    """Exit (code 1) within a second of process `parent` ending, however it ended, removing the
    rendezvous `folder` it made (killed, it could not)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _orphaned(folder)

    threading.Thread(target=watch, name="exit-with-rank-0", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description="A process of a training run over several (not for people).")
    parser.add_argument("rendezvous", help="the FileStore rank 0 made")
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("parent", type=int, help="rank 0's pid: exit when it ends")
    parser.add_argument("device", choices=["cpu", "cuda"], help="model.device: GPU RANK, or the CPU")
    args = parser.parse_args()
    _exit_with(args.parent, Path(args.rendezvous).parent)
    device = device_of(args.device, args.rank)
    if device.type == "cuda":  # ready means its GPU works: what fails after is the join alone
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
    store = dist.FileStore(args.rendezvous, args.world)
    store.set(f"ready/{args.rank}", "1")
    parallel = DataParallel.join(store, args.rank, args.world, device)
    try:
        follow(parallel)
    except Exception as err:
        if os.getppid() != args.parent:  # rank 0 ended: its connections broke, nothing failed here
            _orphaned(Path(args.rendezvous).parent)
        print(
            f"process {args.rank} of {args.world} of the run failed: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        os._exit(1)  # without leaving the group: rank 0's next collective with it fails
    parallel.close()


if __name__ == "__main__":
    main()
