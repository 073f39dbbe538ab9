"""Flows on the model registry: `hero-promote` (evaluate a LoRA against the champion, move the alias
on a win; after each training, the LoRA that training registered) and `hero-generate-samples` (images
from a registered LoRA, e.g. @champion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flows.training import deployed_run_id, resolve_config
from hero_ml.adapters.storage import open_store
from hero_ml.adapters.tracking.registry import PromotionDecision
from hero_ml.promotion import BaseModelChangeError, generate_from_registry, open_registry, promote_version
from hero_ml.run_store import RunStore

FLOW_RUN_RESOURCE = "prefect.flow-run."  # how an event names a flow run: prefect.flow-run.<id>


@flow(name="hero-promote", validate_parameters=False)
def promote(
    version: str | None = None,
    config: dict[str, Any] | None = None,
    after_flow_run: str | None = None,
    allow_base_change: bool = False,
) -> PromotionDecision | None:
    """Compare registry `version` (default: the latest) with the champion (hero_ml.promotion).

    after_flow_run: a finished hero-training flow run (its id, or the event resource the after-training
    trigger passes): the version that run registered is the challenger, so runs that finish together
    each have their own judged. Nothing to do (None) when it registered none, it is the champion, or
    it was trained on another base model than the champion and allow_base_change is false (a person
    decides that). allow_base_change: judge a version of another base model than the champion's."""
    if type(allow_base_change) is not bool:  # unvalidated: the string "false" would be true
        raise ValueError(f"allow_base_change: true or false, got {allow_base_change!r}")
    resolved = resolve_config(None, config)
    logger = get_run_logger()
    if after_flow_run is not None:
        run_id = trained_run(after_flow_run)
        registry = open_registry(resolved)
        tracking = RunStore(open_store(resolved.storage), run_id).load_tracking()
        tracked_in = None if tracking is None else tracking.tracker_run_id
        mine = None if tracked_in is None else registry.version_of_run(tracked_in)
        champion = registry.champion()
        if mine is None or (champion is not None and champion.version == mine.version):
            logger.info(
                "run %s: %s, nothing to promote",
                run_id,
                "no LoRA version registered" if mine is None else f"version {mine.version} is the champion",
            )
            return None
        if "hero.task" not in mine.tags:  # a real model's run (simulation.task null): no judge
            logger.info(
                "run %s: version %s has no toy task to be judged on: evaluate it with people and point "
                "the alias at it by hand (hero registry alias %s)",
                run_id,
                mine.version,
                mine.version,
            )
            return None
        try:
            decision = promote_version(resolved, mine.version, allow_base_change=allow_base_change)
        except BaseModelChangeError as err:
            logger.warning("run %s: %s", run_id, err)
            return None
    else:
        decision = promote_version(resolved, version, allow_base_change=allow_base_change)
    logger.info(
        "version %s: %.3f vs %s: %.3f (gain %+.3f, margin %.3f): %s",
        decision.challenger,
        decision.challenger_rate,
        decision.incumbent,
        decision.incumbent_rate,
        decision.gain,
        decision.margin,
        "promoted" if decision.promoted else "not promoted",
    )
    return decision


def trained_run(flow_run: str) -> str:
    """The HERO run a hero-training flow run (`<id>` or `prefect.flow-run.<id>`) trained."""
    try:
        flow_run_id = UUID(flow_run.removeprefix(FLOW_RUN_RESOURCE))
    except ValueError:
        raise ValueError(
            f"after_flow_run {flow_run!r} is not a flow run id: pass its UUID or prefect.flow-run.<UUID>"
        ) from None
    with get_client(sync_client=True) as client:
        try:
            found = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            raise ValueError(f"after_flow_run {flow_run!r}: no such flow run on the Prefect server") from None
    return deployed_run_id(found.parameters, found.name)


@flow(name="hero-generate-samples", validate_parameters=False)
def generate_samples(
    prompt: str,
    out: str,
    model_uri: str | None = None,
    count: int = 8,
    seed: int = 0,
    guided: bool = False,
    config: dict[str, Any] | None = None,
) -> list[str]:
    """`count` images of `prompt` from `model_uri` (default: the champion), written as PNGs and a
    grid to folder `out`; guided: from the noise pool the version's run left, not plain noise."""
    resolved = resolve_config(None, config)
    tracking = resolved.tracking
    uri = model_uri or f"models:/{tracking.registered_model}@{tracking.champion_alias}"
    version, paths, _ = generate_from_registry(resolved, uri, prompt, count, Path(out), seed, guided)
    get_run_logger().info("%d images of %s version %s in %s", len(paths), version.name, version.version, out)
    return [str(path) for path in paths]
