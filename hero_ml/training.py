"""A training run's steps, each idempotent per (run, round), for a flow to chain.

    generate  -> the round's batch; reused from storage when it was committed before a crash
    feedback  -> the simulated annotators' labels, aggregated; reused when stored
    learn     -> the engine's update, then a checkpoint that commits the round
    track     -> metrics, the image grid and (at the end) the LoRA and encoder to the tracker

A run resumes from its latest checkpoint: rounds committed after it are reused, never redone, and
since every draw is seeded by (seed, round), a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from hero_ml.adapters.storage import ArtifactStore
from hero_ml.adapters.tracking import NOISE_POOL_ARTIFACT, Tracker
from hero_ml.config import HeroConfig, split_settings
from hero_ml.diffusion.lora import adapters_disabled, save_lora
from hero_ml.diffusion.pipeline import load_configured_pipeline, weights_sha256
from hero_ml.engine import Engine, EngineError, RoundBatch, RoundStats, read_checkpoint
from hero_ml.errors import HeroError
from hero_ml.faults import crash_point
from hero_ml.feedback import RoundFeedback, aggregate
from hero_ml.images import image_grid
from hero_ml.parallel import DataParallel
from hero_ml.run_lease import LeasedStore, RunLease
from hero_ml.run_processes import RunProcesses
from hero_ml.run_store import EvaluationRecord, ModelRecord, RunStore, TrackingRecord
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.toy.judge import SimulatedAnnotator
from hero_ml.toy.task import Task, load_task

_log = logging.getLogger(__name__)


class RunError(HeroError, RuntimeError):
    """A run that cannot start or go on as configured; the message says what to change."""


LOADING = "loading the model"  # the first progress phase: done as the run is stored


def multi_process_launch() -> str | None:
    """Why this process must not open a training run: it is one of several a launcher started
    (torchrun, accelerate launch); None when it is alone. A run starts its own processes
    (model.processes): launched N times, every process would run the whole run, contending for its lease."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world in ("", "1"):
        return None
    return (
        f"this process is one of {world} that a launcher started (WORLD_SIZE={world}), but a training run "
        "starts its own processes: start it without torchrun / accelerate launch, with model.processes "
        f"(HERO_MODEL__PROCESSES={world}) to sample and learn on {world} GPUs (docs/PERFORMANCE.md, GPUs)"
    )


@dataclass(frozen=True)
class Evaluation:
    label: str  # "before", "after" (plain noise) or "after_guided" (from the run's noise pool)
    success_rate: float
    images: int


@dataclass(frozen=True)
class TrainingSummary:
    run_id: str
    rounds: int  # learned in all, earlier sessions included
    feedbacks: int
    rounds_now: list[RoundStats]  # learned by this call
    before: Evaluation | None
    after: Evaluation | None
    after_guided: (
        Evaluation | None
    )  # HERO only: the LoRA from its run's noise pool (`hero generate --guided`)
    registered_version: str | None  # the LoRA's version in the model registry, when registered


def changed_settings(stored: dict[str, Any], config: HeroConfig) -> list[str]:
    """The settings that say what a run learns and how its rounds close ("section.field", or a
    top-level field) in which `config` differs from the run's stored config; service settings
    (config.SERVICE_SETTINGS) may differ. A field the stored config lacks was added by a later
    release: it counts at its default, which by rule keeps the behaviour from before the field
    existed, so an upgrade does not strand a run."""
    changed = []
    for section, value in split_settings(config.to_public_dict())[0].items():
        was = stored.get(section)
        if not isinstance(value, dict):
            if was != value:
                changed.append(section)
            continue
        if not isinstance(was, dict):
            changed.append(section)
            continue
        defaults = type(getattr(config, section))().model_dump(mode="json")
        changed += [
            f"{section}.{name}" for name, now in value.items() if was.get(name, defaults[name]) != now
        ]
    return sorted(changed)


