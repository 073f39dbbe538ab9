"""Write flows/work_pools/{docker,kubernetes}-gpu.json: the base job templates of HERO's GPU work pools.

Each starts from the template its Prefect worker publishes (prefect-docker, prefect-kubernetes: install
them into a scratch environment, they are not HERO's dependencies) and adds what a HERO round needs: the
worker image and one NVIDIA GPU per flow run; the kubernetes one also takes the HERO settings and
secrets from a Kubernetes Secret (docker has no secret store: docs/OPERATIONS.md says what it needs).

    python -m venv /tmp/pools
    /tmp/pools/bin/pip install -c constraints.txt prefect-docker prefect-kubernetes
    /tmp/pools/bin/python infra/make-work-pool-templates.py
"""

import json
from pathlib import Path

from prefect_docker.worker import DockerWorker
from prefect_kubernetes.worker import KubernetesWorker

OUT = Path(__file__).resolve().parent.parent / "flows" / "work_pools"
IMAGE = "hero-worker:0.1.0"


def kubernetes() -> dict:
    template = KubernetesWorker.get_default_base_job_template()
    variables = template["variables"]["properties"]
    variables["image"]["default"] = IMAGE
    variables["gpus"] = {
        "title": "GPUs",
        "description": "NVIDIA GPUs per flow run.",
        "type": "integer",
        "default": 1,
    }
    variables["secret_name"] = {
        "title": "Secret",
        "description": "Kubernetes Secret whose keys become the environment (HERO_*, PREFECT_API_URL).",
        "type": "string",
        "default": "hero-secrets",
    }
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    container["envFrom"] = [{"secretRef": {"name": "{{ secret_name }}"}}]
    return template


def docker() -> dict:
    template = DockerWorker.get_default_base_job_template()
    variables = template["variables"]["properties"]
    variables["image"]["default"] = IMAGE
    variables["container_create_kwargs"]["default"] = {
        "device_requests": [{"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}]
    }
    return template


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, template in (("kubernetes", kubernetes()), ("docker", docker())):
        (OUT / f"{name}-gpu.json").write_text(json.dumps(template, indent=1) + "\n")
        print(f"wrote {OUT / f'{name}-gpu.json'}")
