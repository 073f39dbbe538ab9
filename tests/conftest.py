"""Shared fixtures. Nothing here downloads: the hub is switched off for the whole test session."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect reads its settings once, at import: one scratch home for the whole session, quiet, and
# patient with the ephemeral server's start on a busy 2-core machine.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="hero-test-prefect-"))  # removed at the end
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import boto3
import pytest
import requests
import torch
import uvicorn
from diffusers import StableDiffusionPipeline

from hero_ml.diffusion.pipeline import build_random_pipeline

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="also run the long variants (every crash point, the full load test): make test-long",
    )
    parser.addoption(
        "--screenshots",
        type=Path,
        help="keep the browser test's screenshots in this folder (default: the test's tmp_path)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: a long variant, run with --long (make test-long)")


# -- tests write only under tmp_path ----------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# made by the tools running the tests, not by the tests
TOOL_ENTRIES = {".pytest_cache", ".hypothesis", "__pycache__"}
WATCHED = (REPO, REPO / "tests", REPO / "benchmarks", REPO / "benchmarks" / "results")
entries_at_start = pytest.StashKey[set[Path]]()


def _entries() -> set[Path]:
    folders = {*WATCHED, Path.cwd()}
    return {entry for folder in folders for entry in folder.iterdir() if entry.name not in TOOL_ENTRIES}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[entries_at_start] = _entries()


def pytest_sessionfinish(session: pytest.Session) -> None:
    prefect_home = Path(os.environ["PREFECT_HOME"])
    if prefect_home.name.startswith("hero-test-prefect-"):  # ours, not one the caller set
        shutil.rmtree(prefect_home, ignore_errors=True)
    written = sorted(str(e) for e in _entries() - session.config.stash[entries_at_start])
    if written:  # a relative default (hero-data/, mlflow.db) or a fixed path slipped past tmp_path
        print(f"\nerror: the tests wrote outside tmp_path: {', '.join(written)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long variant: run with `pytest --long` (make test-long)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_pipe() -> StableDiffusionPipeline:
    """A fresh tiny SD with seeded random weights, built from the real diffusers classes (0.1 s)."""
    return build_random_pipeline("tiny", seed=0)


@pytest.fixture(autouse=True)
def _clean_hero_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the HERO_* variables they set themselves."""
    for name in list(os.environ):
        if name.startswith("HERO_"):
            monkeypatch.delenv(name)


# -- real services on loopback, started by the infra/ scripts -------------------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(app: Any) -> Iterator[str]:
    """An ASGI app on uvicorn on loopback, in a thread; yields its URL, stops it when closed."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@dataclass(frozen=True)
class Service:
    url: str
    env: dict[str, str]  # what the infra script was started with (stop needs the same)


def _infra(script: str, action: str, env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "infra" / script), action, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.returncode != 0:
        raise RuntimeError(f"infra/{script} {action} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """moto's S3 server on a free loopback port, with the buckets `hero-test` and `hero-mlflow`."""
    env = {
        **os.environ,
        **S3_CREDENTIALS,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HERO_INFRA_STATE": str(tmp_path_factory.mktemp("infra")),
        "HERO_S3_PORT": str(_free_port()),
    }
    _infra("s3-server.sh", "start", env, "hero-test", "hero-mlflow")
    try:
        yield Service(f"http://127.0.0.1:{env['HERO_S3_PORT']}", env)
    finally:
        _infra("s3-server.sh", "stop", env)


@pytest.fixture(scope="session")
def mlflow_server(s3_server: Service) -> Iterator[Service]:
    """An MLflow server (SQLite backend, registry) whose artifacts go to s3://hero-mlflow on s3_server."""
    env = {**s3_server.env, "HERO_MLFLOW_PORT": str(_free_port()), "HERO_MLFLOW_BUCKET": "hero-mlflow"}
    _infra("mlflow-server.sh", "start", env)
    try:
        yield Service(f"http://127.0.0.1:{env['HERO_MLFLOW_PORT']}", env)
    finally:
        _infra("mlflow-server.sh", "stop", env)


@pytest.fixture
def s3_client(s3_server: Service) -> Any:
    """A plain boto3 client on the test server: to look at and tamper with objects behind our back."""
    return boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1", **_boto_keys())


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


@dataclass(frozen=True)
class LabelStudioServer(Service):
    admin_token: str


@pytest.fixture(scope="session")
def label_studio_server(s3_server: Service) -> Iterator[LabelStudioServer]:
    """Label Studio (its own venv, `make label-studio`) on a free loopback port, allowed to reach the
    loopback S3 server; an admin with a legacy API token."""
    token = "hero-test-admin-token-0123456789"
    env = {
        **s3_server.env,
        "HERO_LABEL_STUDIO_PORT": str(_free_port()),
        "HERO_LABEL_STUDIO_ALLOW_LOOPBACK": "true",
        "LABEL_STUDIO_USER_TOKEN": token,
    }
    _infra("label-studio.sh", "start", env)
    try:
        yield LabelStudioServer(f"http://127.0.0.1:{env['HERO_LABEL_STUDIO_PORT']}", env, token)
    finally:
        _infra("label-studio.sh", "stop", env)


def create_annotator(server: LabelStudioServer, email: str, password: str) -> str:
    """An annotator account made as a person makes one (the invite link, the signup form), and its API
    token. Label Studio's users API (`users.create(password=…)`) creates accounts that cannot log in."""
    invite = requests.get(
        f"{server.url}/api/invite", headers={"Authorization": f"Token {server.admin_token}"}, timeout=30
    ).json()
    session = requests.Session()
    signup = f"{server.url}/user/signup/?token={invite['token']}"
    session.get(signup, timeout=30)
    response = session.post(
        signup,
        data={"email": email, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": signup},
        allow_redirects=False,
        timeout=30,
    )
    assert response.status_code == 302, f"signup of {email} failed: {response.status_code}"
    return session.get(f"{server.url}/api/current-user/token", timeout=30).json()["token"]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A Prefect API server (SQLite) on a free loopback port; env points clients at it."""
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HERO_INFRA_STATE": str(tmp_path_factory.mktemp("prefect-infra")),
        "HERO_PREFECT_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
    }
    _infra("prefect-server.sh", "start", env)
    try:
        api = f"http://127.0.0.1:{port}/api"
        yield Service(api, {**env, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    finally:
        _infra("prefect-server.sh", "stop", env)


def tiny_run(images: int) -> dict[str, Any]:
    """Config sections of the smallest run the toy model learns in: `images` a round, 4 DDIM steps,
    a few encoder epochs, 2 trained timesteps a trajectory."""
    return {
        "sampling": {"images_per_round": images, "num_steps": 4, "sub_batch_size": images},
        "encoder": {"epochs_per_round": 3, "triplets_per_epoch": 8},
        "ddpo": {"timesteps_per_trajectory": 2},
    }


def s3_storage(s3: Service, prefix: str, **more: Any) -> dict[str, Any]:
    """The storage section of a run on the test S3 server under its own key prefix."""
    return {"backend": "s3", "s3_bucket": "hero-test", "s3_endpoint_url": s3.url, "s3_prefix": prefix, **more}
