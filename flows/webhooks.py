"""The webhook receiver: Label Studio's annotation events resume the flow runs waiting for them.

    POST /webhooks/label-studio   ANNOTATION_CREATED / ANNOTATIONS_CREATED / ANNOTATION_UPDATED
    GET  /health                  liveness and counters

A request is accepted only with the shared secret in the X-Hero-Webhook-Secret header (compared in
constant time) and a body of at most max_body_bytes; rejections are logged without what was sent.
A client whose requests keep being rejected is throttled: past a burst of rejections it gets 429 (and
no log line) until its budget refills, so guessing the secret or flooding the log costs time.
Authenticated events are never throttled: Label Studio does not retry a refused delivery, and they
are cheap (they fold into one check per round).
An accepted event answers 202 at once: the rounds its tasks belong to are queued for a check, and
events for a round already queued fold into that one check, so a burst of annotations costs one
Label Studio read per round, not one per event. The check (flows/waiting.py) resumes the run only if
it is suspended for that round and the round may close; anything else is a harmless no-op.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flows.waiting import ResumeResult
from hero_ml.adapters.label_studio.client import WEBHOOK_SECRET_HEADER

log = logging.getLogger("hero.webhooks")
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})
RECHECK_DELAYS_S = (5.0, 30.0, 120.0)  # a run still Running may be about to suspend: look again
MAX_CLIENTS = 10_000  # addresses whose rejections are counted at once (RejectionBudget)


class HeroTaskMeta(BaseModel):
    """The `hero` metadata every HERO task carries (see adapters/label_studio/rounds.py)."""

    # strict: HERO writes a round as a JSON number; any Label Studio user can edit task data, and a
    # forged true or "3" must not be read as a round
    model_config = ConfigDict(strict=True)

    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    round: int = Field(ge=0)
    # a Prefect flow run id; task data is editable by any Label Studio user, and this one is logged
    flow_run_id: str | None = Field(None, pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


class EventTask(BaseModel):
    id: int | None = None
    data: dict = Field(default_factory=dict)


class AnnotationEvent(BaseModel):
    action: str
    task: EventTask | list[EventTask] | None = None


@dataclass(frozen=True)
class RoundCheck:
    flow_run_id: str
    run_id: str
    round: int


@dataclass
class Counters:
    accepted: int = 0  # events with a valid secret and body
    rejected: int = 0  # unauthenticated, oversized or malformed requests
    throttled: int = 0  # rejections answered 429 unlogged: the client was over its rejection budget
    ignored: int = 0  # accepted events about nothing HERO waits for (other actions, foreign tasks)
    queued: int = 0  # round checks queued
    folded: int = 0  # events folded into a check already queued
    checked: int = 0
    resumed: int = 0
    failed: int = 0  # checks that raised (logged; the poller covers the round)
    last_results: list[dict] = field(default_factory=list)


class RejectionBudget:
    """A token bucket per client address: `burst` rejections at once, refilled at `per_s` a second."""

    def __init__(self, burst: int, per_s: float, clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_s, self.clock = burst, per_s, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    def spend(self, client: str) -> float:
        """Take a token for `client`: 0.0 if it had one, else the seconds until it will."""
        with self._lock:
            now = self.clock()
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget(now)
            tokens, when = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.per_s)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.per_s

    def _forget(self, now: float) -> None:
        """Bound the memory: drop the buckets that have filled up again (forgetting them changes nothing),
        then, under a flood of addresses, the least recent half."""
        full_after = self.burst / self.per_s
        kept = {c: b for c, b in self._buckets.items() if now - b[1] < full_after}
        if len(kept) >= MAX_CLIENTS:
            kept = dict(sorted(kept.items(), key=lambda item: item[1][1])[len(kept) // 2 :])
        self._buckets = kept


class RoundChecks:
    """A queue of round checks run one at a time by a worker thread; a check already queued absorbs
    new events for its round. `check` is RoundResumer.resume_if_ready."""

    def __init__(
        self,
        check: Callable[[str, str, int], ResumeResult],
        counters: Counters,
        recheck_delays_s: tuple[float, ...] = RECHECK_DELAYS_S,
    ):
        self.check = check
        self.counters = counters
        self.recheck_delays_s = recheck_delays_s
        self._pending: dict[RoundCheck, float] = {}  # check -> not before (monotonic seconds)
        self._attempts: dict[RoundCheck, int] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # a check is running
        self._thread = threading.Thread(target=self._work, name="hero-round-checks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, item: RoundCheck, delay_s: float = 0.0) -> None:
        with self._cond:
            if item in self._pending:
                self.counters.folded += 1
                return
            self._pending[item] = time.monotonic() + delay_s
            self.counters.queued += 1
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    def _next(self) -> RoundCheck | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                due = [item for item, at in self._pending.items() if at <= now]
                if due:
                    del self._pending[due[0]]
                    self._busy = True
                    return due[0]
                wait = min(self._pending.values(), default=now + 60) - now
                self._cond.wait(timeout=max(wait, 0.01))
            return None

    def _work(self) -> None:
        while (item := self._next()) is not None:
            try:
                result = self.check(item.flow_run_id, item.run_id, item.round)
            except Exception:  # a bug or an outage must not stop the receiver
                self.counters.failed += 1
                log.exception("checking round %d of run %s failed", item.round, item.run_id)
                result = None
            with self._cond:
                self._busy = False
                self.counters.checked += 1
            if result is None:
                continue
            self.counters.resumed += result.resumed
            self.counters.last_results = [*self.counters.last_results[-19:], result.__dict__]
            log.info(
                "run %s round %d (flow run %s): %s%s",
                item.run_id,
                item.round,
                item.flow_run_id,
                "resumed, " if result.resumed else "",
                result.reason,
            )
            attempt = self._attempts.pop(item, 0)
            if result.reason.startswith("not waiting (state Running") and attempt < len(
                self.recheck_delays_s
            ):
                self._attempts[item] = attempt + 1  # the last event may beat the flow's suspension
                self.submit(item, self.recheck_delays_s[attempt])


def rounds_of(event: AnnotationEvent) -> set[RoundCheck]:
    """The (flow run, run, round) triples an event's tasks belong to; foreign tasks give none."""
    tasks = event.task if isinstance(event.task, list) else [event.task] if event.task else []
    found = set()
    for task in tasks:
        try:
            meta = HeroTaskMeta.model_validate(task.data.get("hero"))
        except ValidationError:
            continue
        if meta.flow_run_id:
            found.add(RoundCheck(meta.flow_run_id, meta.run_id, meta.round))
    return found


