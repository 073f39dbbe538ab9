"""Experiment tracking: a small protocol and its MLflow implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hero_ml.errors import HeroError

NOISE_POOL_ARTIFACT = "noise_pool"  # a HERO run's last guidance pool, beside its LoRA (hero_ml/guidance.py)


class TrackingError(HeroError, RuntimeError):
    """The tracking server failed or cannot be reached. A run's own state never depends on it: each
    round is stored and checkpointed before it is tracked, and a resumed run tracks what was missed."""


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None:
        """Flat or nested params (nested keys are joined with '.'); secrets must be masked already."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """An (H, W, 3) uint8 image, e.g. a round's grid."""

    def log_artifacts(self, folder: Path, artifact_path: str) -> None: ...

    def log_lora(self, lora_folder: Path, base_model: str) -> None:
        """The LoRA saved by `save_lora`, as a model that references (never copies) `base_model`."""

    def register_lora(self, registered_model: str, tags: dict[str, str]) -> str:
        """Register the logged LoRA as a version of `registered_model` (once per run and round: a
        second call returns the version the first made). Returns the version."""

    def finish(self, status: str = "FINISHED") -> None: ...
