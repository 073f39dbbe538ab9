"""The webhook receiver over real HTTP on loopback (uvicorn): who it lets in, what it refuses, and how
a burst of annotation events folds into one check per round. The check it calls is recorded here;
what a check does against Prefect and Label Studio is the end-to-end test's (test_orchestration.py)."""

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from flows.training import deployed_run_id, pause_key, round_of_pause_key
from flows.waiting import ResumeResult
from flows.webhooks import RejectionBudget, create_app
from hero_ml.config import ConfigError
from tests.conftest import serve

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import webhook_load

SECRET = "s3cr3t-webhook-value"
FLOW = "0f4c2a6e-1d3b-4b8e-9a57-2c1e8d6f4b30"  # a flow run id, as Prefect makes them
HEADER = "X-Hero-Webhook-Secret"


class Recorder:
    """A check that records its calls; `answer` decides each result."""

    def __init__(
        self,
        answer: Callable[[int], ResumeResult] | None = None,
        pause_s: float = 0.0,
        gate: threading.Event | None = None,
    ):
        self.calls: list[tuple[str, str, int]] = []
        self.answer = answer
        self.pause_s = pause_s
        self.gate = gate  # a check waits until it is set
        self.lock = threading.Lock()

    def __call__(self, flow_run_id: str, run_id: str, round_index: int) -> ResumeResult:
        time.sleep(self.pause_s)
        if self.gate is not None:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
        with self.lock:
            self.calls.append((flow_run_id, run_id, round_index))
            count = len(self.calls)
        if self.answer is not None:
            return self.answer(count)
        return ResumeResult(flow_run_id, run_id, round_index, False, "waiting for 1/8 labels")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(pause_s=0.2)


@pytest.fixture
def receiver(recorder: Recorder) -> Iterator[str]:
    yield from serve(create_app(recorder, SecretStr(SECRET), max_body_bytes=64 * 1024))


def event(round_index: int = 0, action: str = "ANNOTATION_CREATED", **hero: Any) -> dict[str, Any]:
    meta = {"run_id": "run-a", "round": round_index, "kind": "image", "flow_run_id": FLOW, **hero}
    return {
        "action": action,
        "annotation": {"id": 7, "result": []},
        "task": {"id": 3, "data": {"image": "s3://b/k.png", "hero": meta}},
        "project": {"id": 1},
    }


