"""The infra/ files: the compose stack binds to loopback and pins its images; the service scripts
explain their usage. (No Docker engine here: the compose file is checked as data.)"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml

from hero_ml.config import OTHER_ENV_VARIABLES, ConfigError, HeroConfig, load_config
from hero_ml.training import run_task

INFRA = Path(__file__).resolve().parent.parent / "infra"


def test_every_hero_variable_of_the_repository_is_a_setting_or_known_as_none() -> None:
    # a HERO_* name that is neither would be refused as a typo when close to a setting's name (the
    # tests, which set typos on purpose, are not scanned)
    root = INFRA.parent
    files = [
        path
        for folder in ("infra", "flows", "hero_ml", "docs", "benchmarks", ".ci")
        for path in (root / folder).rglob("*")
        if path.is_file() and path.suffix in {"", ".sh", ".py", ".md", ".yaml", ".yml", ".example", ".toml"}
    ] + [root / "Makefile", root / "README.md"]
    found = {
        name
        for path in files
        for name in re.findall(r"\bHERO_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace"))
        if "__" not in name
    }
    assert "HERO_S3_PORT" in found and "HERO_RUN_ID" in found  # the scan reads what it must
    settings = {f"HERO_{name.upper()}" for name in HeroConfig.model_fields}
    documented_typos = {"HERO_RUNID"}  # the README's example of a refused name
    assert sorted(found - settings - OTHER_ENV_VARIABLES - documented_typos) == []
    for typo in documented_typos:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(typo, "x")
            with pytest.raises(ConfigError, match=f"{typo} is not a setting"):
                load_config()
    assert sorted(OTHER_ENV_VARIABLES - found) == []  # no name kept for a variable gone


def test_compose_services_bind_to_loopback_and_pin_their_images() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert compose["services"], "no services"
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} is exposed beyond loopback"
        # what a service installs at its start is pinned too: a restart must not pick a new release
        for install in re.findall(r"pip install ([^&;\"]*)", str(service.get("command", ""))):
            packages = [word for word in install.split() if not word.startswith("-")]
            assert packages and all("==" in p for p in packages), f"{name}: pip install {install!r} unpinned"
        # a server's command line is in every `ps` and `docker top` for as long as it runs
        assert "PASSWORD" not in str(service.get("command", "")), f"{name}: a password on its command line"


def test_compose_services_come_back_and_mlflow_answers_the_workers_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    for name, service in services.items():  # after a reboot or a crash; the buckets job runs once
        assert service.get("restart") == ("unless-stopped" if name != "buckets" else None), name
    # MLflow refuses Host headers it does not know (DNS rebinding): the workers reach it by its service name
    monkeypatch.setenv("HERO_CONFIG_FILE", str(INFRA / "hero.compose.yaml"))
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "from-stack-env")  # as compose passes them
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "from-stack-env-0123")
    tracking = urlparse(load_config().tracking.tracking_uri)
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    allowed = [host.replace("${MLFLOW_PUBLIC_HOST:-localhost}", "localhost") for host in allowed]
    assert is_allowed_host_header(allowed, tracking.netloc) and is_allowed_host_header(
        allowed, "127.0.0.1:5000"
    )
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    # HERO's S3 keys reach Label Studio's database: MinIO's user of the two buckets, not its root
    keys = [services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"], *yaml.safe_load(
        (INFRA / "compose.yaml").read_text())["x-hero"]["environment"].values()]  # fmt: skip
    assert not any("MINIO_ROOT" in str(value) for value in keys)
    policy = json.loads((INFRA / "minio-policy.json").read_text())
    buckets = {load_config().storage.s3_bucket, "hero-mlflow"}
    assert set(policy["Statement"][0]["Resource"]) == {
        f"arn:aws:s3:::{b}{s}" for b in buckets for s in ("", "/*")
    }
    assert "/etc/hero/minio-policy.json" in services["buckets"]["entrypoint"]


def test_compose_stack_is_whole_and_takes_every_secret_from_the_environment() -> None:
    text = (INFRA / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    wanted = {"postgres", "minio", "buckets", "mlflow", "prefect", "label-studio", "worker", "webhooks"}
    assert wanted <= set(services)
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every variable the stack needs is in the example env file, and no value is written in the file
    needed = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = {
        line.split("=")[0] for line in (INFRA / "stack.env.example").read_text().splitlines() if "=" in line
    }
    assert needed <= example, needed - example
    for line in (INFRA / "stack.env.example").read_text().splitlines():
        if "PASSWORD" in line or "TOKEN" in line or "SECRET" in line:
            assert line.endswith("="), f"a secret has a value in the example: {line.split('=')[0]}"


def test_compose_config_file_is_a_valid_hero_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_CONFIG_FILE", str(INFRA / "hero.compose.yaml"))
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "from-stack-env")  # as compose passes them
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "from-stack-env-0123")
    config = load_config()
    assert config.label_studio.enabled and config.storage.backend == "s3"
    assert str(config.orchestration.webhook_url) == "http://webhooks:8765/webhooks/label-studio"
    assert run_task(config) is None  # a real prompt, labelled by people: the run starts, no toy judge
    paper = load_config(INFRA.parent / "configs" / "sd15-paper.yaml")
    for section in ("encoder", "ddpo", "d3po", "guidance"):
        assert getattr(config, section) == getattr(paper, section), section
    assert config.sampling.model_copy(update={"prompt": ""}) == paper.sampling.model_copy(
        update={"prompt": ""}
    )
    assert config.model.model_copy(update={"source": ""}) == paper.model.model_copy(update={"source": ""})


@pytest.mark.parametrize(
    "script",
    [
        "s3-server.sh",
        "mlflow-server.sh",
        "label-studio.sh",
        "prefect-server.sh",
        "prefect-worker.sh",
        "webhook-receiver.sh",
        "stack.sh",
    ],
)
def test_service_scripts_explain_their_usage(script: str, tmp_path: Path) -> None:
    state = {**os.environ, "HERO_INFRA_STATE": str(tmp_path)}  # the default is .infra/ in the repository
    result = subprocess.run(
        ["bash", str(INFRA / script), "restart"], capture_output=True, text=True, env=state
    )
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("gpus", ["a", "0,", ",1", "0,,1", "0 1", "-1", "08", "0,1,0", "1234"])
def test_a_worker_is_given_a_gpu_index_or_a_comma_separated_group(gpus: str, tmp_path: Path) -> None:
    state = {**os.environ, "HERO_INFRA_STATE": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(INFRA / "prefect-worker.sh"), "start", "pool", gpus],
        capture_output=True,
        text=True,
        env=state,
    )
    assert result.returncode == 2 and "GPU indices, comma-separated, each once" in result.stderr


def start_s3(port: int, state: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`infra/s3-server.sh start` on `port`, its pid and log in `state` (moto_server from this venv)."""
    return subprocess.run(
        ["bash", str(INFRA / "s3-server.sh"), "start"],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HERO_S3_PORT": str(port),
            "HERO_INFRA_STATE": str(state),
        },
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_service_whose_port_another_process_holds_is_refused_not_reported_up(tmp_path: Path) -> None:
    from tests.conftest import _free_port

    port = _free_port()
    squatter = subprocess.Popen(
        ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        for _ in range(300):  # until it answers
            if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the squatter on port {port} never answered: the test would prove nothing")
        result = start_s3(port, tmp_path / "state", timeout_s=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"http://127.0.0.1:{port}" in result.stderr and "already answers" in result.stderr
        assert not (tmp_path / "state" / "s3.pid").exists() and squatter.poll() is None
    finally:
        squatter.terminate()
        squatter.wait(timeout=10)


def test_a_stale_pid_file_naming_another_process_is_neither_trusted_nor_signalled(tmp_path: Path) -> None:
    # the state folder outlives a reboot: its pid file may name a process that is not the service now
    from tests.conftest import _free_port

    stranger = subprocess.Popen(["setsid", "sleep", "600"])
    state = tmp_path / "state"
    state.mkdir()
    (state / "s3.pid").write_text(f"{stranger.pid}\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # moto_server
        "HERO_S3_PORT": str(_free_port()),
        "HERO_INFRA_STATE": str(state),
    }

    def s3(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(INFRA / "s3-server.sh"), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        stopped = s3("stop")
        assert stopped.returncode == 0 and f"pid {stranger.pid}, another process now" in stopped.stdout
        assert stranger.poll() is None and not (state / "s3.pid").exists()
        (state / "s3.pid").write_text(f"{stranger.pid}\n")  # its pid reused: the start time differs
        (state / "s3.started").write_text("1\n")
        assert "another process now" in s3("stop").stdout and stranger.poll() is None
        # a group whose leader is gone (every double-forking daemon leaves one): named, not signalled
        leaderless = subprocess.run(
            ["setsid", "bash", "-c", "sleep 600 >/dev/null 2>&1 & echo $$"],
            capture_output=True,
            text=True,
            check=True,
        )
        group = int(leaderless.stdout)
        try:
            (state / "s3.pid").write_text(f"{group}\n")
            (state / "s3.started").write_text("1\n")
            named = s3("stop").stdout
            assert f"processes of group {group} remain" in named, named
            assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 0
        finally:
            os.killpg(group, signal.SIGKILL)
        (state / "s3.pid").write_text(f"{stranger.pid}\n")
        started = s3("start")  # not "already running": it starts its own
        assert started.returncode == 0 and "s3 up (pid" in started.stdout, started.stdout + started.stderr
        assert int((state / "s3.pid").read_text()) != stranger.pid
        again = s3("start")
        assert again.returncode == 0 and "s3 already running" in again.stdout
        assert s3("stop").stdout.strip().endswith("s3 stopped") and stranger.poll() is None
    finally:
        s3("stop")
        stranger.kill()
        stranger.wait(timeout=10)


def test_a_port_held_by_a_listener_that_never_answers_fails_the_start_not_hangs(tmp_path: Path) -> None:
    from tests.conftest import _free_port

    port = _free_port()
    (tmp_path / "state").mkdir(mode=0o755)  # as an earlier release left it
    silent = subprocess.Popen(  # accepts connections, never answers them
        [
            sys.executable,
            "-c",
            f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
            "time.sleep(600)",
        ]
    )
    try:
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        # each probe gives up after 5 s: without that, the start waited forever
        result = start_s3(port, tmp_path / "state", timeout_s=90)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "exited during start" in result.stderr and silent.poll() is None
        # the state folder holds tokens and databases: the operator's alone, one made before included
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    finally:
        silent.kill()
        silent.wait(timeout=10)


def test_a_start_without_the_tools_it_needs_says_which_at_once(tmp_path: Path) -> None:
    tools = tmp_path / "bin"  # every command of the machine but procps' ps and pgrep
    tools.mkdir()
    for folder in dict.fromkeys([str(Path(sys.executable).parent), *os.environ["PATH"].split(os.pathsep)]):
        for command in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if command.name not in ("ps", "pgrep") and not (tools / command.name).exists():
                (tools / command.name).symlink_to(command)
    result = subprocess.run(
        ["bash", str(INFRA / "s3-server.sh"), "start"],
        env={**os.environ, "PATH": str(tools), "HERO_INFRA_STATE": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "'ps' not found on PATH" in result.stderr, result.stdout + result.stderr
    assert not list((tmp_path / "state").glob("*.pid"))  # nothing started


def test_a_worker_whose_prefect_api_does_not_answer_is_refused(tmp_path: Path) -> None:
    from tests.conftest import _free_port

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # prefect
        "PREFECT_API_URL": f"http://user:hunter2@127.0.0.1:{_free_port()}/api",
        "HERO_INFRA_STATE": str(tmp_path / "state"),
    }
    result = subprocess.run(
        ["bash", str(INFRA / "prefect-worker.sh"), "start", "nowhere"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "does not answer" in result.stderr, result.stdout + result.stderr
    assert "http://…@127.0.0.1:" in result.stderr and "hunter2" not in result.stderr  # never shown
    assert not list((tmp_path / "state").glob("*.pid"))


def test_the_stack_without_its_webhook_secret_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HERO_ORCHESTRATION__WEBHOOK_SECRET"} | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # hero
        "HERO_INFRA_STATE": str(tmp_path / "state"),
    }
    result = subprocess.run(
        ["bash", str(INFRA / "stack.sh"), "start"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "HERO_ORCHESTRATION__WEBHOOK_SECRET" in result.stderr, result.stderr
    assert not list((tmp_path / "state").glob("*.pid"))  # said before any service started


@pytest.mark.long  # two starts of Label Studio, about 3 minutes: make test-long (CI runs it)
def test_a_label_studio_restart_without_its_admin_variables_adds_no_development_admin(tmp_path: Path) -> None:
    from tests.conftest import _free_port, _infra

    chosen = "operator-chosen-token-0123456789"
    port = _free_port()
    base = {**os.environ, "HERO_INFRA_STATE": str(tmp_path / "state"), "HERO_LABEL_STUDIO_PORT": str(port)}
    base = {k: v for k, v in base.items() if not k.startswith("LABEL_STUDIO_")}
    url = f"http://127.0.0.1:{port}/api/projects"

    def answers(token: str) -> int:
        return requests.get(url, headers={"Authorization": f"Token {token}"}, timeout=30).status_code

    first = {
        **base,
        "LABEL_STUDIO_USERNAME": "ops@example.org",
        "LABEL_STUDIO_PASSWORD": "operator-chosen-password",
        "LABEL_STUDIO_USER_TOKEN": chosen,
    }
    try:
        _infra("label-studio.sh", "start", first)
        assert answers(chosen) == 200
        _infra("label-studio.sh", "stop", first)
        _infra("label-studio.sh", "start", base)  # after a reboot, from a shell without the variables
        assert answers(chosen) == 200
        assert answers("hero-dev-token-0123456789") == 401  # the development admin was never made
    finally:
        _infra("label-studio.sh", "stop", base)
