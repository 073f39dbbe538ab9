"""The deployments of a HERO installation, created against a Prefect server by `hero deploy`.

    hero-training/on-demand     a training run when triggered (parameters: run_id, config overrides)
    hero-training/scheduled     the same on a cron schedule (only with --training-cron); each run is
                                named after its flow run
    hero-promote/after-training evaluate the LoRA version a completed hero-training run
                                registered against the champion (an event trigger)
    hero-generate-samples/on-demand
    hero-poll-rounds/poller     resume suspended rounds whose webhook events were lost, every
                                orchestration.poll_interval_s

Deploying again updates them in place. A hero-poll-rounds deployment of another name (an older
release's every-<n>s) is removed, as it would poll beside the current one; the training schedule is
kept when --training-cron is not given, and removed with --training-cron off.

GPU work goes to the GPU pool, whose concurrency limit is its number of GPUs (of workers, where each
spans a GPU group): a suspended run holds no slot, so one GPU runs one round at a time however many
runs wait for annotators. The poller runs
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
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.workers.process import ProcessWorker
from pydantic import ValidationError

from flows.registry import generate_samples, promote
from flows.training import hero_training
from flows.waiting import poll_rounds
from hero_ml.errors import HeroError

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "work_pools"


@dataclass(frozen=True)
class DeployPlan:
    gpu_pool: str = "hero-gpu"
    # process | docker | kubernetes (see base_job_template); None: an existing pool's, else process
    gpu_pool_type: str | None = None
    service_pool: str = "hero-services"
    gpus: int | None = None  # the GPU pool's concurrency limit; None keeps an existing pool's (a new one: 1)
    poll_interval_s: int = 300
    # e.g. "0 2 * * 1": Mondays at 02:00 UTC; None keeps a schedule deployed before,
    # TRAINING_CRON_OFF removes it
    training_cron: str | None = None
    source: str = str(REPO_ROOT)  # where workers find flows/ (the image's /app in production)


POOL_TYPES = ("process", "docker", "kubernetes")
TRAINING_CRON_OFF = "off"
POLLER = "hero-poll-rounds/poller"
SCHEDULED = "hero-training/scheduled"


class DeployError(HeroError, ValueError):
    """What is deployed already does not fit what was asked; the message says what to change."""


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


def ensure_pool(
    name: str, concurrency_limit: int | None, pool_type: str | None = None, new_limit: int | None = None
) -> tuple[bool, str, int | None]:
    """A work pool `name` with this concurrency limit: (whether it was created, its type, its limit).
    concurrency_limit None: an existing pool keeps its own (a redeploy must not undo an operator's
    setting), a new one gets `new_limit` (None: no limit). A new pool is of `pool_type` (None:
    process); an existing one keeps its type and template, and asking for another type is refused."""
    kind = pool_type or "process"
    limit = new_limit if concurrency_limit is None else concurrency_limit
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=kind,
                    base_job_template=base_job_template(kind),
                    concurrency_limit=limit,
                )
            )
            return True, kind, limit
        except ObjectAlreadyExists:
            pool = client.read_work_pool(name)
            existing = pool.type
            if pool_type is not None and existing != pool_type:
                raise DeployError(
                    f"work pool {name} exists as a {existing} pool, not {pool_type}: leave out --pool-type "
                    f"(or give {existing}) to keep it, choose another pool name, or delete it (prefect "
                    f"work-pool delete {name}) once no flow run waits in it"
                ) from None
            if concurrency_limit is None:
                return False, existing, pool.concurrency_limit
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
            return False, existing, concurrency_limit


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


def deploy(plan: DeployPlan) -> tuple[dict[str, UUID], list[str]]:
    """Create or update every deployment (idempotent: deploying again updates them in place); remove
    pollers of other names and, with --training-cron off, the training schedule. Returns the deployed
    ids by name, and what was said about the others (removed or kept)."""
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
            # one at a time: each judges its LoRA against the champion it would replace (runs that
            # finish together queue; Registry.promote also re-judges against a champion moved meanwhile)
            concurrency_limit=1,
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
        POLLER: _deploy(
            plan,
            poll_rounds,
            "flows/waiting.py:poll_rounds",
            POLLER.split("/")[1],
            work_pool_name=plan.service_pool,
            interval=plan.poll_interval_s,
            # one poll at a time; one due while another runs is dropped, not queued (after a service
            # worker's outage, queued polls would run back to back: each checks every round anyway)
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            description="Resume suspended rounds whose webhook events were lost.",
        ),
    }
    notes = []
    if plan.training_cron not in (None, TRAINING_CRON_OFF):
        ids[SCHEDULED] = _deploy(
            plan,
            hero_training,
            "flows/training.py:hero_training",
            SCHEDULED.split("/")[1],
            work_pool_name=plan.gpu_pool,
            cron=plan.training_cron,
            description="A HERO training run on a schedule, named after its flow run.",
        )
    with get_client(sync_client=True) as client:
        pollers = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[poll_rounds.name]))
        )
        for stale in (d for d in pollers if d.id != ids[POLLER]):
            client.delete_deployment(stale.id)
            notes.append(f"{poll_rounds.name}/{stale.name}: removed (it would poll beside {POLLER})")
        if plan.training_cron in (None, TRAINING_CRON_OFF):
            try:
                scheduled = client.read_deployment_by_name(SCHEDULED)
            except ObjectNotFound:
                scheduled = None
            if scheduled is not None and plan.training_cron == TRAINING_CRON_OFF:
                client.delete_deployment(scheduled.id)
                notes.append(f"{SCHEDULED}: removed (--training-cron off)")
            elif scheduled is not None:
                notes.append(f"{SCHEDULED}: kept as it was (--training-cron off removes it)")
    return ids, notes
