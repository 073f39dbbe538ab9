"""MLflow tracking: one MLflow run per HERO run, recorded in the run (tracking.json) and found again
by its `hero.run_uid` tag when a crash came before it was recorded."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from hero_ml.adapters.tracking import TrackingError, sqlite_folder, unreachable
from hero_ml.adapters.tracking.registry import (
    MODEL_ARTIFACT,
    Registry,
    RegistryError,
    mlflow_message,
    open_client,
    save_lora_model,
)
from hero_ml.config import HeroConfig, ModelConfig

RUN_ID_TAG = "hero.run_id"
RUN_UID_TAG = "hero.run_uid"  # one HERO run, not any of its name (a name may be used again)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class MlflowTracker:
    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_id: str,
        artifact_location: str | None = None,
        mlflow_run_id: str | None = None,
        run_uid: str | None = None,
    ):
        """Open the MLflow run of HERO run `run_id`: `mlflow_run_id` (the one it was first tracked
        in, wherever `experiment` points now), else the one of the experiment tagged with the run's
        uid `run_uid`, else a new one (the experiment created if new). Never another run's that had
        the same name: its metrics, its LoRA artifact and its registered version are its own.
        A server that does not answer at all is reported at once; later calls ride out a restart
        with MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT)."""
        self.tracking_uri = tracking_uri
        self.hero_run_id = run_id
        if (problem := unreachable(tracking_uri)) is not None:
            raise TrackingError(problem)
        try:
            self.client = open_client(tracking_uri)
        except RegistryError as err:
            raise TrackingError(str(err)) from None
        if mlflow_run_id is not None:
            self.run_id = self._reopen(mlflow_run_id)
            return
        with self._calling("opening the run"):
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
            runs = (
                []
                if run_uid is None
                else self.client.search_runs([experiment_id], f"tags.`{RUN_UID_TAG}` = '{run_uid}'")
            )
            if runs:
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {RUN_ID_TAG: run_id} | ({} if run_uid is None else {RUN_UID_TAG: run_uid})
                self.run_id = self.client.create_run(experiment_id, run_name=run_id, tags=tags).info.run_id

    def _reopen(self, mlflow_run_id: str) -> str:
        try:
            run = self.client.get_run(mlflow_run_id)
            gone = run.info.lifecycle_stage == "deleted" or run.data.tags.get(RUN_ID_TAG) != self.hero_run_id
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                with self._calling("opening the run"):
                    raise
            gone = True
        if gone:
            raise TrackingError(
                f"run {self.hero_run_id!r} is tracked in MLflow run {mlflow_run_id}, which MLflow at "
                f"{self.tracking_uri} does not hold (another tracking server, or the run was deleted): set "
                "tracking.tracking_uri (HERO_TRACKING__TRACKING_URI) to the server it was tracked on, or "
                f"restore the MLflow run; to track it afresh, delete runs/{self.hero_run_id}/tracking.json"
            )
        with self._calling("opening the run"):
            self.client.update_run(mlflow_run_id, status="RUNNING")
        return mlflow_run_id

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except (MlflowException, RegistryError) as err:
            reason = mlflow_message(err) if isinstance(err, MlflowException) else str(err)
            raise TrackingError(
                f"MLflow at {self.tracking_uri}: {what} failed: {reason[:400]}\nNothing of the run is "
                f"lost (each round is stored before it is tracked): when the server answers again, "
                f"`hero run --resume {self.hero_run_id}` tracks what it missed"
            ) from None

    def log_params(self, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        with self._calling("reading the run's params"):
            existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]  # params are write-once
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            raise TrackingError(
                f"MLflow run {self.run_id} was started with other values of {', '.join(changed)}: resume "
                f"run {self.hero_run_id!r} with its own config (hero run --resume {self.hero_run_id})"
            )
        with self._calling("logging params"):
            for start in range(0, len(new), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=new[start : start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        with self._calling("setting tags"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _flatten(tags).items()])

    def log_metrics(self, metrics: dict[str, float], step: int, at: datetime | None = None) -> None:
        # MLflow keeps one row of a (key, timestamp, step, value): the same point logged again is one
        stamp = _now_ms() if at is None else int(at.timestamp() * 1000)
        with self._calling(f"logging metrics of step {step}"):
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()]
            )

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        with self._calling(f"logging {artifact_file}"):
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        with self._calling(f"logging the artifacts {artifact_path}"):
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)

    def log_lora(
        self, lora_folder: Path, base: ModelConfig, base_weights: dict[str, str] | None = None
    ) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            save_lora_model(lora_folder, base, Path(scratch) / MODEL_ARTIFACT, base_weights)
            with self._calling("logging the LoRA"):
                self.client.log_artifacts(self.run_id, str(Path(scratch) / MODEL_ARTIFACT), MODEL_ARTIFACT)

    def register_lora(self, registered_model: str, tags: dict[str, str]) -> str:
        with self._calling(f"registering the LoRA as a version of {registered_model}"):
            registry = Registry(self.tracking_uri, registered_model, alias="")
            return registry.register(self.run_id, tags).version

    def finish(self, status: str = "FINISHED") -> None:
        with self._calling(f"marking the run {status}"):
            self.client.set_terminated(self.run_id, status=status)


def open_tracker(
    config: HeroConfig, mlflow_run_id: str | None = None, run_uid: str | None = None
) -> MlflowTracker:
    """The run's tracker as configured; mlflow_run_id and run_uid: the MLflow run it was first tracked
    in and the run's uid (TrainingRun.tracking), None for a new MLflow run. A SQLite store keeps its
    artifacts beside the database file (MLflow would otherwise write them under the current folder)."""
    tracking = config.tracking
    folder = sqlite_folder(tracking.tracking_uri)
    artifact_location = None if folder is None else (folder / "mlartifacts").resolve().as_uri()
    return MlflowTracker(
        tracking.tracking_uri, tracking.experiment, config.run_id, artifact_location, mlflow_run_id, run_uid
    )


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + ".")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)
