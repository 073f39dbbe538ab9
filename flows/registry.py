"""Flows on the model registry: `hero-promote` (evaluate the latest LoRA against the champion, move
the alias on a win) and `hero-generate-samples` (images from a registered LoRA, e.g. @champion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.training import resolve_config
from hero_ml.adapters.tracking.registry import PromotionDecision
from hero_ml.promotion import generate_from_registry, promote_version


@flow(name="hero-promote", validate_parameters=False)
def promote(version: str | None = None, config: dict[str, Any] | None = None) -> PromotionDecision:
    """Compare registry `version` (default: the latest) with the champion (hero_ml.promotion)."""
    decision = promote_version(resolve_config(None, config), version)
    get_run_logger().info(
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
