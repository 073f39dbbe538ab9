"""The deployments of a HERO installation, created against a Prefect server by `hero deploy`.

    hero-training/on-demand     a training run when triggered (parameters: run_id, config overrides)
    hero-training/scheduled     the same on a cron schedule (only with --training-cron); each run is
                                named after its flow run
    hero-promote/after-training evaluate the LoRA version a completed hero-training run
                                registered against the champion (an event trigger)
    hero-generate-samples/on-demand
    hero-poll-rounds/every-<n>s resume suspended rounds whose webhook events were lost

GPU work goes to the GPU pool, whose concurrency limit is its number of GPUs: a suspended run holds
no slot, so one GPU runs one round at a time however many runs wait for annotators. The poller runs
on a small service pool. Workers need the HERO_* environment (service URLs and secrets) and
optionally HERO_CONFIG_FILE; parameters carry only public per-run choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker
from pydantic import ValidationError

from flows.registry import generate_samples, promote
from flows.training import hero_training
from flows.waiting import poll_rounds

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "work_pools"


@dataclass(frozen=True)
class DeployPlan:
    gpu_pool: str = "hero-gpu"
    gpu_pool_type: str = "process"  # process | docker | kubernetes (see base_job_template)
    service_pool: str = "hero-services"
    gpus: int = 1  # the GPU pool's concurrency limit
    poll_interval_s: int = 300
    training_cron: str | None = None  # e.g. "0 2 * * 1": Mondays at 02:00 (the server's time zone)
    source: str = str(REPO_ROOT)  # where workers find flows/ (the image's /app in production)


POOL_TYPES = ("process", "docker", "kubernetes")


def cron_problem(expression: str) -> str | None:
    """Why Prefect would refuse `expression` as a schedule, or None: asked before anything is created
    (the server checks it only after the pools and the other deployments exist)."""
    try:
        CronSchedule(cron=expression)
    except ValidationError as err:
        return "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in err.errors())
    return None


def base_job_template(pool_type: str) -> dict[str, Any]:
    """How a pool's worker starts a flow run. process: in the worker's environment; docker and
    kubernetes: a container of the HERO worker image with one NVIDIA GPU and the HERO secrets
    (flows/work_pools/, written from the Prefect workers' own templates by
    infra/make-work-pool-templates.py)."""
    if pool_type == "process":
        return ProcessWorker.get_default_base_job_template()
    if pool_type not in POOL_TYPES:
        raise ValueError(f"pool type {pool_type!r}: choose one of {', '.join(POOL_TYPES)}")
    return cast(dict[str, Any], json.loads((TEMPLATES / f"{pool_type}-gpu.json").read_text()))


def ensure_pool(name: str, concurrency_limit: int | None, pool_type: str = "process") -> bool:
    """A work pool `name` of `pool_type` with this concurrency limit; True when it was created (an
    existing pool keeps its type and template, and gets the limit)."""
    template = base_job_template(pool_type)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=pool_type,
                    base_job_template=template,
                    concurrency_limit=concurrency_limit,
                )
            )
            return True
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
            return False


def _deploy(
    plan: DeployPlan, flow_object: Flow[..., Any], entrypoint: str, name: str, **options: Any
) -> UUID:
    deployment = cast(Flow[..., Any], flow_object.from_source(source=plan.source, entrypoint=entrypoint))
    deployed = deployment.deploy(
        name=name,
        tags=["hero"],
        build=False,  # no image: workers run the source in place (a process pool, or an image of it)
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # Prefect's advice to .serve instead: process pools are meant here
        enforce_parameter_schema=False,  # config overrides are free-form; hero_ml validates them
        **options,
    )
    return cast(UUID, deployed)


def deploy(plan: DeployPlan) -> dict[str, UUID]:
    """Create or update every deployment (idempotent: deploying again updates them in place)."""
    ids = {
        "hero-training/on-demand": _deploy(
            plan,
            hero_training,
            "flows/training.py:hero_training",
            "on-demand",
            work_pool_name=plan.gpu_pool,
            description="A HERO training run: rounds until the feedback budget is spent.",
        ),
        "hero-promote/after-training": _deploy(
            plan,
            promote,
            "flows/registry.py:promote",
            "after-training",
            work_pool_name=plan.gpu_pool,
            description="Promote a training's LoRA if it beats the champion; runs after each training.",
            triggers=[
                DeploymentEventTrigger(
                    expect={"prefect.flow-run.Completed"},
                    match_related={"prefect.resource.role": "flow", "prefect.resource.name": "hero-training"},
                    parameters={"after_flow_run": "{{ event.resource.id }}"},  # prefect.flow-run.<id>
                )
            ],
        ),
        "hero-generate-samples/on-demand": _deploy(
            plan,
            generate_samples,
            "flows/registry.py:generate_samples",
            "on-demand",
            work_pool_name=plan.gpu_pool,
            description="Images from a registered LoRA (default: the champion).",
        ),
        f"hero-poll-rounds/every-{plan.poll_interval_s}s": _deploy(
            plan,
            poll_rounds,
            "flows/waiting.py:poll_rounds",
            f"every-{plan.poll_interval_s}s",
            work_pool_name=plan.service_pool,
            interval=plan.poll_interval_s,
            concurrency_limit=1,
            description="Resume suspended rounds whose webhook events were lost.",
        ),
    }
    if plan.training_cron:
        ids["hero-training/scheduled"] = _deploy(
            plan,
            hero_training,
            "flows/training.py:hero_training",
            "scheduled",
            work_pool_name=plan.gpu_pool,
            cron=plan.training_cron,
            description="A HERO training run on a schedule, named after its flow run.",
        )
    return ids
