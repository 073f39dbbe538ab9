"""The `hero-round` flow: generate -> (publish -> is it labelled?) -> collect -> learn -> track.

Every step is idempotent per (run, round), so a round can be entered any number of times: the batch
committed before is reused, publishing again creates no task, and a round is learned once (its
checkpoint commits it; the next entry starts at the next round). With the simulated annotators the
round runs straight through; with Label Studio it returns `waiting` until the round may close by the
run's policy (or, once all its tasks are out, while Label Studio cannot be asked), and the caller
(hero_training) releases its process until a webhook or the poller resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from hero_ml.engine import RoundBatch, RoundStats
from hero_ml.feedback import FeedbackError, RoundFeedback
from hero_ml.labelling import LabelStudioError, LabelStudioRounds, Published, Readiness
from hero_ml.training import TrainingRun

# Tasks take the live run (models, optimisers): nothing to cache across processes, so Prefect persists
# no results here; the run store is what makes a step idempotent (see hero_ml/run_store.py).


@task(name="generate", cache_policy=NO_CACHE)
def generate_round(run: TrainingRun) -> RoundBatch:
    return run.generate()


@task(name="simulate-annotators", cache_policy=NO_CACHE)
def simulated_feedback(run: TrainingRun, batch: RoundBatch) -> RoundFeedback:
    return run.feedback(batch)


@task(name="publish", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120])
def publish_round(
    humans: LabelStudioRounds, run: TrainingRun, batch: RoundBatch, flow_run_id: str | None
) -> Published:
    """Tasks for the round in Label Studio (none created if they are there already)."""
    best = run.engine.best_image
    return humans.publish(
        batch.round,
        None if best is None else best.numpy(),
        flow_run_id=flow_run_id,
        rewards=run.engine.predicted_rewards(batch),
    )


@task(name="check-labelling", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120])
def check_labelling(humans: LabelStudioRounds, round_index: int) -> Readiness:
    return humans.readiness(round_index)


@task(name="collect-annotations", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120])
def collect_annotations(humans: LabelStudioRounds, round_index: int) -> RoundFeedback:
    return humans.collect(round_index)[0]


@task(name="learn", cache_policy=NO_CACHE)
def learn_round(run: TrainingRun, batch: RoundBatch, feedback: RoundFeedback) -> RoundStats:
    return run.learn(batch, feedback)


@task(name="track", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def track_round(run: TrainingRun, batch: RoundBatch, stats: RoundStats) -> None:
    run.track(batch, stats)


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    stats: RoundStats | None  # the learned round; None while it waits for annotators
    waiting: Readiness | None = None  # what the round still lacks


# persist_result=False: a resumed hero-training run is a rerun, and with result persistence on (a
# worker's PREFECT_RESULTS_PERSIST_BY_DEFAULT) Prefect would hand it this subflow's stored outcome
# ("waiting") instead of running it again: the round would suspend for ever.
@flow(name="hero-round", flow_run_name="round-{round_index}", validate_parameters=False, persist_result=False)
def hero_round(
    run: TrainingRun,
    round_index: int,
    humans: LabelStudioRounds | None = None,
    resume_flow_run_id: str | None = None,
) -> RoundOutcome:
    """Round `round_index` (the run's next) of `run`; humans: Label Studio, or None for the simulated
    annotators. resume_flow_run_id: the flow run that waits for this round (Label Studio tasks carry
    it, so that the webhook receiver knows what to resume)."""
    if round_index != run.engine.round:
        raise RuntimeError(f"hero-round {round_index} called on a run at round {run.engine.round}")
    batch = generate_round(run)
    if humans is None:
        feedback = simulated_feedback(run, batch)
    else:
        loaded = run.runs.load_feedback(round_index)  # collected before a crash: the same labels again
        if loaded is None:
            not_again = ""  # why publishing again failed, said beside whatever the round waits for
            try:
                publish_round(humans, run, batch, resume_flow_run_id)
            except LabelStudioError as err:
                published = run.runs.load_published(round_index)
                if published is None or published.imported_at is None:
                    raise  # tasks may be missing, which no one could label: waiting would strand it
                # entered again (resumed) with every task out: its labels are read all the same. A
                # labelled round needs no publishing, and waiting on a refusal that repeats (the
                # project's set-up refused, its tasks readable) would be resumed again for ever
                not_again = f"cannot publish round {round_index} again in Label Studio: {err}; "
                humans.publish_failed(round_index)  # should its tasks be gone, the next try waits a while
            try:
                readiness = check_labelling(humans, round_index)
                if not readiness.ready:
                    return RoundOutcome(round_index, None, Readiness(False, not_again + readiness.reason))
                loaded = collect_annotations(humans, round_index)
            except LabelStudioError as err:
                # published, so the round can wait: a suspended run is checked again by the poller
                # (and in process, every poll interval), where a failed one would wait for a person
                unreachable = f"{not_again}cannot check round {round_index} in Label Studio: {err}"
                return RoundOutcome(round_index, None, Readiness(False, unreachable))
            except FeedbackError as err:
                # check and collect are two reads: an annotation deleted or changed between them leaves
                # a round that is not complete any more; it waits for its labels again (a complete
                # round always aggregates)
                changed = Readiness(False, f"round {round_index} changed while it was collected: {err}")
                return RoundOutcome(round_index, None, changed)
        feedback = loaded
    stats = learn_round(run, batch, feedback)
    track_round(run, batch, stats)
    return RoundOutcome(round_index, stats)
