"""Several runs share a machine's GPUs through the GPU pool: one process worker per GPU
(infra/prefect-worker.sh start POOL GPU) or per GPU group (… start POOL 0,1: each of its runs spans the
group, model.processes), each running one flow run at a time on the GPUs it was given, and the pool's
concurrency limit. Five runs submitted at once on a pool of two workers: never more than two at a
time, never two at a time on one worker's GPUs, and both workers used."""

import json
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deploy import REPO_ROOT, ensure_pool
from tests.conftest import Service, _free_port, _infra
from tests.gpu_pool_probe import probe

RUNS = 5


@pytest.mark.long  # about a minute each: make test-long (CI runs it)
@pytest.mark.parametrize(
    ("workers", "processes", "device"),
    [(("0", "1"), 1, "cpu"), (("0,1", "2,3"), 2, "cuda")],
    ids=["gpus", "groups"],
)
def test_runs_share_two_workers_gpus_one_run_per_worker_at_a_time(
    prefect_server: Service, tmp_path: Path, workers: tuple[str, str], processes: int, device: str
) -> None:
    pool = f"gpu-share-{uuid.uuid4().hex[:6]}"
    base_port = _free_port()  # worker GPU k (or group k,…) serves its health check on base_port + k
    env = {
        **prefect_server.env,
        "HERO_INFRA_STATE": str(tmp_path / "infra"),
        "HERO_WORKER_PORT": str(base_port),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "HERO_MODEL__PROCESSES": "4",  # the worker's own setting: its GPUs decide
    }
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        ensure_pool(pool, concurrency_limit=2)
        deployment = cast(
            Flow[..., Any],
            probe.from_source(source=str(REPO_ROOT), entrypoint="tests/gpu_pool_probe.py:probe"),
        ).deploy(name="probe", work_pool_name=pool, build=False, push=False, print_next_steps=False)
        runs = [
            run_deployment(deployment, parameters={"out": str(tmp_path / f"run{i}.json")}, timeout=0)
            for i in range(RUNS)
        ]
        for gpus in workers:
            _infra("prefect-worker.sh", "start", env, pool, gpus)
        try:
            deadline = time.monotonic() + 300
            states: list[str] = []
            while time.monotonic() < deadline:
                with get_client(sync_client=True) as client:
                    states = [client.read_flow_run(run.id).state_type.value for run in runs]
                if all(state in ("COMPLETED", "FAILED", "CRASHED") for state in states):
                    break
                time.sleep(1)
        finally:
            for gpus in workers:
                _infra("prefect-worker.sh", "stop", env, pool, gpus)
    assert states == ["COMPLETED"] * RUNS, states

    records = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(RUNS)]
    assert {r["gpu"] for r in records} == set(workers)  # both workers used, each with its GPUs only
    # a group's runs span it (a single GPU's: the config's own); the worker's settings reach the run
    assert {(r["processes"], r["device"]) for r in records} == {(processes, device)}
    for i, a in enumerate(records):
        overlapping = [b for b in records[i + 1 :] if a["started"] < b["ended"] and b["started"] < a["ended"]]
        assert all(b["gpu"] != a["gpu"] for b in overlapping), (a, overlapping)  # one run per worker
    moments = sorted(t for r in records for t in (r["started"], r["ended"]))
    most = max(sum(r["started"] <= m < r["ended"] for r in records) for m in moments)
    assert most == 2  # the two GPUs ran runs side by side, and never more than two at a time