def create_app(
    check: Callable[[str, str, int], ResumeResult],
    secret: SecretStr,
    max_body_bytes: int = 1 << 20,
    recheck_delays_s: tuple[float, ...] = RECHECK_DELAYS_S,
    rejection_burst: int = 20,
    rejections_per_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The receiver; `check` resumes a run if its round may close (RoundResumer.resume_if_ready).
    A client may have `rejection_burst` requests rejected at once, then one every 1/rejections_per_s
    seconds of `clock`; past that its rejected requests are answered 429."""
    counters = Counters()
    checks = RoundChecks(check, counters, recheck_delays_s)
    budget = RejectionBudget(rejection_burst, rejections_per_s, clock)
    expected = secret.get_secret_value().encode()

    def reject(request: Request, status: int, why: str) -> JSONResponse:
        client = request.client.host if request.client else "?"
        wait_s = budget.spend(client)
        if wait_s > 0:
            counters.throttled += 1
            return JSONResponse(
                {"error": "too many rejected requests"},
                status_code=429,
                headers={"Retry-After": str(math.ceil(wait_s))},
            )
        counters.rejected += 1
        log.warning("rejected webhook request from %s: %s", client, why)
        return JSONResponse({"error": why}, status_code=status)

    async def label_studio(request: Request) -> JSONResponse:
        given = request.headers.get(WEBHOOK_SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            return reject(request, 401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return reject(request, 413, f"body over {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return reject(request, 413, f"body over {max_body_bytes} bytes")
        try:
            event = AnnotationEvent.model_validate(json.loads(body))
        except (ValueError, ValidationError, RecursionError) as err:  # RecursionError: JSON nested deep
            return reject(request, 400, f"not a Label Studio event: {str(err).splitlines()[0]}")
        counters.accepted += 1
        found = rounds_of(event) if event.action in ANNOTATION_ACTIONS else set()
        if not found:
            counters.ignored += 1
            return JSONResponse({"queued": 0}, status_code=202)
        for item in found:
            checks.submit(item)
        return JSONResponse({"queued": len(found)}, status_code=202)

    async def health(request: Request) -> JSONResponse:
        # the counts for anyone (a load balancer's probe); the last results' reasons, which name
        # buckets, servers and runs, only for a caller with the shared secret
        state = {"ok": True, "idle": checks.idle(), **counters.__dict__}
        if not hmac.compare_digest(request.headers.get(WEBHOOK_SECRET_HEADER, "").encode(), expected):
            del state["last_results"]
        return JSONResponse(state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        checks.start()
        yield
        checks.stop()

    return Starlette(
        routes=[
            Route("/webhooks/label-studio", label_studio, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
