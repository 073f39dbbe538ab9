"""Sample one round with the configured model and commit it to the run's storage (`hero sample`).

The same batch and layout a training round has (hero_ml/run_store.py): images, grid and trajectory,
then the manifest that commits them. Rounds are immutable: a committed round is never sampled again;
an interrupted one (no manifest) is sampled anew and its objects overwritten.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from hero_ml import __version__
from hero_ml.adapters.storage import open_store
from hero_ml.config import HeroConfig
from hero_ml.diffusion.pipeline import RANDOM_PREFIX, load_configured_pipeline
from hero_ml.engine import sample_batch
from hero_ml.errors import HeroError
from hero_ml.run_lease import LeasedStore, RunLease
from hero_ml.run_store import RunStore


class RoundExistsError(HeroError, FileExistsError):
    """The round is already committed; rounds are immutable."""


@dataclass(frozen=True)
class SampledRound:
    folder: str  # where the round lives: a path or an s3:// URI
    manifest: dict


def sample_round(
    config: HeroConfig,
    round_index: int = 0,
    *,
    on_model_loaded: Callable[[], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> SampledRound:
    """Load the configured model, sample `images_per_round` images of the prompt, commit the round.
    A committed round or a model that does not load is refused before anything is written."""
    store = open_store(config.storage)
    _refuse_a_committed_round(RunStore(store, config.run_id), config.run_id, round_index)
    pipe = load_configured_pipeline(config.model)
    if on_model_loaded is not None:
        on_model_loaded()
    with RunLease(store, config.run_id) as lease:  # not while a training process writes the run
        runs = RunStore(LeasedStore(store, lease), config.run_id)
        _refuse_a_committed_round(runs, config.run_id, round_index)  # committed meanwhile by another
        return _sample_round(config, runs, pipe, round_index, on_step)


def _refuse_a_committed_round(runs: RunStore, run_id: str, round_index: int) -> None:
    if runs.has_batch(round_index):
        raise RoundExistsError(
            f"round {round_index} of run {run_id!r} is already committed at "
            f"{runs.store.where(runs.round_prefix(round_index))}; rounds are immutable: choose another "
            "run_id (HERO_RUN_ID) to sample again"
        )


def _sample_round(
    config: HeroConfig,
    runs: RunStore,
    pipe: StableDiffusionPipeline,
    round_index: int,
    on_step: Callable[[], None] | None,
) -> SampledRound:
    folder = runs.store.where(runs.round_prefix(round_index))
    started = time.perf_counter()
    batch = sample_batch(pipe, config.sampling, round_index, on_step=on_step)
    sampling = config.sampling
    random_weights = config.model.source.startswith(RANDOM_PREFIX)
    manifest = runs.commit_batch(
        batch,
        {
            "model": config.model.source,
            "note": (
                "random weights: these images are noise-like and mean nothing; they show the pipeline works"
                if random_weights
                else "sampled from the configured model"
            ),
            "prompt": sampling.prompt,
            "images": sampling.images_per_round,
            "num_steps": sampling.num_steps,
            "eta": sampling.eta,
            "guidance_scale": sampling.guidance_scale,
            "seed": [sampling.seed, round_index],
            "sampling_seconds": round(time.perf_counter() - started, 3),
            "hero_version": __version__,
            "torch": torch.__version__,
            "machine": platform.platform(),
        },
    )
    return SampledRound(folder=folder, manifest=manifest)
