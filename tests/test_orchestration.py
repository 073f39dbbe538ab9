"""Production orchestration end to end: a Prefect server, a process worker, Label Studio, S3 and MLflow
servers on loopback, the webhook receiver. A deployment trains two rounds of the toy model; each round
suspends (no process waits) until two annotators, one slow, have labelled it through Label Studio's API;
Label Studio's webhook resumes the run; the run ends with its LoRA registered, every object in S3, and
the stored feedback equal to what the annotators submitted."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from label_studio_sdk import LabelStudio
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed

from flows.deploy import base_job_template, ensure_pool
from flows.training import round_of_pause_key
from hero_ml.adapters.storage import LocalStore, open_store
from hero_ml.config import HeroConfig, with_overrides
from hero_ml.feedback import KEEP
from hero_ml.run_store import RunStore
from hero_ml.training import TrainingRun
from tests.conftest import (
    LabelStudioServer,
    Service,
    _free_port,
    _infra,
    create_annotator,
    s3_storage,
    tiny_run,
)

pytestmark = pytest.mark.timeout(900)


@dataclass
class Stack:
    env: dict[str, str]
    config: HeroConfig  # what the worker resolves (file + environment)
    webhook_url: str
    logs: Path
    gpu_pool: str
    secrets: dict[str, str]  # environment variable -> value, each distinctive so a leak is findable

    def start_worker(self) -> None:
        _infra("prefect-worker.sh", "start", self.env, self.gpu_pool)

    def kill_worker(self, flow_run_id: Any) -> None:
        """SIGKILL the worker's process group and the flow run's processes: the machine's crash. Prefect
        starts a flow run in a session of its own, which outlives its worker's group (OPERATIONS)."""
        pid = int((self.logs / f"worker-{self.gpu_pool}.pid").read_text())
        flow_run = flow_run_processes(flow_run_id)
        assert flow_run, f"no process of flow run {flow_run_id}: killing the worker alone proves less"
        os.killpg(pid, signal.SIGKILL)
        for process in flow_run:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(map(_alive, [pid, *flow_run])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, [pid, *flow_run]))

    def hero(self, *args: str) -> str:
        result = subprocess.run(
            ["hero", *args],
            env={**self.env, "COLUMNS": "250"},  # rich tables unwrapped
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"hero {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            for path in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def stack(
    prefect_server: Service,
    label_studio_server: LabelStudioServer,
    s3_server: Service,
    mlflow_server: Service,
    tmp_path: Path,
) -> Iterator[Stack]:
    """Deployments on fresh work pools, a worker and the webhook receiver, all set up as
    docs/OPERATIONS.md says: public settings in HERO_CONFIG_FILE, secrets in the environment."""
    tag = uuid.uuid4().hex[:6]
    webhook_port, worker_port = _free_port(), _free_port()
    settings = {
        **tiny_run(images=4),
        "feedback": {"budget": 16, "annotators_per_image": 2},
        "simulation": {"eval_images": 0},
        "promotion": {"eval_images": 16},
        "storage": s3_storage(s3_server, f"e2e-{tag}/", local_root=str(tmp_path / "local")),
        "tracking": {"tracking_uri": mlflow_server.url, "registered_model": f"hero-e2e-{tag}"},
        "label_studio": {"enabled": True, "url": label_studio_server.url},
        "orchestration": {
            "webhook_url": f"http://127.0.0.1:{webhook_port}/webhooks/label-studio",
            "poll_interval_s": 600,  # the webhook must do the resuming here
        },
    }
    config_file = tmp_path / "worker.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    secrets = {
        "HERO_STORAGE__S3_ACCESS_KEY_ID": f"s3-key-id-{tag}",  # the test S3 server takes any key
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": f"s3-secret-key-{tag}",
        "HERO_LABEL_STUDIO__API_KEY": label_studio_server.admin_token,
        "HERO_ORCHESTRATION__WEBHOOK_SECRET": f"webhook-secret-{tag}",
    }
    logs = tmp_path / "infra"
    env = {
        **prefect_server.env,
        **secrets,
        "HERO_CONFIG_FILE": str(config_file),
        "HERO_INFRA_STATE": str(logs),
        "HERO_WEBHOOK_PORT": str(webhook_port),
        "HERO_WORKER_PORT": str(worker_port),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # as production workers often run: a resumed round must run again, not return its stored result
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }
    config = HeroConfig(
        **{
            **settings,
            "storage": {
                **settings["storage"],
                "s3_access_key_id": secrets["HERO_STORAGE__S3_ACCESS_KEY_ID"],
                "s3_secret_access_key": secrets["HERO_STORAGE__S3_SECRET_ACCESS_KEY"],
            },
            "label_studio": {**settings["label_studio"], "api_key": label_studio_server.admin_token},
            "orchestration": {
                **settings["orchestration"],
                "webhook_secret": secrets["HERO_ORCHESTRATION__WEBHOOK_SECRET"],
            },
        }
    )
    stack = Stack(env, config, str(settings["orchestration"]["webhook_url"]), logs, f"e2e-gpu-{tag}", secrets)
    deployed = stack.hero("deploy", "--gpu-pool", stack.gpu_pool, "--service-pool", f"e2e-services-{tag}")
    # the next steps this stack takes, and not Prefect's advice to serve instead of deploying
    said = " ".join(deployed.split())
    assert f"infra/prefect-worker.sh start {stack.gpu_pool}" in said and "Looks like" not in said
    _infra("webhook-receiver.sh", "start", env)
    stack.start_worker()
    try:
        yield stack
    finally:
        _infra("prefect-worker.sh", "stop", env, stack.gpu_pool)
        _infra("webhook-receiver.sh", "stop", env)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead
    except (ProcessLookupError, FileNotFoundError):  # gone, or reaped since the signal
        return False


