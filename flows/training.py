"""The `hero-training` flow: hero-round after hero-round until the feedback budget is spent.

It only orchestrates hero_ml. On embedded defaults (simulated annotators, no Prefect server) it runs
in Prefect's ephemeral mode inside the calling process. With Label Studio, a round that waits for
annotators *suspends* the flow run when it runs from a deployment: the process (and its GPU) is
released, and the webhook receiver or the poller (flows/waiting.py) resumes it once the round may
close. A resumed run starts again from the top in a new process: the run reopens at its latest
checkpoint and the waiting round's steps find their committed work (see flows/round.py). Run outside
a deployment, the flow waits in its process instead, checking every orchestration.poll_interval_s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import Pause
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import deployment, flow_run

from flows.round import check_labelling, hero_round
from hero_ml.adapters.label_studio.client import LabelStudioError
from hero_ml.adapters.storage import open_store
from hero_ml.adapters.tracking import TrackingError
from hero_ml.adapters.tracking.mlflow import open_tracker
from hero_ml.config import ConfigError, HeroConfig, load_config, restore_config, with_overrides
from hero_ml.engine import RoundStats
from hero_ml.labelling import LabelStudioRounds, open_projects
from hero_ml.run_lease import LeaseLostError
from hero_ml.run_store import RunStore
from hero_ml.training import Evaluation, TrainingRun, TrainingSummary

PAUSE_KEY_PREFIX = "hero-round-"  # a suspended run's pause key names its round: hero-round-<k>-<nonce>


def pause_key(round_index: int) -> str:
    # A fresh nonce each time: a flow run re-entered after a resume must be able to suspend again
    # (Prefect treats a key it has seen as already resumed).
    return f"{PAUSE_KEY_PREFIX}{round_index}-{uuid4().hex[:8]}"


def round_of_pause_key(key: str | None) -> int | None:
    """The round a suspended hero-training run waits for, from its pause key (None: not ours)."""
    if not key or not key.startswith(PAUSE_KEY_PREFIX):
        return None
    index = key.removeprefix(PAUSE_KEY_PREFIX).partition("-")[0]
    return int(index) if index.isdigit() else None


def deployed_run_id(parameters: dict[str, Any], flow_run_name: str) -> str:
    """The HERO run a deployment's hero-training flow run trains: its run_id parameter, else the run_id
    of its config overrides, else the flow run's name (e.g. a scheduled run). The flow and the poller
    both read it here, so they cannot disagree. A run_id that is not text is refused: Prefect's CLI
    reads `--param run_id=2026` as the number 2026, which must not start a run of the flow run's name."""
    config = parameters.get("config")
    for where, given in (("run_id", parameters.get("run_id")), ("config.run_id", _run_id_of(config))):
        if isinstance(given, str):
            return given
        if given is not None:
            raise ConfigError(
                f"parameter {where}: a run id is text, got the {type(given).__name__} {given!r}: quote it "
                f"in the parameters' JSON (\"{given}\"; Prefect's CLI reads --param run_id={given} as a "
                f"number: write --param 'run_id=\"{given}\"')"
            )
    return flow_run_name


def _run_id_of(config: Any) -> Any:
    return config.get("run_id") if isinstance(config, dict) else None


def resolve_config(run_id: str | None, config: HeroConfig | dict[str, Any] | None) -> HeroConfig:
    """A HeroConfig passed in process is used as it is. From a deployment, `config` is a dict of
    overrides (public values only: Prefect stores flow parameters) on top of the worker's own config:
    the file named by HERO_CONFIG_FILE, then HERO_* variables, which carry the secrets."""
    named = config.get("run_id") if isinstance(config, dict) else None
    if run_id is not None and named is not None and named != run_id:  # the overrides go on last: B
        raise ConfigError(
            f"the parameters name two runs, run_id {run_id!r} and config.run_id {named!r}: give one"
        )
    resolved = config if isinstance(config, HeroConfig) else with_overrides(load_config(), config or {})
    return resolved if run_id is None else with_overrides(resolved, {"run_id": run_id})


def moved_services(resolved: HeroConfig, worker: HeroConfig) -> list[str]:
    """The settings a flow run's overrides (`resolved`) moved away from the worker's own: where runs
    are stored and labelled, which the webhook receiver and the poller, with the workers' settings,
    must share with a suspended run to find and resume it."""
    return [
        name
        for name, moved in (
            ("storage", resolved.storage != worker.storage),
            ("label_studio.url", resolved.label_studio.url != worker.label_studio.url),
        )
        if moved
    ]


def with_stored_run(resolved: HeroConfig, overrides: dict[str, Any]) -> HeroConfig:
    """A deployment's config for a run that exists: the run's stored settings (the worker's file may
    have changed since the run started: new runs get the change, this one keeps its own), the worker's
    service settings, and the flow run's overrides on top (the same at every resume of the flow run;
    one that contradicts the stored run is refused by TrainingRun)."""
    stored = RunStore(open_store(resolved.storage), resolved.run_id).load_config()
    if stored is None:
        return resolved
    return with_overrides(restore_config(stored, resolved), overrides)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(run: TrainingRun, label: str) -> Evaluation | None:
    return run.evaluate(label)


