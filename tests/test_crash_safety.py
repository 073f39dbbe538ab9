"""Crash safety by fault injection: `hero run` (toy model, simulated annotators, local storage, MLflow
on SQLite) is SIGKILLed at a named crash point of a round (hero_ml/faults.py), then resumed with
`hero run --resume`. For every point: the resumed run finishes, every round's stored feedback is the
uninterrupted run's (nothing lost), the store verifies (no half round looks committed), every round's
metrics and grid reach MLflow, and the final checkpoint is byte for byte the uninterrupted run's
(nothing learned twice, nothing skipped), at every point a run without Label Studio passes
(`pytest --long`, make test-long; docs/RELIABILITY.md has the table)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from hero_ml.adapters.storage import LocalStore
from hero_ml.adapters.tracking.mlflow import RUN_ID_TAG
from hero_ml.faults import CRASH_ENV, POINTS
from hero_ml.run_store import RunStore
from tests.conftest import tiny_run

pytestmark = pytest.mark.timeout(900)

ROUNDS = 3
HERO = str(Path(sys.executable).parent / "hero")
# (point, which pass): each kills the run inside a round, not only in the first one
# Each point is two `hero run` processes plus the uninterrupted run (a minute or two each here): all
# run with --long (CI runs them after `make test`, whose fault injection is test_label_studio.py's).
LONG = [
    ("checkpoint.tensors", 2),  # round 1
    ("commit.manifest", 2),  # round 1
    ("ddpo.step", 3),  # round 0
    ("sampling", 6),  # round 1, mid-sampling
    ("commit.images", 7),  # round 1, three of its four images stored
    ("feedback", 1),
    ("encoder", 2),
    ("checkpoint.progress", 3),
    ("track", 2),
]
SIMULATED_POINTS = {point for point, _ in LONG}


def test_every_point_but_label_studios_is_tried() -> None:
    assert set(POINTS) - {"publish", "collect"} == SIMULATED_POINTS  # those two: test_label_studio.py


def write_config(root: Path) -> Path:
    settings = {
        **tiny_run(images=4),
        "feedback": {"budget": 4 * ROUNDS},
        "simulation": {"eval_images": 0},
        "storage": {"local_root": str(root / "data")},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "register_lora": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def hero_run(config: Path, *args: str, crash_at: str | None = None) -> tuple[int, str]:
    """`hero run` in its own session; (return code, output). Whatever the killed process left running
    (the ephemeral Prefect server it started) is killed with its session, as a machine's crash would."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            [HERO, "run", "-c", str(config), *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        output.seek(0)
        return code, output.read()[-3000:]


def outcome(root: Path, run_id: str) -> dict:
    """What a finished run leaves: per-round feedback, the final tensors' sha256, tracked rounds."""
    runs = RunStore(LocalStore(root / "data"), run_id)
    latest = runs.latest_checkpoint()
    assert latest == ROUNDS - 1
    state = json.loads(
        (root / "data" / "runs" / run_id / "checkpoints" / str(latest) / "state.json").read_text()
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'"
    )
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "rounds")}
    return {
        "feedback": [runs.load_feedback(k) for k in range(ROUNDS)],
        "tensors": state["tensors"]["sha256"],
        "verify": runs.verify(),
        "status": run.info.status,
        "metric_steps": [m.step for m in client.get_metric_history(run.info.run_id, "good")],
        "grids": len(grids),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    code, output = hero_run(write_config(root), "--run-id", "steady")
    assert code == 0, output
    return outcome(root, "steady")


@pytest.mark.parametrize(
    ("point", "nth"),
    [pytest.param(point, nth, marks=pytest.mark.long) for point, nth in LONG],
)
def test_a_run_killed_at_a_crash_point_resumes_to_the_uninterrupted_result(
    point: str, nth: int, reference: dict, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    code, output = hero_run(config, "--run-id", "crashy", crash_at=f"{point}:{nth}")
    assert code == -signal.SIGKILL, f"not killed at {point}:{nth}:\n{output}"
    code, output = hero_run(config, "--resume", "crashy")
    assert code == 0, output

    result = outcome(tmp_path, "crashy")
    assert result["feedback"] == reference["feedback"]  # no annotation lost or changed
    assert result["tensors"] == reference["tensors"]  # nothing learned twice, nothing skipped
    assert result["verify"].problems == [] and result["verify"].incomplete == []
    assert result["status"] == "FINISHED" and result["grids"] == ROUNDS
    # every round tracked once: a round tracked again after a crash while tracking stays one point
    assert result["metric_steps"] == list(range(ROUNDS))
