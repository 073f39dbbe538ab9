"""Resuming hero-training flow runs whose round waits for annotators, once the round may close.

Two triggers share one check: the webhook receiver (flows/webhooks.py) on Label Studio's annotation
events, and the poller (`hero rounds poll`, the hero-poll-rounds deployment) for events that were
lost. Either may fire any number of times for a round, from any process: the flow run is resumed
only while it is suspended for exactly that round, and Prefect accepts one resume of a pause (a second
is refused as "not paused"), so duplicates and late events do nothing.

The check runs with the service's own config (the environment: storage, Label Studio, secrets) and
the waiting run's stored config for its policy (annotators per image, deadline).
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStateName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound

from flows.training import deployed_run_id, resolve_config, round_of_pause_key
from hero_ml.adapters.storage import ArtifactStore, open_store
from hero_ml.config import ConfigError, HeroConfig, restore_config, with_overrides
from hero_ml.errors import HeroError
from hero_ml.labelling import LabelStudioRounds, open_projects
from hero_ml.run_store import RunStore

SUSPENDED_PAGE = 200  # flow runs a request (Prefect's server answers at most its own page size)


@dataclass(frozen=True)
class ResumeResult:
    flow_run_id: str
    run_id: str | None
    round: int | None
    resumed: bool
    reason: str  # why it was resumed, or why not


def resume_pause(flow_run_id: UUID, pause_key: str | None) -> str | None:
    """Resume the flow run if it still waits in the pause `pause_key` was read from; why not, else.
    The check took a while: a trigger beside this one may have resumed the run meanwhile, and the run
    may already wait for its next round, which this check's evidence is not about."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is None or not state.is_paused():
            return "resumed already"
        if state.state_details.pause_key != pause_key:
            return (
                f"resumed already; it now waits for round {round_of_pause_key(state.state_details.pause_key)}"
            )
        answer = client.resume_flow_run(flow_run_id)
    if answer.status != SetStateStatus.ACCEPT:  # ABORT: no longer paused (raced), REJECT: expired
        return f"Prefect did not resume it ({answer.status.value}: {getattr(answer.details, 'reason', None)})"
    return None


class RoundResumer:
    def __init__(self, config: HeroConfig, store: ArtifactStore | None = None):
        self.config = config
        self.store = store if store is not None else open_store(config.storage)
        self.projects = open_projects(config)

    def run_config(self, run_id: str) -> HeroConfig:
        """The waiting run's config (stored with the run), with this service's service settings
        (config.SERVICE_SETTINGS: its servers, keys and secrets)."""
        runs = RunStore(self.store, run_id)
        stored = runs.load_config()
        if stored is None:
            raise ConfigError(f"no run {run_id!r} in {self.store.where('runs')}")
        return restore_config(stored, with_overrides(self.config, {"run_id": run_id}))

    def resume_if_ready(self, flow_run_id: str, run_id: str, round_index: int | None = None) -> ResumeResult:
        """Resume flow run `flow_run_id` if it is suspended for a round of `run_id` (for round_index,
        when given: the round an event is about) and that round may close now, or has tasks to publish
        again (Readiness.republish: deleted in Label Studio, it would wait on them for ever)."""

        def result(resumed: bool, reason: str, k: int | None = round_index) -> ResumeResult:
            return ResumeResult(flow_run_id, run_id, k, resumed, reason)

        with get_client(sync_client=True) as client:
            try:
                flow_run = client.read_flow_run(UUID(flow_run_id))
            except (ObjectNotFound, ValueError):
                return result(False, "no such flow run")
        state = flow_run.state
        if state is None or not state.is_paused():
            return result(False, f"not waiting (state {state.name if state else None})")
        waiting_for = round_of_pause_key(state.state_details.pause_key)
        if waiting_for is None:
            return result(False, "paused, but not for a HERO round")
        if (trains := deployed_run_id(flow_run.parameters, flow_run.name)) != run_id:  # an edited task
            return result(False, f"the flow run trains run {trains!r}, not {run_id!r}")
        if round_index is not None and waiting_for != round_index:
            return result(False, f"waits for round {waiting_for}, not {round_index}", waiting_for)
        try:
            config = self.run_config(run_id)
            humans = LabelStudioRounds(config, RunStore(self.store, run_id), self.projects)
            readiness = humans.readiness(waiting_for)
        except (HeroError, KeyError) as err:  # e.g. Label Studio or S3 down, a run id no store takes
            return result(False, f"cannot check round {waiting_for}: {err}", waiting_for)
        if not (readiness.ready or readiness.republish):  # republish: the round publishes when entered
            return result(False, readiness.reason, waiting_for)
        refused = resume_pause(UUID(flow_run_id), state.state_details.pause_key)
        if refused is not None:
            return result(False, refused, waiting_for)
        return result(True, readiness.reason, waiting_for)

    def suspended_runs(self) -> list[FlowRun]:
        """Every suspended hero-training flow run, page by page (the server answers at most a page of
        flow runs a request)."""
        flow_runs: list[FlowRun] = []
        with get_client(sync_client=True) as client:
            while True:
                page = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["hero-training"])),
                    flow_run_filter=FlowRunFilter(
                        state=dict(name=FlowRunFilterStateName(any_=["Suspended"]))
                    ),
                    sort=FlowRunSort.ID_DESC,  # a stable order across the pages
                    limit=SUSPENDED_PAGE,
                    offset=len(flow_runs),
                )
                flow_runs += page
                if len(page) < SUSPENDED_PAGE:
                    break
        return flow_runs

    def poll(self) -> list[ResumeResult]:
        """Check every suspended hero-training run once; resume those whose round may close. A run
        whose check fails unexpectedly is reported with the error, and the others are still checked."""
        results = []
        for flow_run in self.suspended_runs():
            flow_run_id, run_id = str(flow_run.id), None
            try:  # its run id too: a flow run an older release started may name none this one reads
                run_id = deployed_run_id(flow_run.parameters, flow_run.name)
                results.append(self.resume_if_ready(flow_run_id, run_id))
            except Exception as err:  # one run's failure must not strand every other run's round
                results.append(ResumeResult(flow_run_id, run_id, None, False, f"check failed: {err!r}"))
        return results


@flow(name="hero-poll-rounds")
def poll_rounds() -> list[ResumeResult]:
    """The fallback for lost webhook events: resume every suspended run whose round may close."""
    logger = get_run_logger()
    results = RoundResumer(resolve_config(None, None)).poll()
    for item in results:
        logger.info(
            "flow run %s (run %s, round %s): %s%s",
            item.flow_run_id,
            item.run_id,
            item.round,
            "resumed, " if item.resumed else "",
            item.reason,
        )
    return results
