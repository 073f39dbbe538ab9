"""A training run over several processes (model.processes, here 2 on the CPU with gloo): it learns what
one process learns, resumes across process counts, names a process that dies, and leaves none behind
when it is killed."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from hero_ml.adapters.storage import LocalStore
from hero_ml.config import HeroConfig, with_overrides
from hero_ml.engine import EngineError
from hero_ml.faults import CRASH_ENV
from hero_ml.feedback import RoundFeedback
from hero_ml.run_processes import LOOPBACK_VARIABLES, ProcessesError, RunProcesses, child_environment
from hero_ml.run_store import RunStore
from hero_ml.training import TrainingRun
from tests.conftest import tiny_run
from tests.test_crash_safety import HERO, hero_run


def config_of(root: Path, processes: int, run_id: str = "p") -> HeroConfig:
    return HeroConfig.model_validate(
        {
            **tiny_run(images=6),
            "feedback": {"budget": 12},  # two rounds
            "simulation": {"eval_images": 0},
            "storage": {"local_root": str(root / "data")},
            "run_id": run_id,
            "model": {"processes": processes},
            "sampling": {**tiny_run(images=6)["sampling"], "sub_batch_size": 3},
        }
    )


@contextlib.contextmanager
def one_thread():
    """Each process of two on 2 cores takes one thread: a reduction split over threads rounds
    differently, which is not what is compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(config: HeroConfig, rounds: int | None = None, on_progress=None) -> dict:
    """Open the run and learn `rounds` more (None: all that are left); the round it ends at, its LoRA
    and its encoder."""
    store = LocalStore(config.storage.local_root)
    with one_thread(), TrainingRun(config, store, on_progress=on_progress) as run:
        learned = 0
        while not run.done and (rounds is None or learned < rounds):
            batch = run.generate()
            run.learn(batch, run.feedback(batch))
            learned += 1
        assert run.engine.encoder is not None
        return {
            "round": run.engine.round,
            "lora": torch.cat([p.detach().reshape(-1).clone() for p in run.engine.lora_params]),
            "encoder": torch.cat([p.detach().reshape(-1).clone() for p in run.engine.encoder.parameters()]),
        }


def stored(root: Path, round_index: int) -> tuple[torch.Tensor, RoundFeedback]:
    runs = RunStore(LocalStore(root / "data"), "p")
    feedback = runs.load_feedback(round_index)
    assert feedback is not None
    return runs.load_batch(round_index).trajectory.latents, feedback


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The run on one process: its folder, its LoRA before learning, what it ends with."""
    root = tmp_path_factory.mktemp("one")
    start = train(config_of(root / "start", 1), rounds=0)
    return root, start, train(config_of(root, 1))


def assert_learned_alike(result: dict, reference: dict, start: dict) -> None:
    """The same rounds, and the LoRA's and encoder's updates within float rounding of the reference's
    (1e-4 of each update's norm)."""
    assert result["round"] == reference["round"]
    for part in ("lora", "encoder"):
        update = (reference[part] - start[part]).norm()
        assert update > 0
        assert (result[part] - reference[part]).norm() / update < 1e-4, part


def test_a_run_on_two_processes_samples_and_learns_what_one_process_does(
    tmp_path: Path, one_process: tuple[Path, dict, dict]
) -> None:
    root, start, reference = one_process
    denoised = []
    result = train(
        config_of(tmp_path, 2), on_progress=lambda *p: denoised.append(p[1:]) if p[0] == "denoising" else None
    )
    assert_learned_alike(result, reference, start)
    # this process sampled its half: one sub-batch of 3 a round (one process: two), 4 steps each
    assert denoised == [(k, 4) for k in range(1, 5)] * 2
    for k in range(2):  # each process sampled its half: the whole round is the one process's
        latents, feedback = stored(tmp_path, k)
        expected_latents, expected_feedback = stored(root, k)
        torch.testing.assert_close(latents, expected_latents, rtol=0, atol=1e-4)
        assert feedback == expected_feedback
    assert not followers_of(os.getpid())


def test_a_run_resumes_on_another_number_of_processes_from_a_round_stored_but_not_learned(
    tmp_path: Path, one_process: tuple[Path, dict, dict]
) -> None:
    _, start, reference = one_process
    assert train(config_of(tmp_path, 2), rounds=1)["round"] == 1  # round 0 on two processes
    with one_thread(), TrainingRun(config_of(tmp_path, 1), LocalStore(tmp_path / "data")) as run:
        run.generate()  # round 1 committed on one process; the run stops before learning it
    # two processes again: the others get the engine from checkpoint 0, and round 1's batch from rank 0
    assert_learned_alike(train(config_of(tmp_path, 2)), reference, start)


def test_a_process_that_dies_is_named_and_the_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, one_process: tuple[Path, dict, dict]
) -> None:
    _, start, reference = one_process
    config = config_of(tmp_path, 2)
    with one_thread(), TrainingRun(config, LocalStore(tmp_path / "data")) as run:
        batch = run.generate()
        feedback = run.feedback(batch)
        assert run.processes is not None
        run.processes.children[0].kill()  # an OOM kill, say
        with pytest.raises(
            ProcessesError, match=r"process 1 of 2 was killed by SIGKILL \(the kernel's .*resume run 'p'"
        ):
            run.learn(batch, feedback)
    assert run.processes is None  # closed: the lease is free, nothing left running
    assert not followers_of(os.getpid())
    assert_learned_alike(train(config), reference, start)