def flow_run_processes(flow_run_id: Any) -> list[int]:
    """The processes running a flow run: Prefect gives each the run's id in PREFECT__FLOW_RUN_ID."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def wait_for(what: str, condition: Callable[[], Any], stack: Stack, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{stack.log_tails()}")


def read_flow_run(flow_run_id: Any) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def waiting_round(flow_run_id: Any) -> int | None:
    state = read_flow_run(flow_run_id).state
    if state is None or state.name != "Suspended":
        return None
    return round_of_pause_key(state.state_details.pause_key)


def choice(control: str, value: str) -> list[dict[str, Any]]:
    return [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def round_tasks(admin: LabelStudio, project_id: int, round_index: int) -> dict[str, int]:
    """Task ids of a round by image id, and the best task as 'best'."""
    found = {}
    for task in admin.tasks.list(project=project_id, fields="all"):
        hero = task.data["hero"]
        if hero["round"] == round_index:
            found[hero.get("image_id", "best") if hero["kind"] == "image" else "best"] = task.id
    return found


# what each annotator answers, by image position, and their best pick (round 1 keeps the current best)
ANSWERS = {
    0: {"fast": (["good", "good", "bad", "bad"], 0), "slow": (["good", "bad", "bad", "good"], 0)},
    1: {"fast": (["bad", "bad", "bad", "bad"], KEEP), "slow": (["bad", "good", "bad", "bad"], KEEP)},
}


class Team:
    """Two annotators with their own Label Studio accounts, labelling as the web page does."""

    def __init__(self, server: LabelStudioServer, runs: RunStore):
        self.runs = runs
        self.admin = LabelStudio(base_url=server.url, api_key=server.admin_token)
        tag = uuid.uuid4().hex[:6]
        self.people = {
            name: LabelStudio(
                base_url=server.url,
                api_key=create_annotator(server, f"{name}-{tag}@hero.local", f"{name}-password-123"),
            )
            for name in ("fast", "slow")
        }
        self.ids = {name: str(client.users.whoami().id) for name, client in self.people.items()}

    def project_id(self) -> int:
        return int(
            json.loads(self.runs.store.get(f"{self.runs.round_prefix(0)}/published.json"))["project_id"]
        )

    def label(self, name: str, round_index: int) -> None:
        tasks = round_tasks(self.admin, self.project_id(), round_index)
        image_ids = self.runs.load_manifest(round_index)["image_ids"]
        labels, best = ANSWERS[round_index][name]
        for image_id, label in zip(image_ids, labels, strict=True):
            self.people[name].annotations.create(
                id=tasks[image_id], result=choice("label", label), was_cancelled=False
            )
        pick = best if best == KEEP else image_ids[best]
        self.people[name].annotations.create(
            id=tasks["best"], result=choice("best", pick), was_cancelled=False
        )

    def check_stored_feedback(self) -> None:
        """One set of tasks per round in Label Studio; the stored labels are what each person gave."""
        assert len(list(self.admin.tasks.list(project=self.project_id()))) == 2 * (4 + 1)
        for round_index, given in ANSWERS.items():
            image_ids = self.runs.load_manifest(round_index)["image_ids"]
            stored = json.loads(self.runs.store.get(f"{self.runs.round_prefix(round_index)}/feedback.json"))
            by_annotator = {item["annotator"]: item for item in stored["annotators"]}
            assert set(by_annotator) == set(self.ids.values())
            for name, (labels, best) in given.items():
                mine = by_annotator[self.ids[name]]
                assert {i["image_id"]: i["label"] for i in mine["images"]} == dict(
                    zip(image_ids, labels, strict=True)
                )
                assert mine["keep_best"] == (best == KEEP)
        round0 = json.loads(self.runs.store.get(f"{self.runs.round_prefix(0)}/feedback.json"))["aggregate"]
        assert round0["good"] == [True, False, False, False] and round0["best"] == 0  # a tie is bad


def health(stack: Stack) -> dict[str, Any]:
    return requests.get(
        stack.webhook_url.removesuffix("/webhooks/label-studio") + "/health", timeout=10
    ).json()


def check_run_committed(runs: RunStore) -> None:
    """Every object in S3 as recorded, each round committed and learned once."""
    report = runs.verify()
    assert report.ok and not report.incomplete, report
    listing = runs.list_rounds()
    assert [(r.round, r.committed, r.checkpoint) for r in listing] == [(0, True, True), (1, True, True)]
    assert json.loads(runs.store.get(f"{runs.prefix}/progress.json")) == {"checkpoint": 1}


def test_a_deployment_suspends_each_round_until_its_annotators_are_done(
    stack: Stack, label_studio_server: LabelStudioServer
) -> None:
    config = stack.config
    runs = RunStore(open_store(config.storage), "e2e-" + uuid.uuid4().hex[:6])
    team = Team(label_studio_server, runs)

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        started = run_deployment("hero-training/on-demand", parameters={"run_id": runs.run_id}, timeout=0)
        assert isinstance(started, FlowRun)
        for round_index in (0, 1):
            wait_for(
                f"the run to suspend for round {round_index}",
                lambda k=round_index: waiting_round(started.id) == k,
                stack,
            )
            checked = health(stack)["checked"]

            def checked_again(before: int = checked) -> bool:
                now = health(stack)
                return bool(now["checked"] > before and now["idle"])

            team.label("fast", round_index)
            # the fast annotator's events are checked, and the round goes on waiting for the slow one
            wait_for("the receiver to check the fast annotator's round", checked_again, stack, timeout_s=60)
            assert waiting_round(started.id) == round_index
            team.label("slow", round_index)
        final = wait_for(
            "the run to finish",
            lambda: (run := read_flow_run(started.id)).state and run.state.is_final() and run,
            stack,
        )
        assert final.state.is_completed(), f"{final.state}\n{stack.log_tails()}"
        with get_client(sync_client=True) as client:
            states = [state.name for state in client.read_flow_run_states(started.id)]
        assert states.count("Suspended") == 2, states
        now = health(stack)
        assert now["resumed"] == 2 and now["rejected"] == 0, now
        check_run_committed(runs)
        team.check_stored_feedback()

        # the MLflow run finished with both rounds tracked, and its LoRA is a registry version ...
        tracking = MlflowClient(tracking_uri=config.tracking.tracking_uri)
        (run,) = tracking.search_runs(
            [tracking.get_experiment_by_name(config.tracking.experiment).experiment_id],
            f"tags.`hero.run_id` = '{runs.run_id}'",
        )
        assert run.info.status == "FINISHED"
        annotators = tracking.get_metric_history(run.info.run_id, "labelling_annotators")
        assert sorted((m.step, m.value) for m in annotators) == [(0, 2.0), (1, 2.0)]
        (version,) = tracking.search_model_versions(f"name = '{config.tracking.registered_model}'")
        assert version.tags["hero.run_id"] == runs.run_id and version.tags["hero.rounds"] == "2"

        # ... which the promotion deployment, triggered by the finished training, judged
        def promotion_decided() -> bool:
            tags = tracking.get_model_version(config.tracking.registered_model, version.version).tags
            return "hero.promotion.decision" in tags

        wait_for("the promotion triggered by the finished run", promotion_decided, stack, timeout_s=240)
        with get_client(sync_client=True) as client:
            parameters = [run.parameters for run in client.read_flow_runs()]
        # the trigger named the finished training, so the promotion judged that run's own version
        assert {"after_flow_run": f"prefect.flow-run.{started.id}"} in parameters, parameters
        check_no_secret_leaked(stack, runs, tracking, run.info.run_id)


def check_no_secret_leaked(stack: Stack, runs: RunStore, tracking: MlflowClient, mlflow_run_id: str) -> None:
    """No secret of the stack in what its services wrote: the worker's and the receiver's logs (flow
    runs' output included); every log, flow run (parameters, states), deployment and work pool stored
    in Prefect; the run's MLflow params and tags and its registered version's tags; the run's objects
    in S3."""
    places: dict[str, bytes] = {
        f"file {path.name}": path.read_bytes() for path in stack.logs.rglob("*") if path.is_file()
    }

    def every(read: Callable[..., list[Any]]) -> list[Any]:
        found: list[Any] = []
        while page := read(limit=200, offset=len(found)):
            found += page
        return found

    with get_client(sync_client=True) as client:
        logs = every(client.read_logs)
        places["Prefect logs"] = "\n".join(log.message for log in logs).encode()
        for item in every(client.read_flow_runs) + client.read_deployments() + client.read_work_pools():
            places[f"Prefect {type(item).__name__} {item.name}"] = item.model_dump_json().encode()
    run = tracking.get_run(mlflow_run_id)
    places["MLflow params and tags"] = json.dumps([run.data.params, run.data.tags]).encode()
    for version in tracking.search_model_versions(f"name = '{stack.config.tracking.registered_model}'"):
        places[f"model version {version.version}"] = json.dumps(version.tags).encode()
    for key in runs.store.list(runs.prefix):
        places[key] = runs.store.get(key)
    assert any(name.startswith("file worker-") for name in places) and "file webhook-receiver.log" in places
    assert logs and len(places) > 20
    # the scan reads what was written: the run's id (not secret) shows in every kind of place
    seen = {
        name.split()[0] if " " in name else "S3"
        for name, data in places.items()
        if runs.run_id.encode() in data
    }
    assert {"file", "Prefect", "MLflow", "S3"} <= seen, seen
    for variable, value in stack.secrets.items():
        leaks = [name for name, data in places.items() if value.encode() in data]
        assert leaks == [], f"{variable} leaked into {leaks}"


@pytest.mark.long  # about 3 minutes: make test-long (CI runs it)
def test_a_worker_killed_mid_round_loses_nothing_and_redoes_nothing(
    stack: Stack, label_studio_server: LabelStudioServer
) -> None:
    """Round 0: the worker dies after collecting; a new flow run of the same run picks up there.
    Round 1: the webhook receiver is down; the poller (`hero rounds poll`) resumes the round."""
    config = stack.config
    runs = RunStore(open_store(config.storage), "crash-" + uuid.uuid4().hex[:6])
    team = Team(label_studio_server, runs)
    feedback_key = f"{runs.round_prefix(0)}/feedback.json"

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        first = run_deployment("hero-training/on-demand", parameters={"run_id": runs.run_id}, timeout=0)
        assert isinstance(first, FlowRun)
        wait_for("the run to suspend for round 0", lambda: waiting_round(first.id) == 0, stack)
        team.label("fast", 0)
        team.label("slow", 0)
        # the webhook resumes the run; once it has collected round 0, the worker dies with its flow run
        wait_for("round 0's annotations to be collected", lambda: runs.store.exists(feedback_key), stack)
        stack.kill_worker(first.id)
        assert read_flow_run(first.id).state.name == "Running"  # a dead process cannot say it crashed
        # recovery as docs/OPERATIONS.md says: mark the orphan crashed, start a worker, run again
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(first.id, Crashed(message="worker killed by the test"), force=True)
        stack.start_worker()
        second = run_deployment("hero-training/on-demand", parameters={"run_id": runs.run_id}, timeout=0)
        assert isinstance(second, FlowRun)
        wait_for("the second run to suspend for round 1", lambda: waiting_round(second.id) == 1, stack)
        # round 1's events are lost (the receiver is down): the poller resumes the round instead
        _infra("webhook-receiver.sh", "stop", stack.env)
        team.label("fast", 1)
        team.label("slow", 1)
        time.sleep(2)
        assert waiting_round(second.id) == 1
        polled = stack.hero("rounds", "poll")
        assert str(second.id) in polled and "yes" in polled and "complete" in polled, polled
        final = wait_for(
            "the second run to finish",
            lambda: (run := read_flow_run(second.id)).state and run.state.is_final() and run,
            stack,
        )
        assert final.state.is_completed(), f"{final.state}\n{stack.log_tails()}"
    check_run_committed(runs)
    team.check_stored_feedback()  # nothing lost, and one set of tasks: nothing published twice

    # nothing learned twice: the final engine equals one trained without interruption on the same labels
    reference = RunStore(LocalStore(stack.logs / "reference"), runs.run_id)
    local = with_overrides(
        config,
        {"run_id": runs.run_id, "storage": {"backend": "local", "local_root": str(stack.logs / "reference")}},
    )
    local = with_overrides(local, {"label_studio": {"enabled": False}, "tracking": {"register_lora": False}})
    with TrainingRun(local, reference.store) as replay:
        while not replay.done:
            batch = replay.generate()
            replay.learn(batch, runs.load_feedback(batch.round))
    final_state = runs.store.get(f"{runs.checkpoint_prefix(1)}/state.json")
    assert (
        json.loads(final_state)["tensors"]
        == json.loads(reference.store.get(f"{reference.checkpoint_prefix(1)}/state.json"))["tensors"]
    )


def test_gpu_work_pools_run_the_worker_image_with_a_gpu(prefect_server: Service) -> None:
    tag = uuid.uuid4().hex[:6]
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.env["PREFECT_API_URL"]}):
        for kind in ("docker", "kubernetes"):
            name = f"gpu-{kind}-{tag}"
            assert ensure_pool(name, 2, kind) == (True, kind, 2)
            assert ensure_pool(name, 3, kind) == (False, kind, 3)  # exists: the limit asked for
            # no type, no limit asked for (a redeploy without --gpus): the pool's own, kept
            assert ensure_pool(name, None, new_limit=1) == (False, kind, 3)
            with get_client(sync_client=True) as client:
                pool = client.read_work_pool(name)
            assert (pool.type, pool.concurrency_limit) == (kind, 3)
            variables = pool.base_job_template["variables"]["properties"]
            assert variables["image"]["default"] == "hero-worker:0.1.0"
            if kind == "kubernetes":
                job = pool.base_job_template["job_configuration"]["job_manifest"]
                (container,) = job["spec"]["template"]["spec"]["containers"]
                assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
                assert variables["gpus"]["default"] == 1
                assert container["envFrom"] == [{"secretRef": {"name": "{{ secret_name }}"}}]
            else:
                (request,) = variables["container_create_kwargs"]["default"]["device_requests"]
                assert request == {"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}
    with pytest.raises(ValueError, match="choose one of process, docker, kubernetes"):
        base_job_template("ecs")


def test_deploying_again_updates_in_place_and_removes_what_it_replaced(
    prefect_server: Service, tmp_path: Path
) -> None:
    from prefect import Flow
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import POLLER, REPO_ROOT, SCHEDULED, DeployPlan, deploy
    from flows.waiting import poll_rounds

    tag = uuid.uuid4().hex[:6]
    gpu, services = f"deploy-gpu-{tag}", f"deploy-services-{tag}"
    # never due while tests run; removed at the end (it would start training runs in the GPU pool)
    plan = DeployPlan(gpu_pool=gpu, service_pool=services, training_cron="0 0 1 1 *")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.env["PREFECT_API_URL"]}):
        ensure_pool(gpu, 1)
        ensure_pool(services, None)
        older = Flow.from_source(source=str(REPO_ROOT), entrypoint="flows/waiting.py:poll_rounds")
        older.deploy(name="every-60s", work_pool_name=services, interval=60, build=False, push=False,
                     print_next_steps=False, ignore_warnings=True)  # fmt: skip
        deployed, notes = deploy(plan)
        assert notes == [f"{poll_rounds.name}/every-60s: removed (it would poll beside {POLLER})"]
        with get_client(sync_client=True) as client:
            poller = client.read_deployment_by_name(POLLER)
            assert (
                poller.id == deployed[POLLER] and poller.schedules[0].schedule.interval.total_seconds() == 300
            )
            assert poller.global_concurrency_limit is not None and poller.global_concurrency_limit.limit == 1
            assert poller.concurrency_options is not None  # a poll due while one runs is dropped, not queued
            assert poller.concurrency_options.collision_strategy == "CANCEL_NEW"
            judged = client.read_deployment_by_name("hero-promote/after-training").global_concurrency_limit
            assert judged is not None and judged.limit == 1  # one promotion at a time
            with pytest.raises(ObjectNotFound):
                client.read_deployment_by_name(f"{poll_rounds.name}/every-60s")
        # deployed again without the cron (a code update): the schedule stays, and that is said
        again, notes = deploy(dataclasses.replace(plan, training_cron=None))
        assert again[POLLER] == deployed[POLLER] and SCHEDULED not in again
        assert notes == [f"{SCHEDULED}: kept as it was (--training-cron off removes it)"]
        _, notes = deploy(dataclasses.replace(plan, training_cron="off"))
        assert notes == [f"{SCHEDULED}: removed (--training-cron off)"]
        with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
            client.read_deployment_by_name(SCHEDULED)
    # an existing pool of another type is refused, not reported as what was asked for
    env = {**os.environ, **prefect_server.env, "HERO_LABEL_STUDIO__API_KEY": "k"}
    hero = str(Path(sys.executable).parent / "hero")
    moved = subprocess.run(
        [hero, "deploy", "--gpu-pool", gpu, "--service-pool", services, "--pool-type", "kubernetes"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    said = " ".join(moved.stderr.split())
    assert moved.returncode == 1 and "Traceback" not in moved.stderr, moved.stderr
    assert (
        f"work pool {gpu} exists as a process pool, not kubernetes: leave out --pool-type (or give process)"
        in said
    )