def run_task(config: HeroConfig) -> Task | None:
    """The run's toy task (the simulated annotators' judge and the evaluations'); the prompt the run
    samples must be one of its prompts. None (simulation.task null): a real model's prompt, labelled
    by people in Label Studio, without evaluations."""
    if config.simulation.task is None:
        if not config.label_studio.enabled:
            raise RunError(
                "simulation.task is null and label_studio.enabled is false: nobody would label the "
                "images. Enable Label Studio (people label them) or name a toy task (`hero toy tasks`)"
            )
        return None
    task = load_task(config.simulation.task)
    if config.sampling.prompt not in task.prompts:
        raise RunError(
            f"sampling.prompt {config.sampling.prompt!r} is not a prompt of task {task.name!r} "
            f"({list(task.prompts)}): set HERO_SAMPLING__PROMPT to one of them, choose another task, "
            "or, for a real model's prompt labelled in Label Studio, set simulation.task to null"
        )
    return task


class TrainingRun:
    def __init__(
        self,
        config: HeroConfig,
        store: ArtifactStore,
        on_progress: Callable[[str, int, int], None] | None = None,
    ):
        """Open the run `config.run_id`: a new one, or the stored one from its latest checkpoint.

        on_progress(phase, done, total): what the run is doing, for a progress display: LOADING (the
        model: 0 of 1 before, 1 of 1 as the run is stored, before its config is written), "denoising"
        (steps of the round's sampling), "evaluating LABEL" (images), "training the encoder" (epochs)
        and "updating the LoRA" (optimiser steps).

        A stored run must be resumed with its own config (compared field by field, service settings
        and secrets aside: changed_settings).
        The run's lease is taken first (RunLeasedError while another process writes it) and every
        write goes through it; close() - or leaving a `with` block - gives it back."""
        if (problem := multi_process_launch()) is not None:
            raise RunError(problem)
        self.config = config
        self.tracker: Tracker | None = None  # track_with
        self.on_progress = on_progress
        self.task = run_task(config)
        self.lease = RunLease(store, config.run_id)
        self.lease.acquire()
        # the other processes of a run over several (model.processes), which follow this one's rounds
        self.processes: RunProcesses | None = None
        try:
            if config.model.processes > 1:  # started first: they load the model while this one does
                self.processes = RunProcesses(config)
            self._open(store)
        except BaseException:
            self.close()
            raise

    def _open(self, store: ArtifactStore) -> None:
        config = self.config
        self.runs = RunStore(LeasedStore(store, self.lease), config.run_id)
        stored = self.runs.load_config()
        if stored is None and (problem := config.budget_problem()) is not None:
            raise RunError(f"run {config.run_id!r}: {problem}")
        if stored is not None and (changed := changed_settings(stored, config)):
            raise RunError(
                f"run {config.run_id!r} exists with another config (settings differ: {', '.join(changed)}); "
                "resume it with its own config (hero run --resume) or choose a new run_id"
            )
        if stored is None and self.runs.has_batch(0):  # its config is stored before its first round
            raise RunError(
                f"run {config.run_id!r} holds a round 0 but no run config: a round sampled by `hero sample`, "
                "with settings a training run cannot check; choose another run_id for the training run"
            )
        # the model before the run is stored: a run stored with a model that cannot load could only be
        # resumed with that model
        self._progress(LOADING, 0, 1)
        self.pipe = load_configured_pipeline(config.model)
        self.base_weights = weights_sha256(self.pipe)  # before the engine adds its LoRA
        model = ModelRecord(source=config.model.source, sha256=self.base_weights)
        sampled_by = self.runs.load_model()
        if sampled_by is not None and sampled_by.sha256 != model.sha256:
            digests = ", ".join(
                f"{name} {sampled_by.sha256.get(name, 'none')[:12]}… now {digest[:12]}…"
                for name, digest in model.sha256.items()
                if sampled_by.sha256.get(name) != digest
            )
            raise RunError(
                f"run {config.run_id!r} began on other weights than model.source {config.model.source!r} "
                f"loads now (sha256 of {digests}): its rounds were sampled by that model and it learns on "
                "it; restore the run's model (`hero toy pretrain` rewrites the toy model; a hub id may have "
                "moved to a new revision) or choose a new run_id"
            )
        self._progress(LOADING, 1, 1)  # said before the run is stored: from here a stop wants --resume
        if stored is None:
            self.runs.save_config(config.to_public_dict())
        if sampled_by is None:  # a new run, or one stored before runs recorded their model
            self.runs.save_model(model)
        if self.runs.load_tracking() is None:  # a new run (or one stored before runs recorded it)
            self.runs.save_tracking(TrackingRecord(uid=uuid.uuid4().hex))
        self._checkpoint: tuple[bytes, bytes] | None = None  # the files the engine was loaded from
        self.engine = self._resumed_engine(store)
        if self.processes is not None:  # the others build the same engine, from the same files
            with self._together("engine", *(self._checkpoint or (None,))):
                pass

    def _resumed_engine(self, store: ArtifactStore) -> Engine:
        """The engine from the latest checkpoint (a new one without): progress.json's, or the next one
        when a crash came before progress.json moved to it. That one is loaded before progress.json
        moves: if it is damaged, the run goes on from progress.json's and learns its round again from
        the round's stored batch and feedback."""
        following = self.runs.unacknowledged_checkpoint()
        if following is not None:
            try:
                engine = self._load_checkpoint(store, following)
            except EngineError as err:
                _log.warning(
                    "%s; resuming from the checkpoint before it: round %d is learned again", err, following
                )
            else:
                self.runs.acknowledge_checkpoint(following)
                return engine
        latest = self.runs.latest_checkpoint()
        if latest is None:
            return Engine(self.config, self.pipe, self._parallel)
        return self._load_checkpoint(store, latest)

    def _load_checkpoint(self, store: ArtifactStore, index: int) -> Engine:
        prefix = self.runs.checkpoint_prefix(index)
        files = read_checkpoint(store, prefix)
        engine = Engine.restored(self.config, self.pipe, *files, prefix, self._parallel)
        if engine.round != index + 1:  # checkpoint k holds the engine after round k
            engine.detach()
            raise EngineError(
                f"checkpoint {prefix!r} holds the engine after round {engine.round - 1}, not {index} (its "
                f"state.json edited or moved); `hero storage verify {self.config.run_id}` lists what else "
                "is damaged"
            )
        self._checkpoint = files
        return engine

    def tracking(self) -> TrackingRecord:
        """The run's uid and the tracker's run it was first tracked in (None before): what to open
        the tracker on (open_tracker)."""
        record = self.runs.load_tracking()
        assert record is not None  # written by _open
        return record

    def track_with(self, tracker: Tracker) -> None:
        """Track the run's params now, and its rounds, evaluations and final artifacts from now on.
        What the run learns with are params (write-once); its service settings are tags, which a
        resume from another worker or with a moved server overwrites. The tracker's run is recorded
        the first time: a resume goes on in it (tracking.experiment changed or not)."""
        record = self.tracking()
        first = record.tracker_run_id
        if first is None:
            self.runs.save_tracking(record.model_copy(update={"tracker_run_id": tracker.run_id}))
        elif first != tracker.run_id:
            raise RunError(
                f"run {self.config.run_id!r} is tracked in run {first} of the tracker, not {tracker.run_id}: "
                "open the tracker on the run it was tracked in (TrainingRun.tracking)"
            )
        self.tracker = tracker
        learning, service = split_settings(self.config.to_public_dict())
        tracker.log_params({**learning, "derived": self.config.derived()})
        tracker.set_tags({"service": service})

    @property
    def _parallel(self) -> DataParallel | None:
        return None if self.processes is None else self.processes.parallel

    @contextmanager
    def _together(self, *command: Any) -> Iterator[None]:
        """The engine work in the block, done by every process of the run: `command` tells the others
        (RunProcesses.command); nothing to coordinate with one."""
        if self.processes is None:
            yield
        else:
            with self.processes.command(*command):
                yield

    def close(self) -> None:
        """Stop the run's other processes, then give its lease back: another process may write the
        run at once."""
        try:
            if self.processes is not None:
                self.processes.close()
                self.processes = None
        finally:
            self.lease.release()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def done(self) -> bool:
        """True when another round would overspend the feedback budget."""
        return self.engine.feedbacks + self.config.feedbacks_per_round > self.config.feedback.budget

    def generate(self) -> RoundBatch:
        round_index = self.engine.round
        if self.runs.has_batch(round_index):  # committed before a crash: the same batch, not a second one
            batch = self.runs.load_batch(round_index)
            with self._together("batch", batch):
                return batch
        started = time.perf_counter()
        steps = [0, self.config.sampling.denoising_steps_per_round(self.config.model.processes)]

        def on_step() -> None:
            crash_point("sampling")
            steps[0] += 1
            self._progress("denoising", *steps)

        with self._together("generate"):
            batch = self.engine.generate(on_step=on_step)
        self.runs.commit_batch(
            batch,
            {
                "method": self.config.method,
                "prompt": self.config.sampling.prompt,
                "model": self.config.model.source,
                "sampling_seconds": round(time.perf_counter() - started, 3),
            },
        )
        return batch

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, done, total)

    def feedback(self, batch: RoundBatch) -> RoundFeedback:
        stored = self.runs.load_feedback(batch.round)
        if stored is not None:
            return stored
        assert self.task is not None  # run_task: without a task, people label (label_studio.enabled)
        best = self.engine.best_image
        images = batch.trajectory.images.numpy()
        labels = [
            SimulatedAnnotator(
                self.task.target,
                flip_probability=self.config.simulation.flip_probability,
                seed=(self.config.sampling.seed, batch.round, index),
                name=f"simulated-{index}",
            ).label_round(batch.image_ids, images, current_best=None if best is None else best.numpy())
            for index in range(self.config.feedback.annotators_per_image)
        ]
        feedback = aggregate(labels, batch.image_ids, has_current_best=best is not None)
        self.runs.save_feedback(batch.round, feedback, labels)
        return feedback

    def learn(self, batch: RoundBatch, feedback: RoundFeedback) -> RoundStats:
        """Learn the round and commit it: its stats, then the checkpoint (a crash before the checkpoint
        learns the round again, from the same batch and feedback, to the same result)."""
        crash_point("feedback")
        with self._together("learn", batch.round, feedback):
            stats = self.engine.learn(batch, feedback, on_progress=self._progress)
        stats = replace(stats, learned_at=datetime.now(UTC))
        self.runs.save_stats(stats)
        self.runs.save_checkpoint(self.engine)
        return stats

    def track(self, batch: RoundBatch, stats: RoundStats) -> None:
        """The round's metrics and image grid to the tracker, then the mark that they got there."""
        if self.tracker is not None:
            self.tracker.log_metrics(stats.metrics(), step=stats.round, at=stats.learned_at)
            crash_point("track")
            grid = np.asarray(image_grid(batch.trajectory.images))
            self.tracker.log_image(grid, f"rounds/{stats.round:04d}/grid.png")
        self.runs.mark_tracked(stats.round)

    def track_interrupted(self) -> list[int]:
        """Track again the learned rounds whose tracking a crash interrupted (at the time each was
        learned: metrics that got there before stay one point); the rounds tracked."""
        rounds = self.runs.untracked_rounds()
        for k in rounds:
            self.track(self.runs.load_batch(k), self.runs.load_stats(k))
        return rounds

    def evaluate(self, label: str) -> Evaluation | None:
        """Success rate on the task's prompts from fixed plain noises (seed 0: the same for every run
        and every method), the LoRA as trained ('after') or switched off ('before'); 'after_guided':
        the LoRA from noises drawn from the run's noise pool (seed 0), None without one."""
        n = self.config.simulation.eval_images
        pool = self.engine.noise_pool() if label == "after_guided" else None
        if n == 0 or self.task is None or (label == "after_guided" and pool is None):
            return None
        task = self.task
        initial_noise = None if pool is None else pool.sample(n, torch.Generator().manual_seed(0))
        learned = None if label == "before" else self.engine.round
        stored = self.runs.load_evaluation(label)
        if stored is not None and stored.round == learned and stored.images == n:
            # these weights' own (seed 0: measuring again gives the same): tracked again at its time (a
            # crash may have come between storing and tracking it; tracked before, it stays one point)
            return self._tracked(Evaluation(label, stored.success_rate, stored.images), stored.measured_at)

        images = [0]

        def on_batch(count: int) -> None:
            images[0] += count
            self._progress(f"evaluating {label}", images[0], n)

        def rate() -> float:
            self._progress(f"evaluating {label}", 0, n)
            return task_success_rate(
                self.pipe,
                task,
                n,
                self.config.sampling,
                seed=0,
                initial_noise=initial_noise,
                on_batch=on_batch,
            )

        if label == "before":
            with adapters_disabled(self.pipe.unet):
                result = Evaluation(label, rate(), n)
        else:
            result = Evaluation(label, rate(), n)
        measured_at = datetime.now(UTC)
        record = EvaluationRecord(
            label=label, success_rate=result.success_rate, images=n, measured_at=measured_at, round=learned
        )
        self.runs.save_evaluation(record)
        return self._tracked(result, measured_at)

    def _tracked(self, result: Evaluation, measured_at: datetime | None) -> Evaluation:
        if self.tracker is not None:
            step = 0 if result.label == "before" else self.engine.round
            metrics = {f"eval_success_rate_{result.label}": result.success_rate}
            self.tracker.log_metrics(metrics, step=step, at=measured_at)
        return result

    def log_final_artifacts(self) -> str | None:
        """The LoRA (a model referencing the base model), the config, the encoder (safetensors) and
        HERO's last noise pool (safetensors + JSON: what `hero generate --guided` samples from) as
        tracker artifacts; with tracking.register_lora, the LoRA becomes a registry version (returned)."""
        if self.tracker is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            save_lora(self.pipe.unet, folder / "lora")
            self.tracker.log_lora(folder / "lora", self.config.model, self.base_weights)
            (folder / "config").mkdir()  # the resolved config as a file to rerun from: secrets null
            (folder / "config" / "config.json").write_text(json.dumps(self.config.to_file_dict(), indent=1))
            self.tracker.log_artifacts(folder / "config", "config")
            if self.engine.encoder is not None:
                (folder / "encoder").mkdir()
                save_file(self.engine.encoder.state_dict(), str(folder / "encoder" / "encoder.safetensors"))
                self.tracker.log_artifacts(folder / "encoder", "encoder")
            if (pool := self.engine.noise_pool()) is not None:
                pool.save(folder / NOISE_POOL_ARTIFACT)
                self.tracker.log_artifacts(folder / NOISE_POOL_ARTIFACT, NOISE_POOL_ARTIFACT)
        if not self.config.tracking.register_lora:
            return None
        tags = {
            "hero.run_id": self.config.run_id,
            "hero.rounds": str(self.engine.round),
            "hero.feedbacks": str(self.engine.feedbacks),
            "hero.method": self.config.method,
            "hero.base_model": self.config.model.source,
        }
        if self.config.simulation.task is not None:  # the judge promotion evaluates it by
            tags["hero.task"] = self.config.simulation.task
        for label, weights in (("before", None), ("after", self.engine.round)):
            stored = self.runs.load_evaluation(label)  # `hero registry ls` shows them beside the version
            if stored is not None and stored.round == weights:
                tags[f"hero.success_rate.{label}"] = f"{stored.success_rate:.4f}"
        return self.tracker.register_lora(self.config.tracking.registered_model, tags)
