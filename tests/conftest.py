"""Shared fixtures. Nothing here downloads: the hub is switched off for the whole test session."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect reads its settings once, at import: one scratch home for the whole session, quiet, and
# patient with the ephemeral server's start on a busy 2-core machine.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="hero-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hero_ml.diffusion.pipeline import build_random_pipeline

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_pipe() -> StableDiffusionPipeline:
    """A fresh tiny SD with seeded random weights, built from the real diffusers classes (0.1 s)."""
    return build_random_pipeline("tiny", seed=0)


@pytest.fixture(autouse=True)
def _clean_hero_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the HERO_* variables they set themselves."""
    for name in list(os.environ):
        if name.startswith("HERO_"):
            monkeypatch.delenv(name)
