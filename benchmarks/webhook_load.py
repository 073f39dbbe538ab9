"""The webhook receiver under a burst of annotation events: many annotators at once, on loopback.

The real receiver (flows/webhooks.py) serves over HTTP (uvicorn) while `--clients` threads post
`--events` annotation events spread over `--rounds` waiting rounds, in random order, each event posted
after its annotation is counted (as Label Studio sends it after saving). The check the receiver calls
stands in for RoundResumer with Prefect's semantics: a round is resumed when all its annotations exist,
and a second resume of a round is refused. A probe thread asks GET /health every 50 ms throughout, to
see that the receiver stays responsive. Recorded: events/s, the latency of posts (p50, p99, max) and of
health checks, the checks run (events fold into one per round), rounds resumed, rounds left waiting.

    python benchmarks/webhook_load.py                  # 10 clients, 5,000 events, 50 rounds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import uvicorn
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from results_io import write_result

from flows.waiting import ResumeResult
from flows.webhooks import create_app
from hero_ml.adapters.label_studio.client import WEBHOOK_SECRET_HEADER

SECRET = "load-test-secret-0123456789abcdef"


class WaitingRounds:
    """Suspended runs as Prefect and Label Studio would report them: round r may close once all its
    annotations exist; it is resumed once, and a second resume is refused (Prefect: not paused)."""

    def __init__(self, per_round: dict[int, int], check_s: float):
        self.per_round = per_round
        self.check_s = check_s
        self.annotations: Counter[int] = Counter()
        self.resumed: Counter[int] = Counter()
        self.refused = 0
        self.checks = 0
        self.lock = threading.Lock()

    def annotate(self, round_index: int) -> None:
        with self.lock:
            self.annotations[round_index] += 1

    def check(self, flow_run_id: str, run_id: str, round_index: int) -> ResumeResult:
        time.sleep(self.check_s)  # reading the round's tasks from Label Studio
        with self.lock:
            self.checks += 1
            if self.resumed[round_index]:
                self.refused += 1
                return ResumeResult(flow_run_id, run_id, round_index, False, "not paused")
            if self.annotations[round_index] < self.per_round[round_index]:
                return ResumeResult(flow_run_id, run_id, round_index, False, "waiting for labels")
            self.resumed[round_index] += 1
            return ResumeResult(flow_run_id, run_id, round_index, True, "ready")


def meta(round_index: int) -> dict[str, Any]:
    return {
        "run_id": "load",
        "round": round_index,
        "kind": "image",
        "flow_run_id": f"00000000-0000-4000-8000-{round_index:012d}",
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(events: int, clients: int, rounds: int, check_s: float = 0.02, seed: int = 0) -> dict[str, Any]:
    """Serve the receiver, post the burst, wait until it is idle; the figures."""
    rng = random.Random(seed)
    order = [k % rounds for k in range(events)]
    rng.shuffle(order)
    waiting = WaitingRounds(Counter(order), check_s)
    app = create_app(waiting.check, SecretStr(SECRET), recheck_delays_s=(0.5, 2.0))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    post_seconds: list[float] = []
    health_seconds: list[float] = []
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def probe_health() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.perf_counter()
                session.get(f"{url}/health", timeout=30)
                health_seconds.append(time.perf_counter() - started)
                time.sleep(0.05)

    def client(share: list[int]) -> None:
        with requests.Session() as session:
            for round_index in share:
                event = {
                    "action": "ANNOTATION_CREATED",
                    "annotation": {"id": 1, "result": []},
                    "task": {"id": 1, "data": {"hero": meta(round_index)}},
                }
                waiting.annotate(round_index)  # saved in Label Studio, then the webhook fires
                started = time.perf_counter()
                answer = session.post(
                    f"{url}/webhooks/label-studio",
                    data=json.dumps(event),
                    headers={WEBHOOK_SECRET_HEADER: SECRET, "Content-Type": "application/json"},
                    timeout=30,
                )
                post_seconds.append(time.perf_counter() - started)
                statuses[answer.status_code] += 1

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [order[i::clients] for i in range(clients)]))
    posted = time.perf_counter() - started
    deadline = time.monotonic() + 60
    while not requests.get(f"{url}/health", timeout=30).json()["idle"] and time.monotonic() < deadline:
        time.sleep(0.05)
    settled = time.perf_counter() - started
    stop.set()
    prober.join()
    health = requests.get(f"{url}/health", timeout=30).json()
    server.should_exit = True
    thread.join(timeout=20)
    return {
        "events": events,
        "clients": clients,
        "rounds": rounds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "posting_s": round(posted, 3),
        "settled_s": round(settled, 3),
        "events_per_s": round(events / posted, 1),
        "post_latency_ms": {
            "p50": round(1000 * statistics.median(post_seconds), 2),
            "p99": round(1000 * percentile(post_seconds, 0.99), 2),
            "max": round(1000 * max(post_seconds), 2),
        },
        "health_latency_ms": {
            "probes": len(health_seconds),
            "p99": round(1000 * percentile(health_seconds, 0.99), 2),
            "max": round(1000 * max(health_seconds), 2),
        },
        "checks": waiting.checks,
        "folded": health["folded"],
        "rounds_resumed": sum(1 for r in range(rounds) if waiting.resumed[r] == 1),
        "rounds_resumed_twice": sum(1 for r in range(rounds) if waiting.resumed[r] > 1),
        "rounds_left_waiting": sum(1 for r in range(rounds) if waiting.resumed[r] == 0),
        "second_resumes_refused": waiting.refused,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--check-ms", type=float, default=20.0, help="the time a check takes")
    args = parser.parse_args()
    figures = run_load(args.events, args.clients, args.rounds, args.check_ms / 1000)
    print(json.dumps(figures, indent=1))
    post, health = figures["post_latency_ms"], figures["health_latency_ms"]
    table = "\n".join(
        [
            f"### Webhook receiver under load ({args.clients} clients, {args.events} events, "
            f"{args.rounds} waiting rounds, loopback)",
            "",
            "| events/s | post p50 ms | post p99 ms | post max ms | /health p99 ms | checks run | "
            "rounds resumed | resumed twice | left waiting | responses |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {figures['events_per_s']} | {post['p50']} | {post['p99']} | {post['max']} "
            f"| {health['p99']} | {figures['checks']} | {figures['rounds_resumed']}/{args.rounds} "
            f"| {figures['rounds_resumed_twice']} | {figures['rounds_left_waiting']} "
            f"| {figures['statuses']} |",
            "",
            "Events for a round already queued fold into its check "
            f"({figures['folded']} folded), so {args.events} events cost {figures['checks']} checks. The "
            f"check stands in for RoundResumer with Prefect's semantics and takes {args.check_ms} ms "
            "(a Label Studio read): a round resumes when all its annotations exist, a second resume is "
            "refused. The receiver runs on the same 2 cores as the clients.",
        ]
    )
    write_result("webhook_load", figures, table)


if __name__ == "__main__":
    main()
