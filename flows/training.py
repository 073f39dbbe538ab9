"""The `hero-training` flow: rounds of generate -> feedback -> learn -> track until the budget is spent.

It only orchestrates hero_ml.training.TrainingRun, whose steps are idempotent per (run, round): a
retried or resumed step reuses what was committed. On embedded defaults (no Prefect server) the flow
runs in Prefect's ephemeral mode inside the calling process.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from hero_ml.adapters.storage import open_store
from hero_ml.adapters.tracking.mlflow import open_tracker
from hero_ml.config import HeroConfig
from hero_ml.engine import RoundBatch, RoundStats
from hero_ml.feedback import RoundFeedback
from hero_ml.training import Evaluation, TrainingRun, TrainingSummary

# Tasks take the live run (models, optimisers): nothing to cache across processes, so no result
# persistence here; crash safety comes from the run's own storage (see hero_ml/run_store.py).


@task(name="generate", cache_policy=NO_CACHE)
def generate_round(run: TrainingRun) -> RoundBatch:
    return run.generate()


@task(name="collect-feedback", cache_policy=NO_CACHE)
def collect_feedback(run: TrainingRun, batch: RoundBatch) -> RoundFeedback:
    return run.feedback(batch)


@task(name="learn", cache_policy=NO_CACHE)
def learn_round(run: TrainingRun, batch: RoundBatch, feedback: RoundFeedback) -> RoundStats:
    return run.learn(batch, feedback)


@task(name="track", cache_policy=NO_CACHE)
def track_round(run: TrainingRun, batch: RoundBatch, stats: RoundStats) -> None:
    run.track(batch, stats)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(run: TrainingRun, label: str) -> Evaluation | None:
    return run.evaluate(label)


@flow(name="hero-training", validate_parameters=False)
def hero_training(
    config: HeroConfig,
    on_step: Callable[[], None] | None = None,
    on_round: Callable[[RoundStats], None] | None = None,
) -> TrainingSummary:
    """Train run `config.run_id` until its feedback budget is spent, from its latest checkpoint.

    Prefect records the parameters with secrets masked (they are SecretStr); the callbacks are for
    a caller in the same process (progress bars) and may be None."""
    tracker = open_tracker(config)
    try:
        run = TrainingRun(config, open_store(config.storage), tracker, on_step=on_step)
        before = evaluate(run, "before")
        rounds = []
        while not run.done:
            batch = generate_round(run)
            feedback = collect_feedback(run, batch)
            stats = learn_round(run, batch, feedback)
            track_round(run, batch, stats)
            rounds.append(stats)
            if on_round is not None:
                on_round(stats)
        after = evaluate(run, "after")
        version = run.log_final_artifacts()
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return TrainingSummary(
        run_id=config.run_id,
        rounds=run.engine.round,
        feedbacks=run.engine.feedbacks,
        rounds_now=rounds,
        before=before,
        after=after,
        registered_version=version,
    )