def run_file(tmp_path: Path) -> Path:
    """A config file of a two-round run on 2 processes, for `hero run`."""
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **tiny_run(images=4),
                "feedback": {"budget": 8},
                "simulation": {"eval_images": 0},
                "storage": {"local_root": str(tmp_path / "data")},
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                "model": {"processes": 2},
            }
        )
    )
    return config


def test_hero_run_names_a_killed_process_and_a_killed_run_leaves_nothing_behind_and_resumes(
    tmp_path: Path,
) -> None:
    config, log = run_file(tmp_path), tmp_path / "output.log"
    before = rendezvous_folders()
    with log.open("w") as output:
        run = subprocess.Popen(
            [HERO, "run", "-c", str(config), "--run-id", "k"], stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while "denoising" not in log.read_text() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            (follower,) = followers_of(run.pid)  # sampling with rank 0: killed as an OOM kill would
            os.kill(follower, signal.SIGKILL)
            code = run.wait(timeout=300)
        finally:
            run.kill()
    said = " ".join(log.read_text().split())
    assert code == 1 and "on 2 processes" in said, said
    assert "error: process 1 of 2 was killed by SIGKILL (the kernel's out-of-memory killer, or" in said
    hint = f"resume run 'k' to go on from its last checkpoint: `hero run --resume k --config {config}`"
    assert hint in said
    assert run_processes_within(10) == [] and rendezvous_folders() == before
    # rank 0 killed: only it passes the crash point; the others see it gone and exit, removing its folder
    code, output = hero_run(config, "--resume", "k", crash_at="ddpo.step:1")
    assert code == -signal.SIGKILL, output
    assert run_processes_within(10) == [] and rendezvous_folders() == before
    code, output = hero_run(config, "--resume", "k")
    assert code == 0 and "round 1" in output, output
    assert RunStore(LocalStore(tmp_path / "data"), "k").latest_checkpoint() == 1
    assert run_processes_within(10) == []


def run_processes_within(seconds: float) -> list[int]:
    """The run processes (of any rank 0) still there after `seconds`, or as soon as there are none.
    The others live in process groups of their own: a killed `hero run`'s session is not theirs."""
    deadline = time.monotonic() + seconds
    while (left := followers_of(None)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_process_whose_rank_0_is_killed_where_nothing_fails_exits_and_cleans_up(tmp_path: Path) -> None:
    # over gloo a killed rank 0 breaks the others' connections, and they exit on that error; over NCCL
    # nothing may fail, and they wait in a collective: the watch on their parent ends them
    folder = tmp_path / "rendezvous-folder"
    folder.mkdir()
    follower = (
        "import os, pathlib, time; from hero_ml.run_processes import _exit_with; "
        f"_exit_with(os.getppid(), pathlib.Path({str(folder)!r})); time.sleep(120)"
    )
    rank_0_code = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {follower!r}]); "
        "print(p.pid, flush=True); time.sleep(120)"
    )
    rank_0 = subprocess.Popen([sys.executable, "-c", rank_0_code], stdout=subprocess.PIPE, text=True)
    assert rank_0.stdout is not None
    pid = int(rank_0.stdout.readline())
    time.sleep(3)  # the follower's watch is running
    assert Path(f"/proc/{pid}").exists() and folder.exists()
    rank_0.kill()
    rank_0.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() and not folder.exists()


