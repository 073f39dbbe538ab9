"""A training run starts its own processes (model.processes): one of several that torchrun / accelerate
launch started is refused before it touches the run (launched twice, both processes ran the whole run and
fought over its lease)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hero_ml.adapters.storage import LocalStore
from hero_ml.cli import app
from hero_ml.config import HeroConfig
from hero_ml.training import RunError, TrainingRun, multi_process_launch


def test_one_process_of_a_multi_process_launch_is_refused_before_it_touches_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert multi_process_launch() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert multi_process_launch() is None
    monkeypatch.setenv("WORLD_SIZE", "two")  # not even a number: refused, said as it was given
    assert "WORLD_SIZE=two" in (multi_process_launch() or "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match=r"WORLD_SIZE=2.*HERO_MODEL__PROCESSES=2"):
        TrainingRun(HeroConfig(run_id="parallel"), LocalStore(tmp_path))
    assert not any(tmp_path.iterdir())  # no lease, no config


def test_hero_run_under_a_launcher_says_why_before_loading_anything() -> None:
    result = CliRunner().invoke(app, ["run", "--run-id", "parallel"], env={"WORLD_SIZE": "2"})
    assert result.exit_code == 1 and "WORLD_SIZE=2" in result.output and "without torchrun" in result.output
