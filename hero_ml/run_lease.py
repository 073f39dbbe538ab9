"""One writer per run: a lease in the run's storage, held by the process that writes the run.

    runs/{run_id}/lease/{epoch}.json   who took the run at that epoch, when it last renewed, released

Two processes writing one run at once (a worker thought dead that is not, a second `hero run --resume`)
would interleave their rounds and checkpoints. So a writer first takes the next epoch with a
create-if-absent write (of two contenders exactly one gets it), renews it from a background thread every
ttl/6 seconds, and writes (LeasedStore) only while its epoch is the newest and its last renewal younger
than ttl/2; past that it confirms on the store first and stops with LeaseLostError when another process
has taken the run. The newest epoch may be taken when it is released, at once when it names a process of
this host and PID namespace that is gone (a crash), when its last renewal is older than the TTL (the
taker's clock against the holder's: hosts' clocks must agree to well within ttl/2, as NTP keeps them), or
when a taker that watches it sees no renewal for a whole TTL of its own clock. A holder may renew
unseen as it is taken over (between the taker's look and its create): so a renewal looks again after
its put, and the taker of a lapsed lease makes its first write only ttl/2 after taking it, when such a
holder has had to ask the store. The epochs stay as the run's history of writers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, ValidationError

from hero_ml.adapters.storage import ArtifactStore
from hero_ml.errors import HeroError

_log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0  # a crashed writer on another host blocks its run this long; renewals every ttl/6


class RunLeasedError(HeroError, RuntimeError):
    """Another live process writes the run."""


class LeaseLostError(HeroError, RuntimeError):
    """This process's lease was taken by another after it failed to renew it: it must not write."""


class LeaseRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    owner: str  # a fresh id per lease: two leases of one process differ
    host: str
    pid: int
    process_scope: str | None  # host and PID namespace: where `pid` names a process (None: unknown)
    acquired: float  # unix seconds, the holder's clock
    renewed: float
    released: bool = False