@pytest.mark.timeout(120)
def test_a_run_that_fails_inside_a_round_stops_its_processes_at_once(tmp_path: Path) -> None:
    # the others are inside the round's collectives, waiting for this process: telling them to stop
    # would wait as long as they do (torch's collective timeout); they are killed
    def progress(phase: str, done: int, total: int) -> None:
        if phase == "denoising" and done == 2:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, an error of a progress display

    started, before = time.monotonic(), rendezvous_folders()
    with pytest.raises(KeyboardInterrupt):
        train(config_of(tmp_path, 2), on_progress=progress)
    assert time.monotonic() - started < 60
    assert not followers_of(os.getpid())
    assert rendezvous_folders() == before


def test_an_error_every_process_raised_is_the_engines_and_a_failure_of_one_is_named(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    processes = RunProcesses(config_of(tmp_path, 2))
    assert torch.get_num_threads() == max(1, threads // 2)  # the two share the cores
    try:
        # the engine's own error, which the other process raised too (here: a command before any engine)
        with pytest.raises(EngineError, match="not finite"), processes.command("learn", 0, None):
            assert processes.children[0].wait(timeout=60) == 1
            raise EngineError("the first round's best is not finite")
        with (
            pytest.raises(ProcessesError, match=r"process 1 of 2 exited with code 1 \(its output .*resume"),
            processes.command("generate"),
        ):
            pass
    finally:
        processes.close()
    assert torch.get_num_threads() == threads


def test_processes_not_up_in_time_are_stopped_and_said(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ProcessesError, match="did not start within 0 s"):
        RunProcesses(config_of(tmp_path, 2), timeout_s=0.01)  # no Python imports torch that fast
    assert time.monotonic() - started < 30
    assert not followers_of(os.getpid())


def test_more_processes_than_gpus_are_refused_before_any_starts(tmp_path: Path) -> None:
    config = with_overrides(
        config_of(tmp_path, 1),
        {
            "model": {"device": "cuda", "processes": 64},
            "sampling": {"images_per_round": 64},
            "feedback": {"budget": 128},
        },
    )
    refused = (  # on a machine without one, the fix is not fewer processes
        r"model.processes is 64 but \d+ GPU\(s\) are visible: lower it \(HERO_MODEL__PROCESSES\)"
        if torch.cuda.is_available()
        else r"model.device is cuda but torch sees no GPU \(torch .*\): set HERO_MODEL__DEVICE=cpu"
    )
    with pytest.raises(ProcessesError, match=refused):
        RunProcesses(config)
    assert not followers_of(os.getpid())


def rendezvous_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hero-processes-*"))


def test_the_others_get_no_secret_and_no_crash_point_from_the_environment() -> None:
    environ = {
        "HERO_LABEL_STUDIO__API_KEY": "ls-key",
        "hero_storage__s3_secret_access_key": "lower case is read too",
        "HERO_ORCHESTRATION": '{"webhook_secret": "a section as JSON"}',
        CRASH_ENV: "ddpo.step:1",
        "HERO_MODEL__PROCESSES": "2",
        "PATH": "/usr/bin",
    }
    env = child_environment(environ)
    assert {k: v for k, v in env.items() if k not in LOOPBACK_VARIABLES} == {
        "HERO_MODEL__PROCESSES": "2",
        "PATH": "/usr/bin",
    }


def followers_of(parent: int | None) -> list[int]:
    """The pids of the run processes (python -m hero_ml.run_processes) that `parent` started (None:
    any process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"hero_ml.run_processes" not in argv:
            continue
        if parent is None or argv[argv.index(b"hero_ml.run_processes") + 4 :][:1] == [str(parent).encode()]:
            found.append(int(entry.name))
    return found
