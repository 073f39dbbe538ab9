"""Sample one round and commit it to the run's folder: images, grid, trajectory, then the manifest.

The manifest is written last, so a round folder without one is an interrupted round, never a
complete-looking half round. Rounds are immutable: a committed round is never sampled again.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image

from hero_ml import __version__
from hero_ml.config import HeroConfig
from hero_ml.diffusion.pipeline import DTYPES, RANDOM_PREFIX, load_pipeline
from hero_ml.diffusion.sampler import Trajectory, per_image_generators, sample_trajectories
from hero_ml.images import image_grid

MANIFEST = "manifest.json"
TRAJECTORY = "trajectory.safetensors"
GRID = "grid.png"


class RoundExistsError(FileExistsError):
    """The round is already committed; rounds are immutable."""


@dataclass(frozen=True)
class SampledRound:
    folder: Path
    trajectory: Trajectory
    manifest: dict


def round_folder(config: HeroConfig, round_index: int) -> Path:
    return config.storage.local_root / "runs" / config.run_id / "rounds" / str(round_index)


def sample_round(
    config: HeroConfig,
    round_index: int = 0,
    *,
    on_model_loaded: Callable[[], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> SampledRound:
    """Load the configured model, sample `images_per_round` images of the prompt, commit the round."""
    folder = round_folder(config, round_index)
    if (folder / MANIFEST).exists():
        raise RoundExistsError(
            f"round {round_index} of run {config.run_id!r} is already committed at {folder}; "
            "rounds are immutable: choose another run_id (HERO_RUN_ID) to sample again"
        )
    if config.storage.backend != "local":
        raise NotImplementedError("the s3 storage backend is not implemented yet; use storage.backend=local")

    pipe = load_pipeline(
        config.model.source,
        dtype=DTYPES[config.model.dtype],
        device=config.model.device,
        allow_download=config.model.allow_download,
        seed=config.model.seed,
    )
    if on_model_loaded is not None:
        on_model_loaded()

    sampling = config.sampling
    count = sampling.images_per_round
    started = time.perf_counter()
    trajectory = sample_trajectories(
        pipe,
        [sampling.prompt] * count,
        per_image_generators((sampling.seed, round_index), count),
        num_steps=sampling.num_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        negative_prompt=sampling.negative_prompt,
        sub_batch_size=sampling.sub_batch_size,
        storage_dtype=DTYPES[sampling.storage_dtype],
        on_step=on_step,
    )
    seconds = time.perf_counter() - started

    if folder.exists():  # an interrupted round (no manifest): discard its leftovers, then write anew
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = {TRAJECTORY: folder / TRAJECTORY, GRID: folder / GRID}
    trajectory.save(files[TRAJECTORY])
    image_grid(trajectory.images).save(files[GRID])
    for index, image in enumerate(trajectory.images):
        name = f"images/{index:04d}.png"
        files[name] = folder / name
        files[name].parent.mkdir(exist_ok=True)
        Image.fromarray(image.numpy()).save(files[name])

    random_weights = config.model.source.startswith(RANDOM_PREFIX)
    manifest = {
        "run_id": config.run_id,
        "round": round_index,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": config.model.source,
        "note": (
            "random weights: these images are noise-like and mean nothing; they show the pipeline works"
            if random_weights
            else "sampled from the configured model"
        ),
        "prompt": sampling.prompt,
        "images": count,
        "num_steps": sampling.num_steps,
        "eta": sampling.eta,
        "guidance_scale": sampling.guidance_scale,
        "seed": [sampling.seed, round_index],
        "sampling_seconds": round(seconds, 3),
        "hero_version": __version__,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "files": {name: _describe(path) for name, path in files.items()},
    }
    # Written last: its presence is what commits the round.
    temporary = folder / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2))
    temporary.replace(folder / MANIFEST)
    return SampledRound(folder=folder, trajectory=trajectory, manifest=manifest)


def _describe(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