def process_scope() -> str | None:
    """This host and PID namespace (Linux), in which a lease's PID can be checked; None elsewhere."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _crashed_here(record: LeaseRecord) -> bool:
    """Whether the lease names a process of this host and PID namespace that is gone."""
    here = record.process_scope is not None and record.process_scope == process_scope()
    return here and not _process_alive(record.pid)


class RunLease:
    def __init__(
        self,
        store: ArtifactStore,
        run_id: str,
        *,
        ttl_s: float = LEASE_TTL_S,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.clock = clock  # wall clock, comparable across hosts (renewals are judged on it)
        self.prefix = f"runs/{run_id}/lease"
        self.owner = uuid4().hex
        self.epoch: int | None = None
        self._record: LeaseRecord | None = None
        self._renewed_at = (0.0, 0.0)  # (monotonic, wall) of the last renewal stored
        self._quiet_until = 0.0  # monotonic: no write before it (a lapsed holder's last write window)
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _key(self, epoch: int) -> str:
        return f"{self.prefix}/{epoch:08d}.json"

    def _latest(self) -> tuple[int, LeaseRecord] | None:
        epochs = [int(Path(key).stem) for key in self.store.list(self.prefix) if Path(key).stem.isdigit()]
        if not epochs:
            return None
        epoch = max(epochs)
        key = self._key(epoch)
        try:
            return epoch, LeaseRecord.model_validate(json.loads(self.store.get(key)))
        except (ValueError, ValidationError) as err:
            raise RunLeasedError(
                f"{self.store.where(key)} is not a lease record ({type(err).__name__}); if no process "
                f"writes run {self.run_id!r}, delete it and start again"
            ) from None

    def holder(self) -> str | None:
        """Who writes the run now, for people (`hero storage ls`); None when no process does."""
        latest = self._latest()
        return None if latest is None else self._holds(latest[1])

    def _holds(self, record: LeaseRecord) -> str | None:
        """Why `record` still holds the run (None: it can be taken)."""
        if record.released or _crashed_here(record):
            return None
        age = self.clock() - record.renewed
        if age > self.ttl_s:
            return None
        return (
            f"pid {record.pid} on {record.host} holds its lease (renewed {age:.0f} s ago; "
            f"it lapses {self.ttl_s:.0f} s after its last renewal)"
        )

    def acquire(self, wait: bool = True) -> None:
        """Take the run, or raise RunLeasedError naming the process that holds it. With `wait`, a
        holder is watched first: seen renewing, it is alive and refused (within ttl/6); not renewed
        for a whole TTL on this process's clock, it is gone and taken over (a dead worker's run is
        picked up by its replacement without a failed attempt)."""
        latest = seen = self._latest()
        watching_since = time.monotonic()
        while latest is not None and (reason := self._holds(latest[1])) is not None:
            if not wait or latest != seen:  # renewed (or taken) while watched: alive
                raise RunLeasedError(
                    f"run {self.run_id!r} is being written by another process: {reason}. Wait for it "
                    "to finish, stop it, or let its lease lapse if it is gone"
                )
            if time.monotonic() - watching_since > self.ttl_s:
                break
            if latest is seen:
                _log.warning("run %r: waiting to see whether its writer is alive: %s", self.run_id, reason)
            time.sleep(self.ttl_s / 12)
            latest = self._latest()
        # A holder taken over while it was alive but silent may have renewed between our look and our
        # create, unseen: it then writes without asking the store for ttl/2. Our writes wait that out.
        lapsed = latest is not None and not latest[1].released and not _crashed_here(latest[1])
        epoch = 0 if latest is None else latest[0] + 1
        now = self.clock()
        record = LeaseRecord(
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            process_scope=process_scope(),
            acquired=now,
            renewed=now,
        )
        self.store.create(self._key(epoch), record.model_dump_json().encode())
        # Read back whatever create said: a server that ignores If-None-Match lets the last of two
        # creators win silently, and a "taken" can be this process's own PUT, done but its answer lost
        # and the retry refused. Nothing there: S3's 409, another's create in flight that then failed.
        try:
            taken_by_another = json.loads(self.store.get(self._key(epoch)))["owner"] != self.owner
        except KeyError:
            taken_by_another = True
        if taken_by_another:
            raise RunLeasedError(
                f"run {self.run_id!r}: another process took its lease (epoch {epoch}) at the same moment"
            )
        self.epoch, self._record, self._lost = epoch, record, None
        self._renewed_at = (time.monotonic(), now)
        self._quiet_until = time.monotonic() + self.ttl_s / 2 if lapsed else 0.0
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._heartbeat.start()

    def check(self) -> None:
        """Before a write: return while this process holds the run, else raise LeaseLostError.
        Without I/O while the last renewal is younger than ttl/2; past it, confirmed on the store."""
        if self.epoch is None:
            raise LeaseLostError(f"run {self.run_id!r}: no lease is held (acquire it before writing)")
        if self._lost is None and self._elapsed() >= self.ttl_s / 2:
            self._renew()
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if (quiet := self._quiet_until - time.monotonic()) > 0:
            _log.warning(
                "run %r: its last writer's lease lapsed; its writes may go on for %.0f s more: waiting",
                self.run_id,
                quiet,
            )
            time.sleep(quiet)
            self._quiet_until = 0.0

    def _elapsed(self) -> float:
        # Both clocks: monotonic ignores wall-clock jumps, the wall clock counts a suspended machine.
        return max(time.monotonic() - self._renewed_at[0], self.clock() - self._renewed_at[1])

    def _renew(self, released: bool = False) -> None:
        with self._lock:
            if self._record is None or self._lost is not None:
                return
            latest = self._latest()
            if latest is None or latest[0] != self.epoch or latest[1].owner != self.owner:
                taker = "its record is gone" if latest is None else f"pid {latest[1].pid} on {latest[1].host}"
                self._lost = (
                    f"run {self.run_id!r}: this process's lease (epoch {self.epoch}) was taken over "
                    f"({taker}) after {self._elapsed():.0f} s without renewal; it stopped writing"
                )
                return
            now = self.clock()
            self._record = self._record.model_copy(update={"renewed": now, "released": released})
            self.store.put(self._key(self.epoch), self._record.model_dump_json().encode())
            self._renewed_at = (time.monotonic(), now)
            # a taker may have created the next epoch between our look and our put: look again, else
            # we would write unchecked for ttl/2 beside it
            if (after := self._latest()) is not None and after[0] > self.epoch:
                self._lost = (
                    f"run {self.run_id!r}: this process's lease (epoch {self.epoch}) was taken over "
                    f"(pid {after[1].pid} on {after[1].host}) as it renewed; it stopped writing"
                )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                self._renew()
            except HeroError:  # storage unreachable: retried next beat; check() refuses writes meanwhile
                continue
            if self._lost is not None:
                return

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next writer need not wait for it to lapse."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.epoch is not None:
            try:
                self._renew(released=True)
            except HeroError as err:  # not a reason to fail a run that is done or suspending
                _log.warning(
                    "run %r: its lease could not be marked released (%s); it lapses %.0f s after its "
                    "last renewal",
                    self.run_id,
                    err,
                    self.ttl_s,
                )
            finally:
                self.epoch, self._record = None, None

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


class LeasedStore:
    """An ArtifactStore whose writes go through only while `lease` is held (reads are not fenced)."""

    def __init__(self, store: ArtifactStore, lease: RunLease):
        self.store = store
        self.lease = lease

    def put(self, key: str, data: bytes) -> None:
        self.lease.check()
        self.store.put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        self.lease.check()
        return self.store.create(key, data)

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def list(self, prefix: str) -> dict[str, int]:
        return self.store.list(prefix)

    def where(self, key: str = "") -> str:
        return self.store.where(key)
