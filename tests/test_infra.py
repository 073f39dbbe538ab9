"""The infra/ files: the compose stack binds to loopback and pins its images; the service scripts
explain their usage. (No Docker engine here: the compose file is checked as data.)"""

import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"


def test_compose_services_bind_to_loopback_and_pin_their_images() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert compose["services"], "no services"
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} is exposed beyond loopback"


@pytest.mark.parametrize(
    "script", ["s3-server.sh", "mlflow-server.sh", "label-studio.sh", "prefect-server.sh"]
)
def test_service_scripts_explain_their_usage(script: str) -> None:
    result = subprocess.run(["bash", str(INFRA / script), "restart"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