@task(name="log-final-artifacts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)
def log_final_artifacts(run: TrainingRun) -> str | None:
    return run.log_final_artifacts()


@flow(name="hero-training", validate_parameters=False)
def hero_training(
    run_id: str | None = None,
    config: HeroConfig | dict[str, Any] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_round: Callable[[RoundStats], None] | None = None,
    on_wait: Callable[[int, str], None] | None = None,
) -> TrainingSummary:
    """Train run `run_id` until its feedback budget is spent, from its latest checkpoint. run_id
    defaults to the config's; from a deployment, to the flow run's name when the config overrides
    name none (deployed_run_id). config: a
    HeroConfig (in process) or overrides of the worker's config (deployments).

    The callbacks are for a caller in the same process (progress bars, a waiting round's reason) and
    may be None."""
    if deployment.id is not None and not isinstance(config, HeroConfig):
        run_id = deployed_run_id({"run_id": run_id, "config": config}, flow_run.name)
    resolved = resolve_config(run_id, config)
    if not isinstance(config, HeroConfig):
        if moved := moved_services(resolved, load_config()):
            raise ConfigError(
                f"config override of {', '.join(moved)}: where runs are stored and labelled is the "
                "workers' setting (HERO_CONFIG_FILE or HERO_* variables), not a flow run's: the webhook "
                "receiver and the round poller look for a run's rounds there, and would never resume it"
            )
        resolved = with_stored_run(resolved, config or {})
    logger = get_run_logger()
    # The run's lease first: a process refused the run must not touch the tracking of the one writing it.
    with TrainingRun(resolved, open_store(resolved.storage), on_progress=on_progress) as run:
        tracking = run.tracking()
        tracker = open_tracker(resolved, tracking.tracker_run_id, tracking.uid)
        try:
            run.track_with(tracker)
            humans = (
                LabelStudioRounds(resolved, run.runs, open_projects(resolved), tracker)
                if resolved.label_studio.enabled
                else None
            )
            this_run = None if flow_run.id is None else str(flow_run.id)
            for k in run.track_interrupted():
                logger.info("round %d was learned but its tracking was interrupted: tracked again", k)
            before = evaluate(run, "before")
            rounds = []
            while not run.done:
                k = run.engine.round
                outcome = hero_round(run, k, humans, this_run)
                if outcome.round != k:  # an outcome Prefect kept from another call: never learn from it
                    raise RuntimeError(f"hero-round {k} returned the outcome of round {outcome.round}")
                if outcome.stats is None:
                    assert humans is not None and outcome.waiting is not None
                    logger.info("round %d waits for annotators: %s", k, outcome.waiting.reason)
                    if on_wait is not None:
                        on_wait(k, outcome.waiting.reason)
                    _wait_for_annotators(humans, k, resolved)  # a suspension gives the lease back
                    continue  # the same round again: it now collects and learns
                rounds.append(outcome.stats)
                if on_round is not None:
                    on_round(outcome.stats)
            if humans is not None:
                try:  # what a failed withdrawal at the last rounds' collection left in annotators' queue
                    humans.withdraw_closed(run.engine.round)
                except LabelStudioError as err:
                    logger.warning("closed rounds' unfinished tasks stay in Label Studio: %s", err)
            after = evaluate(run, "after")
            after_guided = evaluate(run, "after_guided")
            version = log_final_artifacts(run)
        except Pause:
            raise  # suspended for annotators: the MLflow run goes on when the flow run resumes
        except TrackingError:
            raise  # the server is failing: marking the run FAILED would wait out its retries again
        except LeaseLostError:
            raise  # another process trains the run now, in this MLflow run: not ours to mark FAILED
        except BaseException:
            try:
                tracker.finish("FAILED")
            except TrackingError as err:  # the run's own error is the one to report
                logger.warning("%s", err)
            raise
        tracker.finish()
    return TrainingSummary(
        run_id=resolved.run_id,
        rounds=run.engine.round,
        feedbacks=run.engine.feedbacks,
        rounds_now=rounds,
        before=before,
        after=after,
        after_guided=after_guided,
        registered_version=version,
    )


def _wait_for_annotators(humans: LabelStudioRounds, round_index: int, config: HeroConfig) -> None:
    """Suspend the deployment's flow run (this raises Pause: the process ends); outside a
    deployment, wait here, checking every poll_interval_s, until the round may close."""
    if deployment.id is not None:
        suspend_flow_run(key=pause_key(round_index), timeout=None)
        return  # resumed within this process: re-enter the round
    while True:
        time.sleep(config.orchestration.poll_interval_s)
        try:
            readiness = check_labelling(humans, round_index)
            if readiness.ready or readiness.republish:  # entered again, the round publishes what is gone
                return
        except LabelStudioError as err:  # a restart of Label Studio must not end a run that waits
            get_run_logger().warning("cannot check round %d yet: %s", round_index, err)
