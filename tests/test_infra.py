"""The infra/ files: the compose stack binds to loopback and pins its images; the service scripts
explain their usage. (No Docker engine here: the compose file is checked as data.)"""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from hero_ml.config import load_config

INFRA = Path(__file__).resolve().parent.parent / "infra"


def test_compose_services_bind_to_loopback_and_pin_their_images() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert compose["services"], "no services"
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} is exposed beyond loopback"


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
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "from-stack-env")  # as compose passes it
    config = load_config()
    assert config.label_studio.enabled and config.storage.backend == "s3"
    assert str(config.orchestration.webhook_url) == "http://webhooks:8765/webhooks/label-studio"


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
def test_service_scripts_explain_their_usage(script: str) -> None:
    result = subprocess.run(["bash", str(INFRA / script), "restart"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
