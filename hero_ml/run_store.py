"""A run's objects in an ArtifactStore, and the order that makes every step crash-safe.

    runs/{run_id}/config.json                          the run's config, secrets masked (written once)
    runs/{run_id}/rounds/{k}/images/{image_id}.png     the round's images, as annotators see them
    runs/{run_id}/rounds/{k}/grid.png                  all of them in one picture
    runs/{run_id}/rounds/{k}/trajectory.safetensors    every denoising step, for learning
    runs/{run_id}/rounds/{k}/manifest.json             written last: commits the round (sizes, sha256)
    runs/{run_id}/rounds/{k}/feedback.json             each annotator's labels and their aggregate
    runs/{run_id}/rounds/{k}/current_best.png          Label Studio: the best shown beside the images
    runs/{run_id}/rounds/{k}/annotations.json          Label Studio: raw annotations, stored before use
    runs/{run_id}/checkpoints/{k}/state.*              the engine after learning round k (JSON last)
    runs/{run_id}/progress.json                        the latest committed checkpoint
    runs/{run_id}/eval/{label}.json                    the judge's success rate before/after training

Objects are written before the object that commits them, so a crash leaves a round or checkpoint that
is either complete or visibly not there; reads verify sizes and checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from PIL import Image
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from hero_ml.adapters.storage import ArtifactStore, StorageError
from hero_ml.adapters.storage.keys import check_key
from hero_ml.config import format_validation_error
from hero_ml.diffusion.sampler import Trajectory
from hero_ml.engine import CHECKPOINT_FORMAT, STATE, TENSORS, CheckpointState, Engine, RoundBatch, RoundStats
from hero_ml.errors import HeroError
from hero_ml.faults import crash_point
from hero_ml.feedback import AnnotatorFeedback, RoundFeedback
from hero_ml.images import image_grid

MANIFEST = "manifest.json"
TRAJECTORY = "trajectory.safetensors"
GRID = "grid.png"
FEEDBACK = "feedback.json"
CURRENT_BEST = "current_best.png"  # the best annotators compared this round's images with (Label Studio)
ANNOTATIONS = "annotations.json"  # the raw annotations the feedback was aggregated from (Label Studio)
PUBLISHED = "published.json"  # when and where the round's tasks went out (Label Studio)
STATS = "stats.json"  # what learning the round did (RoundStats), written before its checkpoint
TRACKED = "tracked.json"  # the round's metrics and grid reached the tracker
MODEL = "model.json"  # the run's base model: source and weights' fingerprint (ModelRecord)
TRACKING = "tracking.json"  # the tracker's run the run's rounds go to (TrackingRecord)
# written after the manifest, by the labelling of a committed round
_LABELLING = (CURRENT_BEST, ANNOTATIONS, PUBLISHED)
_AFTER_COMMIT = {MANIFEST, FEEDBACK, STATS, TRACKED, *_LABELLING}


_Record = TypeVar("_Record", bound=BaseModel)


class CorruptObjectError(HeroError, RuntimeError):
    """A stored object does not match what its manifest recorded, or a record is not readable."""


class _FileRecord(BaseModel):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the round's info (sampling settings, model) beside
    image_ids: list[str] = Field(min_length=1)
    files: dict[str, _FileRecord]

    @field_validator("files")
    @classmethod
    def _names_inside_the_round(cls, files: dict[str, _FileRecord]) -> dict[str, _FileRecord]:
        for name in files:  # a name is read as a key below the round's folder: none may leave it
            check_key(name)
        return files

    @model_validator(mode="after")
    def _every_image_listed(self) -> _Manifest:
        # what a round is read by: every image's PNG, the grid and the trajectory, each image once
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("image_ids: an image is named twice")
        wanted = [f"images/{image_id}.png" for image_id in self.image_ids] + [GRID, TRAJECTORY]
        if missing := [name for name in wanted if name not in self.files]:
            raise ValueError(f"files: lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        return self


class TrackingRecord(BaseModel):
    """How a run is tracked: its uid, written when the run is opened first, with which the tracker's
    run is tagged (a tracker's run made and not yet recorded here, a crash between, is found again by
    it, never another run's of the same name); then the tracker's run (MLflow's run id), recorded when
    it is first tracked: a resume goes on in that run wherever tracking.experiment points by then."""

    model_config = ConfigDict(extra="forbid", strict=True)
    uid: str | None = Field(None, min_length=1)  # None in a record of a release before uids
    tracker_run_id: str | None = Field(None, min_length=1)


class ModelRecord(BaseModel):
    """The base model a run samples and learns on: its source and its weights' fingerprint
    (pipeline.weights_sha256), compared by every resume."""

    source: str
    sha256: dict[str, str]


_ROUND_STATS = TypeAdapter(RoundStats)
_ROUND_FOLDER = re.compile(r"0|[1-9][0-9]*")  # a round's (or checkpoint's) folder: its index as written


class _Progress(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    checkpoint: int = Field(ge=0)


class _Annotations(BaseModel):
    """annotations.json: a round's tasks with their annotations as Label Studio gave them (read by
    collect, which reports what it cannot use), and what collecting them found."""

    model_config = ConfigDict(extra="allow")
    tasks: list[Any]


class PublishedRecord(BaseModel):
    """When and to which Label Studio project a round's tasks first went out (its deadline's clock)."""

    published_at: AwareDatetime
    project_id: int = Field(ge=1)
    flow_run_id: str | None  # the flow run waiting for the round; None: published by hand
    tasks: int = Field(ge=1)
    # when every task was in the project; None: an import cut short (or a record older than this field).
    # A round imported whole may wait out a Label Studio outage when it is entered again; one cut short
    # may not (its missing tasks could never be labelled)
    imported_at: AwareDatetime | None = None
    # when publishing the round again (entered again, its tasks gone from Label Studio) last failed: a
    # check asks for the next try only after a back-off (each try is a process start and a model load)
    republish_failed_at: AwareDatetime | None = None


class EvaluationRecord(BaseModel):
    """eval/<label>.json: an evaluation's success rate, and when it was measured (the time of its
    tracked point: tracked again, as a resume does, it stays one point)."""

    label: str
    success_rate: float = Field(ge=0, le=1)
    images: int = Field(ge=1)
    measured_at: AwareDatetime | None = None  # None in a record of a release before it
    # the rounds the evaluated LoRA had learned (None: the base model's, or a release before it): a
    # resume reuses an evaluation of the weights it holds, measured again only after more learning
    round: int | None = Field(default=None, ge=0)


class _FeedbackRecord(BaseModel):
    aggregate: RoundFeedback
    annotators: list[AnnotatorFeedback]


@dataclass(frozen=True)
class RoundListing:
    """One round as stored: what `hero storage ls` shows."""

    round: int
    committed: bool  # its manifest is there
    images: int
    bytes: int
    good: int | None  # None: no feedback stored yet
    bad: int | None
    checkpoint: bool  # the engine after learning this round is committed


@dataclass
class VerifyReport:
    objects: int = 0  # checked against a recorded size and sha256
    bytes: int = 0
    problems: list[str] = field(default_factory=list)  # corrupt, missing or unlisted objects
    incomplete: list[str] = field(default_factory=list)  # rounds and checkpoints a crash left uncommitted

    @property
    def ok(self) -> bool:
        return not self.problems


class RunStore:
    def __init__(self, store: ArtifactStore, run_id: str):
        self.store = store
        self.run_id = run_id
        self.prefix = f"runs/{run_id}"

    def round_prefix(self, round_index: int) -> str:
        return f"{self.prefix}/rounds/{round_index}"

    def checkpoint_prefix(self, round_index: int) -> str:
        return f"{self.prefix}/checkpoints/{round_index}"

    # -- config ------------------------------------------------------------------------------------

    def save_config(self, public_config: dict[str, Any]) -> None:
        self.store.put(f"{self.prefix}/config.json", json.dumps(public_config, indent=1).encode())

    def save_model(self, record: ModelRecord) -> None:
        self.store.put(f"{self.prefix}/{MODEL}", record.model_dump_json(indent=1).encode())

    def load_model(self) -> ModelRecord | None:
        """The run's model.json; None for a run stored before runs recorded their model."""
        key = f"{self.prefix}/{MODEL}"
        return self._record(key, ModelRecord) if self.store.exists(key) else None

    def save_tracking(self, record: TrackingRecord) -> None:
        self.store.put(f"{self.prefix}/{TRACKING}", record.model_dump_json(indent=1).encode())

    def load_tracking(self) -> TrackingRecord | None:
        """The run's tracking.json; None before it was first tracked (or stored before runs kept it)."""
        key = f"{self.prefix}/{TRACKING}"
        return self._record(key, TrackingRecord) if self.store.exists(key) else None

    def _record(self, key: str, model: type[_Record]) -> _Record:
        """A stored JSON record, validated: a damaged or edited one is named, with what is wrong."""
        try:
            return model.model_validate_json(self.store.get(key))
        except ValidationError as err:
            raise CorruptObjectError(
                f"{self.store.where(key)} is not a readable record (edited or damaged):\n"
                f"{format_validation_error(err, root=model)}\n`hero storage verify {self.run_id}` checks the "
                "whole run"
            ) from None

    def load_config(self) -> dict[str, Any] | None:
        """The run's stored config as a JSON object (restore_config validates its values); None when
        there is none."""
        key = f"{self.prefix}/config.json"
        if not self.store.exists(key):
            return None
        try:
            stored = json.loads(self.store.get(key))
        except ValueError as err:  # not JSON, or not UTF-8
            raise CorruptObjectError(
                f"{self.store.where(key)} is not a readable run config (edited or damaged): {err}"
            ) from None
        if not isinstance(stored, dict):
            raise CorruptObjectError(
                f"{self.store.where(key)} is not a readable run config (edited or damaged): a JSON "
                f"{type(stored).__name__}, not an object of sections"
            )
        return stored

    # -- rounds --------------------------------------------------------------------------------------

    def commit_batch(self, batch: RoundBatch, info: dict[str, Any]) -> dict[str, Any]:
        """Store the round's images, grid and trajectory, then the manifest that commits them."""
        prefix = self.round_prefix(batch.round)
        files: dict[str, bytes] = {
            TRAJECTORY: batch.trajectory.to_bytes(),
            GRID: _png(image_grid(batch.trajectory.images)),
        }
        for image_id, image in zip(batch.image_ids, batch.trajectory.images, strict=True):
            files[f"images/{image_id}.png"] = _png(Image.fromarray(image.numpy()))
        for name, data in files.items():
            self.store.put(f"{prefix}/{name}", data)
            if name.startswith("images/"):
                crash_point("commit.images")
        crash_point("commit.manifest")
        manifest = {
            "run_id": self.run_id,
            "round": batch.round,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "image_ids": list(batch.image_ids),
            **info,
            "files": {
                name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in files.items()
            },
        }
        self.store.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        return manifest

    def has_batch(self, round_index: int) -> bool:
        return self.store.exists(f"{self.round_prefix(round_index)}/{MANIFEST}")

    def load_batch(self, round_index: int) -> RoundBatch:
        """The committed round, every file checked against the manifest."""
        prefix = self.round_prefix(round_index)
        manifest = self.load_manifest(round_index)
        trajectory = Trajectory.from_bytes(
            self.read_verified(round_index, TRAJECTORY, manifest), source=f"{prefix}/{TRAJECTORY}"
        )
        return RoundBatch(round=round_index, image_ids=tuple(manifest["image_ids"]), trajectory=trajectory)

    def read_verified(self, round_index: int, name: str, manifest: dict[str, Any] | None = None) -> bytes:
        prefix = self.round_prefix(round_index)
        if manifest is None:
            manifest = self.load_manifest(round_index)
        expected = manifest["files"].get(name)
        if expected is None:
            raise CorruptObjectError(f"{prefix}/{name} is not listed in the round's manifest")
        data = self.store.get(f"{prefix}/{name}")
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CorruptObjectError(
                f"{prefix}/{name} does not match its manifest ({len(data)} bytes, expected "
                f"{expected['bytes']}): it was changed or truncated after the round was committed"
            )
        return data

    # -- feedback ------------------------------------------------------------------------------------

    def save_feedback(
        self, round_index: int, feedback: RoundFeedback, labels: list[AnnotatorFeedback]
    ) -> None:
        record = {
            "aggregate": feedback.model_dump(mode="json"),
            "annotators": [item.model_dump(mode="json") for item in labels],
        }
        self.store.put(f"{self.round_prefix(round_index)}/{FEEDBACK}", json.dumps(record, indent=1).encode())

    # -- learning and tracking ---------------------------------------------------------------------

    def save_stats(self, stats: RoundStats) -> None:
        # json's NaN where a figure is not finite (pydantic's dump would write null, which reads back as
        # no figure or not at all); learned_at in ISO 8601 with its zone
        record = json.dumps(asdict(stats), default=datetime.isoformat)
        self.store.put(f"{self.round_prefix(stats.round)}/{STATS}", record.encode())

    def load_stats(self, round_index: int) -> RoundStats:
        key = f"{self.round_prefix(round_index)}/{STATS}"
        try:  # strict: a figure given as text is no figure (it would fail only when tracked)
            return _ROUND_STATS.validate_json(self.store.get(key), strict=True)
        except ValidationError as err:
            problems = "\n".join(
                f"  {'.'.join(map(str, problem['loc'])) or '(top level)'}: {problem['msg']}"
                for problem in err.errors(include_url=False)
            )
            raise CorruptObjectError(
                f"{self.store.where(key)} is not a readable record of a round's learning (edited or "
                f"damaged):\n{problems}\n`hero storage verify {self.run_id}` checks the whole run"
            ) from None

    def mark_tracked(self, round_index: int) -> None:
        self.store.put(f"{self.round_prefix(round_index)}/{TRACKED}", b"{}")

    def untracked_rounds(self) -> list[int]:
        """Learned rounds (up to the latest checkpoint) whose tracking did not finish: a crash while
        tracking. Each has its stats stored, so it can be tracked again."""
        latest = self.latest_checkpoint()
        if latest is None:
            return []
        # One listing, not two HEAD requests per round: a long run on S3 has hundreds of rounds.
        return [
            k
            for k, objects in sorted(self._objects_by_round("rounds").items())
            if k <= latest and STATS in objects and TRACKED not in objects
        ]

    # -- evaluations (the judge's success rate before and after training) ------------------------------

    def save_evaluation(self, record: EvaluationRecord) -> None:
        self.store.put(f"{self.prefix}/eval/{record.label}.json", record.model_dump_json().encode())

    def load_evaluation(self, label: str) -> EvaluationRecord | None:
        """A stored evaluation; None when there is none."""
        key = f"{self.prefix}/eval/{label}.json"
        if not self.store.exists(key):
            return None
        record = self._record(key, EvaluationRecord)
        if record.label != label:
            raise CorruptObjectError(
                f"{self.store.where(key)} holds evaluation {record.label!r}, not {label!r} (edited or moved)"
            )
        return record

    def save_published(self, round_index: int, record: PublishedRecord) -> None:
        self.put_round_object(round_index, PUBLISHED, record.model_dump_json().encode())

    def load_published(self, round_index: int) -> PublishedRecord | None:
        """The round's published.json; None: its tasks have not gone out yet."""
        key = f"{self.round_prefix(round_index)}/{PUBLISHED}"
        return self._record(key, PublishedRecord) if self.store.exists(key) else None

    def put_round_object(self, round_index: int, name: str, data: bytes) -> str:
        """Write a labelling object of a committed round (CURRENT_BEST, ANNOTATIONS, PUBLISHED); its key."""
        if name not in _LABELLING:
            raise ValueError(f"{name!r} is not a labelling object of a round")
        key = f"{self.round_prefix(round_index)}/{name}"
        self.store.put(key, data)
        return key

    def load_annotations(self, round_index: int) -> list[Any] | None:
        """The tasks (with their annotations) the round's feedback was collected from; None before."""
        key = f"{self.round_prefix(round_index)}/{ANNOTATIONS}"
        return self._record(key, _Annotations).tasks if self.store.exists(key) else None

    def load_manifest(self, round_index: int) -> dict[str, Any]:
        return self._record(f"{self.round_prefix(round_index)}/{MANIFEST}", _Manifest).model_dump()

    def load_feedback(self, round_index: int) -> RoundFeedback | None:
        key = f"{self.round_prefix(round_index)}/{FEEDBACK}"
        if not self.store.exists(key):
            return None
        return self._record(key, _FeedbackRecord).aggregate

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self, engine: Engine) -> None:
        """The engine after its last learned round; progress.json then points at it."""
        learned = engine.round - 1
        engine.save(self.store, self.checkpoint_prefix(learned))
        crash_point("checkpoint.progress")
        self._point_progress_at(learned)

    def _point_progress_at(self, checkpoint: int) -> None:
        self.store.put(f"{self.prefix}/progress.json", json.dumps({"checkpoint": checkpoint}).encode())

    def latest_checkpoint(self) -> int | None:
        key = f"{self.prefix}/progress.json"
        return self._record(key, _Progress).checkpoint if self.store.exists(key) else None

    def unacknowledged_checkpoint(self) -> int | None:
        """The checkpoint after progress.json's when it is committed: a crash came between committing
        it and moving progress.json there. A resume loads it, then moves progress.json
        (acknowledge_checkpoint); learning that round again instead could write other tensors (a GPU is
        not deterministic) beside a committed state.json."""
        latest = self.latest_checkpoint()
        following = 0 if latest is None else latest + 1
        return following if self.store.exists(f"{self.checkpoint_prefix(following)}/{STATE}") else None

    def acknowledge_checkpoint(self, checkpoint: int) -> None:
        """progress.json moves to `checkpoint`, loaded whole by the resume that found it."""
        self._point_progress_at(checkpoint)

    # -- inspection -----------------------------------------------------------------------------------

    def _objects_by_round(self, kind: str, strays: list[str] | None = None) -> dict[int, dict[str, int]]:
        """rounds/ or checkpoints/ objects: round -> {name inside the round's folder: size}; the keys
        outside any round's folder (no run writes them) go to `strays` when given."""
        grouped: dict[int, dict[str, int]] = {}
        for key, size in sorted(self.store.list(f"{self.prefix}/{kind}").items()):
            index, _, name = key.removeprefix(f"{self.prefix}/{kind}/").partition("/")
            if _ROUND_FOLDER.fullmatch(index):
                grouped.setdefault(int(index), {})[name] = size
            elif strays is not None:
                strays.append(f"{key}: not in a round's folder ({kind}/<k>/)")
        return grouped

    def list_rounds(self) -> list[RoundListing]:
        checkpoints = self._objects_by_round("checkpoints")
        listing = []
        for index, objects in sorted(self._objects_by_round("rounds").items()):
            good = bad = None
            if FEEDBACK in objects and (feedback := self.load_feedback(index)) is not None:
                good, bad = sum(feedback.good), len(feedback.good) - sum(feedback.good)
            listing.append(
                RoundListing(
                    round=index,
                    committed=MANIFEST in objects,
                    images=sum(name.startswith("images/") for name in objects),
                    bytes=sum(objects.values()),
                    good=good,
                    bad=bad,
                    checkpoint=STATE in checkpoints.get(index, {}),
                )
            )
        return listing

    def verify(self) -> VerifyReport:
        """Check every committed object against its recorded size and sha256: each round's files
        against its manifest, each checkpoint's tensors against its state.json, and progress.json's
        checkpoint exists. Uncommitted rounds and checkpoints (a crash before the commit) are listed
        apart: they are not corruption, the run redoes them."""
        report = VerifyReport()

        def check(key: str, expected: dict[str, Any]) -> bytes | None:
            """The object when it matches its record; else None, the problem reported."""
            try:
                data = self.store.get(key)
            except KeyError:
                report.problems.append(f"{key}: missing, though its commit record lists it")
                return None
            except StorageError as err:  # e.g. a folder where the object should be
                report.problems.append(f"{key}: {err}")
                return None
            report.objects += 1
            report.bytes += len(data)
            if not _sha256_matches(data, expected):
                report.problems.append(
                    f"{key}: {len(data)} bytes do not match the recorded {expected['bytes']} bytes and "
                    "sha256 (changed or truncated after commit)"
                )
                return None
            return data

        rounds = self._objects_by_round("rounds", report.problems)
        checkpoints = self._objects_by_round("checkpoints", report.problems)
        for index, objects in sorted(rounds.items()):
            prefix = self.round_prefix(index)
            if MANIFEST not in objects:
                report.incomplete.append(
                    f"{prefix}: no {MANIFEST} ({len(objects)} objects of an interrupted round)"
                )
                continue
            try:
                listed = self.load_manifest(index)["files"]
            except CorruptObjectError as err:
                report.problems.append(str(err))
                continue
            for name, expected in listed.items():
                check(f"{prefix}/{name}", expected)
            # the records written after the commit have no checksum: they must at least be readable
            for name, read in (
                (FEEDBACK, self.load_feedback),
                (STATS, self.load_stats),
                (PUBLISHED, self.load_published),
                (ANNOTATIONS, self.load_annotations),
            ):
                if name in objects:
                    try:
                        read(index)
                    except CorruptObjectError as err:
                        report.problems.append(str(err))
            for name in sorted(set(objects) - set(listed) - _AFTER_COMMIT):
                report.problems.append(f"{prefix}/{name}: not listed in the round's manifest")
        for index, objects in sorted(checkpoints.items()):
            prefix = self.checkpoint_prefix(index)
            if STATE not in objects:
                report.incomplete.append(f"{prefix}: no {STATE} (a checkpoint interrupted while written)")
                continue
            try:  # as a resume reads it (Engine.load, TrainingRun._load_checkpoint)
                state = self._record(f"{prefix}/{STATE}", CheckpointState)
            except CorruptObjectError as err:
                report.problems.append(str(err))
                continue
            if state.format != CHECKPOINT_FORMAT or state.round != index + 1:
                report.problems.append(
                    f"{prefix}/{STATE}: format {state.format} and round {state.round}, where a resume reads "
                    f"format {CHECKPOINT_FORMAT} and round {index + 1} (the engine after round {index})"
                )
            blob = check(f"{prefix}/{TENSORS}", state.tensors.model_dump())
            if blob is not None:
                try:
                    load_tensors(blob)
                except (SafetensorError, ValueError) as err:
                    report.problems.append(f"{prefix}/{TENSORS}: not a safetensors file ({err})")
        try:
            self.load_model()
        except CorruptObjectError as err:
            report.problems.append(str(err))
        for key in sorted(self.store.list(f"{self.prefix}/eval")):
            label = key.removeprefix(f"{self.prefix}/eval/").removesuffix(".json")
            try:
                self.load_evaluation(label)
            except CorruptObjectError as err:
                report.problems.append(str(err))
        try:
            latest = self.latest_checkpoint()
        except CorruptObjectError as err:
            report.problems.append(str(err))
            return report
        if latest is not None and STATE not in checkpoints.get(latest, {}):
            report.problems.append(
                f"{self.prefix}/progress.json points at checkpoint {latest}, which is not committed"
            )
        return report


def _sha256_matches(data: bytes, expected: dict[str, Any]) -> bool:
    return len(data) == expected["bytes"] and hashlib.sha256(data).hexdigest() == expected["sha256"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