def post(url: str, body: Any, secret: str | None = SECRET, raw: bytes | None = None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[HEADER] = secret
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{url}/webhooks/label-studio", data=data, headers=headers, timeout=10)


def health(url: str, secret: str | None = None) -> dict[str, Any]:
    headers = {HEADER: secret} if secret is not None else {}
    return requests.get(f"{url}/health", headers=headers, timeout=10).json()


def settle(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while not (state := health(url))["idle"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_requests_without_the_secret_are_refused_and_logged_without_it(
    receiver: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hero.webhooks")
    assert post(receiver, event(), secret=None).status_code == 401
    wrong = post(receiver, event(), secret=SECRET[:-1] + "X")
    assert wrong.status_code == 401 and SECRET not in wrong.text
    assert post(receiver, event(), secret=SECRET + "-longer").status_code == 401
    assert health(receiver)["rejected"] == 3 and recorder.calls == []
    assert len([r for r in caplog.records if "rejected webhook request" in r.getMessage()]) == 3
    assert all(SECRET not in r.getMessage() and "X-Hero" in r.getMessage() for r in caplog.records)


def test_oversized_malformed_and_foreign_events_do_nothing(receiver: str, recorder: Recorder) -> None:
    big = event()
    big["task"]["data"]["padding"] = "x" * 70_000
    assert post(receiver, big).status_code == 413
    assert post(receiver, None, raw=b"{not json").status_code == 400
    assert post(receiver, {"task": {}}).status_code == 400  # no action
    assert post(receiver, {"action": "ANNOTATION_CREATED", "task": "a string"}).status_code == 400
    assert post(receiver, None, raw=b"[" * 20_000 + b"]" * 20_000).status_code == 400  # nested too deep
    # accepted, but about nothing HERO waits for: another action, a task without hero metadata,
    # metadata naming no flow run, a broken run id
    assert post(receiver, event(action="PROJECT_UPDATED")).json() == {"queued": 0}
    foreign = event()
    del foreign["task"]["data"]["hero"]
    assert post(receiver, foreign).json() == {"queued": 0}
    assert post(receiver, event(flow_run_id=None)).json() == {"queued": 0}
    assert post(receiver, event(run_id="../etc")).json() == {"queued": 0}
    # any Label Studio user can edit task data: a flow run id that is none (it would be logged) is refused
    assert post(receiver, event(flow_run_id=FLOW + "\nWARNING forged line")).json() == {"queued": 0}
    state = settle(receiver)
    assert (state["rejected"], state["accepted"], state["ignored"]) == (5, 5, 5)
    assert recorder.calls == []


def test_a_burst_of_events_folds_into_one_check_per_round() -> None:
    gate = threading.Event()  # the first check holds until every event has been answered
    recorder = Recorder(gate=gate)
    server = serve(create_app(recorder, SecretStr(SECRET), max_body_bytes=64 * 1024))
    receiver = next(server)
    try:
        bodies = [event(round_index=n % 2) for n in range(200)]
        bulk = event(round_index=1, action="ANNOTATIONS_CREATED")
        bulk["task"] = [bulk["task"], {**bulk["task"], "id": 4}]  # the bulk form: a list of tasks
        bodies.append(bulk)
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda body: post(receiver, body).status_code, bodies))
        assert statuses == [202] * len(bodies)
        gate.set()
        state = settle(receiver)
    finally:
        gate.set()
        server.close()
    assert state["accepted"] == len(bodies) and state["queued"] + state["folded"] == len(bodies)
    assert {call[2] for call in recorder.calls} == {0, 1}
    # one check per round, and once more for the round whose check was running as events arrived
    assert len(recorder.calls) == state["checked"] in (2, 3)


def test_a_run_not_suspended_yet_is_checked_again() -> None:
    """The last annotation may arrive before the flow run has suspended: look again a little later."""

    def answer(count: int) -> ResumeResult:
        if count == 1:
            return ResumeResult(FLOW, "run-a", 0, False, "not waiting (state Running)")
        return ResumeResult(FLOW, "run-a", 0, True, "complete")

    recorder = Recorder(answer)
    for url in serve(create_app(recorder, SecretStr(SECRET), recheck_delays_s=(0.3,))):
        assert post(url, event()).status_code == 202
        deadline = time.monotonic() + 20
        while health(url)["resumed"] == 0:
            assert time.monotonic() < deadline, health(url)
            time.sleep(0.05)
        state = settle(url)
        assert (state["checked"], state["resumed"]) == (2, 1) and "last_results" not in state
        assert health(url, SECRET)["last_results"][-1]["reason"] == "complete"  # for the secret's holder
        assert "last_results" not in health(url, "a wrong secret")


def test_pause_keys_name_their_round_and_flow_runs_their_hero_run() -> None:
    key = pause_key(12)
    assert key.startswith("hero-round-12-") and key != pause_key(12)  # a fresh key each suspension
    assert round_of_pause_key(key) == 12
    assert round_of_pause_key("1") is None and round_of_pause_key(None) is None
    assert round_of_pause_key("hero-round-x-1") is None
    assert deployed_run_id({"run_id": "a", "config": {"run_id": "b"}}, "flow-run") == "a"
    assert deployed_run_id({"run_id": None, "config": {"run_id": "b"}}, "flow-run") == "b"
    assert deployed_run_id({"run_id": None, "config": {}}, "flow-run") == "flow-run"
    assert deployed_run_id({"config": None}, "flow-run") == "flow-run"
    # `--param run_id=2026` reaches the flow as a number: refused, not a new run named after the flow run
    for parameters, where in (({"run_id": 2026}, "run_id"), ({"config": {"run_id": 1e3}}, "config.run_id")):
        with pytest.raises(ConfigError, match=rf"parameter {where}: a run id is text, got the (int|float)"):
            deployed_run_id(parameters, "flow-run")


def test_a_client_whose_requests_keep_failing_is_throttled_but_its_events_are_not() -> None:
    recorder = Recorder()
    now = [100.0]  # the budget's clock, moved by hand: the requests' own pace does not count
    app = create_app(
        recorder, SecretStr(SECRET), rejection_burst=5, rejections_per_s=0.2, clock=lambda: now[0]
    )
    for url in serve(app):
        answers = [post(url, event(), secret="guess-" + str(n)).status_code for n in range(8)]
        assert answers == [401] * 5 + [429] * 3
        now[0] += 1.5
        throttled = post(url, event(), secret="one-more")
        assert throttled.headers["Retry-After"] == "4"  # one token back 5 s after the last, at 0.2/s
        assert post(url, event()).status_code == 202  # an authenticated event still gets through
        now[0] += 4  # past the 3.5 s the 429 named
        assert post(url, event(), secret="after-the-wait").status_code == 401  # a token is back
        state = settle(url)
        assert (state["rejected"], state["throttled"], state["accepted"]) == (6, 4, 1)
        assert recorder.calls == [(FLOW, "run-a", 0)]


def test_a_rejection_budget_refills_with_time() -> None:
    now = [0.0]
    budget = RejectionBudget(burst=2, per_s=0.5, clock=lambda: now[0])
    assert [budget.spend("a"), budget.spend("a")] == [0.0, 0.0]
    assert budget.spend("a") == 2.0  # empty: one token in 1 / 0.5 s
    assert budget.spend("b") == 0.0  # clients are apart
    now[0] = 1.0
    assert budget.spend("a") == 1.0  # half a token back
    now[0] = 3.0
    assert budget.spend("a") == 0.0
    now[0] = 100.0
    assert [budget.spend("a") for _ in range(3)] == [0.0, 0.0, 2.0]  # never more than the burst


def test_a_rejection_budget_holds_a_bounded_number_of_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flows.webhooks.MAX_CLIENTS", 4)
    now = [0.0]
    budget = RejectionBudget(burst=2, per_s=0.5, clock=lambda: now[0])  # a bucket refills in 4 s
    for client in "abc":
        assert [budget.spend(client), budget.spend(client)] == [0.0, 0.0]  # each bucket emptied
    now[0] = 5.0  # a, b and c full again
    budget.spend("d")
    assert budget.spend("e") == 0.0 and sorted(budget._buckets) == ["d", "e"]  # the full ones forgotten
    now[0] = 5.5
    assert [budget.spend("a"), budget.spend("a"), budget.spend("a")] == [0.0, 0.0, 2.0]  # as if kept
    now[0] = 6.0
    budget.spend("f")
    assert sorted(budget._buckets) == ["a", "d", "e", "f"]
    now[0] = 7.0  # a flood of recent clients, none full again: the least recent half goes (d, e)
    budget.spend("g")
    assert sorted(budget._buckets) == ["a", "f", "g"]


def burst(events: int) -> dict[str, Any]:
    """The load benchmark's burst from 10 clients over 20 waiting rounds; its figures."""
    return webhook_load.run_load(events, clients=10, rounds=20)


def check_burst(figures: dict[str, Any], events: int) -> None:
    assert figures["statuses"] == {"202": events}  # every event accepted
    assert figures["rounds_left_waiting"] == 0 and figures["rounds_resumed"] == 20  # none lost
    assert figures["rounds_resumed_twice"] == 0
    assert figures["checks"] < events  # events folded into queued checks
    assert figures["health_latency_ms"]["probes"] > 0  # it answered health checks throughout


def test_a_burst_of_a_thousand_events_from_ten_clients_resumes_every_round() -> None:
    figures = burst(1000)
    assert figures["events"] == 1000
    check_burst(figures, 1000)


@pytest.mark.long
def test_a_burst_of_five_thousand_events_from_ten_clients_resumes_every_round() -> None:
    figures = burst(5000)
    assert figures["events"] == 5000
    check_burst(figures, 5000)


def suspended_for_round_0(run_id: Any, tmp_path: Path) -> tuple[str, Any]:
    """A hero-training flow run of `run_id` suspended for its round 0 on the Prefect server, and a
    resumer over an empty store: (flow run id, resumer)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Suspended

    from flows.training import hero_training
    from flows.waiting import RoundResumer
    from hero_ml.adapters.storage import LocalStore
    from hero_ml.config import HeroConfig

    with get_client(sync_client=True) as client:
        waiting = client.create_flow_run(hero_training, parameters={"run_id": run_id})
        client.set_flow_run_state(
            waiting.id, Suspended(pause_key=pause_key(0), timeout_seconds=3600), force=True
        )
    config = HeroConfig(storage={"local_root": str(tmp_path)}, label_studio={"api_key": "unused-here"})
    return str(waiting.id), RoundResumer(config, LocalStore(tmp_path))


def test_a_suspended_run_that_cannot_be_checked_is_reported_and_the_poll_goes_on(tmp_path: Path) -> None:
    # a flow run's parameters are outside input: a run id no store accepts must not end the poll
    flow_run_id, resumer = suspended_for_round_0("../other-team/run", tmp_path)
    numbered, _ = suspended_for_round_0(2026, tmp_path)  # an older release took --param run_id=2026
    results = resumer.poll()
    (refused,) = [r for r in results if r.flow_run_id == numbered]
    assert refused.run_id is None and "a run id is text, got the int 2026" in refused.reason
    mine = [r for r in results if r.flow_run_id == flow_run_id]
    assert len(mine) == 1 and not mine[0].resumed and mine[0].round == 0
    assert mine[0].run_id == "../other-team/run"
    assert mine[0].reason.startswith("cannot check round 0:") and "other-team" in mine[0].reason


def test_the_poller_pages_through_the_suspended_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the server answers a page of flow runs a request: runs beyond it must be polled too
    import flows.waiting

    first, resumer = suspended_for_round_0("paged-a", tmp_path)
    second, _ = suspended_for_round_0("paged-b", tmp_path)
    everyone = [(str(run.id), run.parameters.get("run_id")) for run in resumer.suspended_runs()]
    monkeypatch.setattr(flows.waiting, "SUSPENDED_PAGE", 1)  # a page of one: as many pages as runs
    paged = [(str(run.id), run.parameters.get("run_id")) for run in resumer.suspended_runs()]
    assert sorted(paged) == sorted(everyone) and len(paged) == len(set(paged))
    assert {(first, "paged-a"), (second, "paged-b")} <= set(paged)


def test_a_run_whose_published_record_is_damaged_is_named_and_the_poll_goes_on(tmp_path: Path) -> None:
    from hero_ml.config import HeroConfig
    from hero_ml.run_store import RunStore

    flow_run_id, resumer = suspended_for_round_0("damaged", tmp_path)
    runs = RunStore(resumer.store, "damaged")
    runs.save_config(HeroConfig(run_id="damaged").to_public_dict())
    key = f"{runs.round_prefix(0)}/published.json"
    for content in (b"{not json", b'{"project_id": 1, "flow_run_id": null, "tasks": 3}'):
        resumer.store.put(key, content)
        mine = [r for r in resumer.poll() if r.flow_run_id == flow_run_id]
        assert len(mine) == 1 and not mine[0].resumed, mine
        assert mine[0].reason.startswith("cannot check round 0:") and key in mine[0].reason
        assert "is not a readable record (edited or damaged)" in mine[0].reason


def test_an_event_naming_another_run_than_the_flow_run_trains_resumes_nothing(tmp_path: Path) -> None:
    # task data can be edited in Label Studio: the event's run must be the one its flow run trains
    flow_run_id, resumer = suspended_for_round_0("run-a", tmp_path)
    result = resumer.resume_if_ready(flow_run_id, "run-b", 0)
    assert not result.resumed and result.reason == "the flow run trains run 'run-a', not 'run-b'"


def test_a_check_resumes_only_the_pause_it_looked_at(tmp_path: Path) -> None:
    # a check reads Label Studio for a while: another trigger may resume the run meanwhile, and the run
    # may then wait for its next round, which this check's evidence is not about
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Paused

    from flows.waiting import resume_pause

    flow_run_id, _ = suspended_for_round_0("raced", tmp_path)
    run = UUID(flow_run_id)

    def waiting() -> tuple[str | None, str | None]:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run).state
        assert state is not None
        return state.name, state.state_details.pause_key

    _, looked_at = waiting()
    # a suspended run of no deployment cannot be rescheduled: Prefect's refusal is no resume
    refused = resume_pause(run, looked_at)
    assert (
        refused
        == "Prefect did not resume it (REJECT: Cannot reschedule a resuming flow run without a deployment.)"
    )
    # resumed by another trigger, learned, paused again (in process: Prefect resumes it without a deployment)
    next_round = pause_key(1)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run, Paused(pause_key=next_round, timeout_seconds=3600), force=True)
    assert resume_pause(run, looked_at) == "resumed already; it now waits for round 1"
    assert waiting() == ("Paused", next_round)
    assert resume_pause(run, next_round) is None
    assert waiting()[0] == "Running"
    assert resume_pause(run, next_round) == "resumed already"
