"""Experiment tracking: a small protocol and its MLflow implementation."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hero_ml.errors import HeroError

if TYPE_CHECKING:
    from hero_ml.config import ModelConfig

NOISE_POOL_ARTIFACT = "noise_pool"  # a HERO run's last guidance pool, beside its LoRA (hero_ml/guidance.py)


class TrackingError(HeroError, RuntimeError):
    """The tracking server failed or cannot be reached. A run's own state never depends on it: each
    round is stored and checkpointed before it is tracked, and a resumed run tracks what was missed."""


class Tracker(Protocol):
    run_id: str  # the tracker's own id of the run (MLflow's run id), which the run store records

    def log_params(self, params: dict[str, Any]) -> None:
        """Flat or nested params (nested keys are joined with '.'); secrets must be masked already."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Flat or nested tags, as params; a tag set again takes the new value."""

    def log_metrics(self, metrics: dict[str, float], step: int, at: datetime | None = None) -> None:
        """at: when the values were measured (default: now); logged again with the same time, step
        and values, they stay one point."""

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """An (H, W, 3) uint8 image, e.g. a round's grid."""

    def log_artifacts(self, folder: Path, artifact_path: str) -> None: ...

    def log_lora(
        self, lora_folder: Path, base: ModelConfig, base_weights: dict[str, str] | None = None
    ) -> None:
        """The LoRA saved by `save_lora`, as a model that references (never copies) the base model
        `base` describes (its source, dtype and seed); base_weights: that model's weights_sha256 as
        trained on, compared when the version is loaded."""

    def register_lora(self, registered_model: str, tags: dict[str, str]) -> str:
        """Register the logged LoRA as a version of `registered_model` (once per run and round: a
        second call returns the version the first made). Returns the version."""

    def finish(self, status: str = "FINISHED") -> None: ...


def unreachable(tracking_uri: str) -> str | None:
    """What is wrong when an HTTP tracking server does not answer at all (any HTTP status counts as an
    answer: a proxy may want credentials for /health); None when it answers or the URI is not HTTP.
    MLflow's client would retry a refused connection for minutes before saying so."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as err:
        return (
            f"MLflow at {tracking_uri} does not answer ({getattr(err, 'reason', err)}): start the tracking "
            "server (infra/mlflow-server.sh, docs/OPERATIONS.md) or set tracking.tracking_uri "
            "(HERO_TRACKING__TRACKING_URI)"
        )
    return None


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder of a SQLite tracking store, made if new (its artifacts go beside the database); None
    for a server. TrackingError, naming the setting, when it cannot be made."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(
            f"tracking.tracking_uri {tracking_uri}: cannot create the folder {folder} ({err.strerror}); "
            "point it at a folder that can hold the database (HERO_TRACKING__TRACKING_URI)"
        ) from None
    return folder
