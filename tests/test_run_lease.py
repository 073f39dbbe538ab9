"""One writer per run: the store's create-if-absent, the run lease on both stores (real S3 server on
loopback, local directory), and `hero run` / `hero sample` refused while another live process writes
the run; `hero storage ls` names the writer."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hero_ml.adapters.storage import ArtifactStore, LocalStore, open_store
from hero_ml.cli import app
from hero_ml.config import HeroConfig
from hero_ml.run_lease import (
    LeasedStore,
    LeaseLostError,
    LeaseRecord,
    RunLease,
    RunLeasedError,
    process_scope,
)
from hero_ml.sample_round import sample_round
from tests.conftest import Service
from tests.fault_proxy import FaultProxy
from tests.test_run import small
from tests.test_storage import s3_config, through

HERO = Path(sys.executable).with_name("hero")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(s3_config(request.getfixturevalue("s3_server")))


def records(store: ArtifactStore, run_id: str) -> list[dict]:
    return [json.loads(store.get(key)) for key in store.list(f"runs/{run_id}/lease")]


def test_create_writes_only_when_there_is_no_object(store: ArtifactStore) -> None:
    assert store.create("runs/r/once.json", b"first")
    assert not store.create("runs/r/once.json", b"second")
    assert store.get("runs/r/once.json") == b"first"
    assert store.list("runs/r") == {"runs/r/once.json": 5}  # no temporary file left beside it


def race_to_create(store: ArtifactStore, key: str, racers: int) -> list[bool]:
    """`racers` threads creating `key` at one moment: what each got."""
    start = threading.Barrier(racers)
    results: list[bool] = []

    def create(name: int) -> None:
        start.wait()
        results.append(store.create(key, str(name).encode()))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_of_racing_creators_exactly_one_wins_in_a_folder(tmp_path: Path) -> None:
    # The local store's link is atomic; moto's conditional PUT is not (it tests moto, not us), and
    # AWS S3 and MinIO document theirs as atomic.
    store = LocalStore(tmp_path)
    for attempt in range(20):
        assert sorted(race_to_create(store, f"runs/r/{attempt}.json", 8)) == [False] * 7 + [True]


def test_a_held_run_is_refused_then_taken_once_released(store: ArtifactStore) -> None:
    first = RunLease(store, "r")
    first.acquire()
    with pytest.raises(
        RunLeasedError, match=rf"run 'r' is being written by another process: pid {os.getpid()}"
    ):
        RunLease(store, "r").acquire(wait=False)
    first.release()
    with pytest.raises(LeaseLostError, match="no lease is held"):
        LeasedStore(store, first).put("runs/r/x", b"late")
    with RunLease(store, "r") as second:
        assert second.epoch == 1
        LeasedStore(store, second).put("runs/r/x", b"written")
    history = records(store, "r")
    assert [r["released"] for r in history] == [True, True]
    assert history[0]["owner"] == first.owner and history[1]["owner"] == second.owner
    assert store.get("runs/r/x") == b"written"


def test_a_lapsed_lease_is_taken_over_and_its_holder_is_fenced(store: ArtifactStore) -> None:
    now = [time.time()]
    holder = RunLease(store, "r", ttl_s=60, clock=lambda: now[0])
    holder.acquire()
    holder._stop.set()  # the holder freezes: no more renewals
    writes = LeasedStore(store, holder)
    writes.put("runs/r/before", b"ok")

    with pytest.raises(RunLeasedError, match="renewed 59 s ago"):
        RunLease(store, "r", ttl_s=60, clock=lambda: now[0] + 59).acquire(wait=False)
    taker = RunLease(store, "r", ttl_s=60, clock=lambda: now[0] + 61)
    taker.acquire(wait=False)  # 61 s without renewal: lapsed
    assert taker.epoch == 1

    now[0] += 61  # the holder wakes up: its last renewal is past ttl/2, so it asks the store first
    with pytest.raises(
        LeaseLostError, match=r"epoch 0\) was taken over \(pid .*\) after 61 s without renewal"
    ):
        writes.put("runs/r/after", b"stale")
    assert not store.exists("runs/r/after")
    with pytest.raises(LeaseLostError):
        writes.put("runs/r/before", b"again")  # lost stays lost
    holder.release()  # marks nothing: the epoch is the taker's now
    assert [r["released"] for r in records(store, "r")] == [False, False]
    taker.release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(store: ArtifactStore) -> None:
    with RunLease(store, "r", ttl_s=1.5) as holder:  # renewed every 0.25 s
        acquired = records(store, "r")[0]["renewed"]
        deadline = time.monotonic() + 30  # a loaded machine may delay a beat, not stop them
        while records(store, "r")[0]["renewed"] <= acquired + 1.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        renewed = records(store, "r")[0]["renewed"]
        assert renewed > acquired + 1.5  # past the TTL it started with
        with pytest.raises(RunLeasedError):  # judged 1 s after that renewal, however late this runs
            RunLease(store, "r", ttl_s=1.5, clock=lambda: renewed + 1.0).acquire(wait=False)
        LeasedStore(store, holder).put("runs/r/x", b"still ours")


def test_a_waiting_taker_refuses_a_renewing_holder_and_takes_a_silent_one(store: ArtifactStore) -> None:
    renewing = RunLease(store, "r", ttl_s=12)  # renewed every 2 s: seen renewing long before it could lapse
    with renewing, pytest.raises(RunLeasedError, match="being written by another process"):
        RunLease(store, "r", ttl_s=12).acquire()  # waits until it sees a renewal
    ttl = 1.5
    silent = RunLease(store, "r", ttl_s=ttl)
    silent.acquire()
    silent._stop.set()  # alive, but renews no more (a paused VM, a lost network)
    started = time.monotonic()
    with RunLease(store, "r", ttl_s=ttl) as taker:
        assert taker.epoch == 2
        assert time.monotonic() - started > 0.5 * ttl  # waited for the lapse (load only lengthens it)
    with pytest.raises(LeaseLostError, match="taken over"):
        silent._renew()
        silent.check()


def test_a_fresh_lease_of_another_host_is_not_taken_for_a_crash(store: ArtifactStore) -> None:
    # The PID of a holder elsewhere says nothing about a process here: one that is free on this
    # host must not make a live remote writer look crashed.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    record = LeaseRecord(
        owner="x",
        host="elsewhere",
        pid=gone.pid,
        process_scope="elsewhere/pid:[1]",
        acquired=now,
        renewed=now,
    )
    for scope in ("elsewhere/pid:[1]", None):  # another host's namespace, or one not known
        store.put(
            "runs/r/lease/00000000.json",
            record.model_copy(update={"process_scope": scope}).model_dump_json().encode(),
        )
        with pytest.raises(RunLeasedError, match=f"pid {gone.pid} on elsewhere holds its lease"):
            RunLease(store, "r").acquire(wait=False)
    here = record.model_copy(update={"process_scope": process_scope()})  # this host's: a crash
    store.put("runs/r/lease/00000000.json", here.model_dump_json().encode())
    with RunLease(store, "r") as lease:
        assert lease.epoch == 1


class RivalFirst:
    """A store on which another process creates the next lease record between this one's look at the
    newest epoch and its own create: the race the read-back settles."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner = inner
        self.rival = RunLease(inner, "r")

    def create(self, key: str, data: bytes) -> bool:
        if "/lease/" in key and self.rival.epoch is None:
            self.rival.acquire(wait=False)
        return self.inner.create(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TakenAsItRenews:
    """A store on which a taker creates the next epoch while the holder renews: after the holder's
    look at the newest epoch, before its put lands (the holder stalled past the TTL, then woke)."""

    def __init__(self, inner: ArtifactStore, taker: RunLease) -> None:
        self.inner = inner
        self.taker = taker

    def put(self, key: str, data: bytes) -> None:
        if "/lease/" in key and self.taker.epoch is None:
            self.taker.acquire(wait=False)
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_holder_taken_over_as_it_renews_stops_writing(store: ArtifactStore) -> None:
    now = [time.time()]
    taker = RunLease(store, "r", ttl_s=60, clock=lambda: now[0] + 61)  # sees the holder lapsed
    racing = TakenAsItRenews(store, taker)
    holder = RunLease(racing, "r", ttl_s=60, clock=lambda: now[0])  # type: ignore[arg-type]
    holder.acquire()
    holder._stop.set()  # its heartbeat is ours to drive
    holder._renew()  # the taker creates epoch 1 between this renewal's look and its put
    assert taker.epoch == 1
    with pytest.raises(LeaseLostError, match=r"epoch 0\) was taken over \(pid .*\) as it renewed"):
        LeasedStore(store, holder).put("runs/r/progress.json", b"stale")
    assert not store.exists("runs/r/progress.json")
    holder.release()
    taker.release()


def test_the_taker_of_a_lapsed_lease_writes_only_after_its_holders_unchecked_window(
    store: ArtifactStore, caplog: pytest.LogCaptureFixture
) -> None:
    ttl = 1.5
    silent = RunLease(store, "r", ttl_s=ttl)
    silent.acquire()
    silent._stop.set()  # alive, renewing no more
    with RunLease(store, "r", ttl_s=ttl, clock=lambda: time.time() + ttl + 1) as taker:
        taken = time.monotonic()
        LeasedStore(store, taker).put("runs/r/first", b"x")
        assert time.monotonic() - taken >= ttl / 2 * 0.99  # load only lengthens it
        assert "its last writer's lease lapsed" in caplog.text
        caplog.clear()
        LeasedStore(store, taker).put("runs/r/second", b"x")  # waited once
    with RunLease(store, "r", ttl_s=ttl) as after_release:  # a released lease: no window to wait out
        LeasedStore(store, after_release).put("runs/r/third", b"x")
    assert "lapsed" not in caplog.text
    silent.release()


def test_of_two_processes_taking_one_epoch_at_once_the_second_is_refused(store: ArtifactStore) -> None:
    racing = RivalFirst(store)
    with pytest.raises(
        RunLeasedError, match=r"another process took its lease \(epoch 0\) at the same moment"
    ):
        RunLease(racing, "r").acquire(wait=False)  # type: ignore[arg-type]
    assert [r["owner"] for r in records(store, "r")] == [racing.rival.owner]
    racing.rival.release()


class ConflictThenNothing:
    """S3's 409 ConditionalRequestConflict: another conditional write of the key in flight, which then
    fails, so nothing is there (a server on loopback cannot be made to answer this on cue)."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner = inner

    def create(self, key: str, data: bytes) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_create_refused_for_a_write_that_then_failed_is_a_readable_refusal(store: ArtifactStore) -> None:
    with pytest.raises(RunLeasedError, match=r"another process took its lease \(epoch 0\) at the same"):
        RunLease(ConflictThenNothing(store), "r").acquire(wait=False)  # type: ignore[arg-type]


def test_the_heartbeat_renews_again_once_the_store_is_back(s3_server: Service) -> None:
    down = threading.Event()
    with FaultProxy(s3_server.url, lambda n, method, path: "503" if down.is_set() else None) as proxy:
        store = through(proxy, s3_server, s3_max_attempts=1)
        with RunLease(store, "r", ttl_s=3) as lease:  # a beat every 0.5 s
            down.set()
            deadline = time.monotonic() + 60
            while len(proxy.injected) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(proxy.injected) >= 2  # beats failed against the store
            back = time.time()
            down.clear()
            while records(store, "r")[0]["renewed"] <= back and time.monotonic() < deadline:
                time.sleep(0.05)
            assert records(store, "r")[0]["renewed"] > back  # the heartbeat kept going
            lease.check()


def test_a_corrupt_lease_record_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("runs/r/lease/00000000.json", b'{"owner": "x"}')
    with pytest.raises(
        RunLeasedError, match=r"runs/r/lease/00000000.json is not a lease record .* delete it"
    ):
        RunLease(store, "r").acquire()


HOLD = """
import sys, time
from hero_ml.adapters.storage import LocalStore
from hero_ml.run_lease import RunLease
RunLease(LocalStore(sys.argv[1]), sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold(root: Path, run_id: str, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the run's lease for `seconds`, then exiting without releasing it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), run_id, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    return process


def test_a_crashed_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    assert process_scope() is not None  # Linux: the PID namespace can be named
    process = hold(tmp_path, "r", 0)
    process.wait()
    with RunLease(LocalStore(tmp_path), "r") as lease:  # no waiting for the TTL: that pid is gone
        assert lease.epoch == 1


def test_hero_run_is_refused_while_another_process_writes_the_run(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path, run_id="shared")))
    holder = hold(tmp_path / "data", "shared", 600)
    try:
        refused = subprocess.run([HERO, "run", "-c", config], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1
        assert "Traceback" not in refused.stderr  # Prefect's log of the failed flow run keeps to the message
        said = " ".join(refused.stderr.split())
        assert f"error: run 'shared' is being written by another process: pid {holder.pid} on" in said
        assert not (tmp_path / "data" / "runs" / "shared" / "config.json").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lease is not released
        holder.wait()
    # the next writer takes it at once (a whole `hero run` after a SIGKILL: test_crash_safety.py)
    with RunLease(LocalStore(tmp_path / "data"), "shared") as lease:
        assert lease.epoch == 1


def test_a_store_down_at_release_leaves_the_lease_to_lapse(
    s3_server: Service, caplog: pytest.LogCaptureFixture
) -> None:
    down = threading.Event()
    with FaultProxy(s3_server.url, lambda n, method, path: "503" if down.is_set() else None) as proxy:
        store = through(proxy, s3_server, s3_max_attempts=2)
        lease = RunLease(store, "r")
        lease.acquire()
        down.set()
        with caplog.at_level(logging.WARNING, logger="hero_ml.run_lease"):
            lease.release()  # does not raise: a run that is done or suspending must not fail here
        assert "its lease could not be marked released" in caplog.text and "SlowDown" in caplog.text
        down.clear()
        assert [r["released"] for r in records(store, "r")] == [False]
        with pytest.raises(LeaseLostError, match="no lease is held"):
            lease.check()


def test_a_lease_whose_create_answer_was_lost_is_held_not_refused(s3_server: Service) -> None:
    # The conditional PUT reaches the server, its answer does not; botocore retries, and the retry
    # finds the key taken (412): by this process's own record, which the lease must recognise.
    lost: list[str] = []

    def plan(n: int, method: str, path: str) -> str | None:
        if method == "PUT" and "/lease/" in path and not lost:
            lost.append(path)
            return "lost"
        return None

    with FaultProxy(s3_server.url, plan, stall_s=3) as proxy:
        store = through(proxy, s3_server, s3_max_attempts=3, s3_timeout_s=1)
        with RunLease(store, "r") as lease:
            assert lease.epoch == 0
            lease.check()
        assert [fault for *_, fault in proxy.injected] == ["lost"]
        assert [(r["owner"], r["released"]) for r in records(store, "r")] == [(lease.owner, True)]


def test_storage_ls_says_who_writes_the_run(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"local_root": str(tmp_path / "data")}}))
    store = LocalStore(tmp_path / "data")
    store.put("runs/r/config.json", b"{}")
    with RunLease(store, "r"):
        held = CliRunner().invoke(app, ["storage", "ls", "r", "-c", str(config)])
    assert held.exit_code == 0, held.output
    assert f"being written: pid {os.getpid()} on" in " ".join(held.output.split())
    free = CliRunner().invoke(app, ["storage", "ls", "r", "-c", str(config)])
    assert "no process writes it now" in free.output
    assert "latest checkpoint: none yet;" in free.output  # nothing learned yet, said in words


def test_hero_sample_refuses_a_run_another_process_writes(tmp_path: Path) -> None:
    config = HeroConfig.model_validate(small(tmp_path, run_id="busy"))
    holder = hold(tmp_path / "data", "busy", 600)
    try:
        with pytest.raises(RunLeasedError, match=f"pid {holder.pid}"):
            sample_round(config)
        assert not (tmp_path / "data" / "runs" / "busy" / "rounds").exists()
    finally:
        holder.kill()
        holder.wait()
    assert sample_round(config).manifest["round"] == 0  # the holder crashed: taken at once
