"""Human feedback through Label Studio for a committed round: publish it, watch its progress, collect it.

publish   the run's project (created once), then the round's image tasks and best task; publishing
          again creates nothing. Images: `s3://` URIs that Label Studio presigns itself at every view
          (S3 storage, through a source storage connection; label_studio.proxy_images: it streams
          them itself), or inline PNG data (the local store, which a browser elsewhere cannot reach).
progress  labels and best votes so far against what the round needs (annotators_per_image each).
collect   the round's raw annotations are stored with the round first (annotations.json, with every
          problem found), then aggregated into the RoundFeedback the engine learns from.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hero_ml.adapters.label_studio.client import LabelStudioError, LabelStudioProjects
from hero_ml.adapters.label_studio.rounds import (
    CollectedRound,
    Progress,
    Readiness,
    best_task,
    collect,
    image_task,
    readiness,
    suggestions,
    task_key,
)
from hero_ml.adapters.tracking import Tracker
from hero_ml.config import ConfigError, HeroConfig
from hero_ml.faults import crash_point
from hero_ml.feedback import RoundFeedback
from hero_ml.run_store import ANNOTATIONS, CURRENT_BEST, GRID, PublishedRecord, RunStore

__all__ = ["LabelStudioError", "LabelStudioRounds", "Progress", "Published", "Readiness", "open_projects"]

# With local storage a task carries its pictures inline (data: URLs), and every webhook event and task
# read carries the task: above this, events would exceed the receiver's 1 MiB body limit (the toy
# model's best task, a grid of 64 images of 64 px, is about 0.2 MiB).
INLINE_TASK_LIMIT_BYTES = 768 * 1024
logger = logging.getLogger(__name__)
# a round whose tasks are gone and whose publication failed again is tried again this much later: each
# try is a resumed flow run (a process start, a model load, the publication's retries)
REPUBLISH_BACKOFF = timedelta(hours=1)


@dataclass(frozen=True)
class Published:
    project_id: int
    created: int
    existing: int
    url: str


def open_projects(config: HeroConfig) -> LabelStudioProjects:
    settings = config.label_studio
    if settings.api_key is None:
        raise LabelStudioError("Label Studio needs an API token: set HERO_LABEL_STUDIO__API_KEY")
    return LabelStudioProjects(str(settings.url), settings.api_key, settings.project_title_prefix)


class LabelStudioRounds:
    def __init__(
        self,
        config: HeroConfig,
        runs: RunStore,
        projects: LabelStudioProjects,
        tracker: Tracker | None = None,
    ):
        self.config = config
        self.runs = runs
        self.projects = projects
        self.tracker = tracker
        self._project_id: int | None = None

    def project(self) -> int:
        """The run's project, set up (created, connected to S3, its webhook registered) on first use
        by this object."""
        if self._project_id is not None:
            return self._project_id
        project_id = self.projects.ensure_project(self.runs.run_id, self.config.feedback.annotators_per_image)
        storage = self.config.storage
        if storage.backend == "s3":
            assert storage.s3_bucket is not None
            self.projects.connect_s3(
                project_id,
                bucket=storage.s3_bucket,
                prefix=storage.s3_prefix,
                endpoint_url=str(storage.s3_endpoint_url) if storage.s3_endpoint_url else None,
                region=storage.s3_region,
                access_key_id=storage.s3_access_key_id,
                secret_access_key=storage.s3_secret_access_key,
                presign_ttl_s=storage.presigned_url_ttl_s,
                proxy=self.config.label_studio.proxy_images,
            )
        hook = self.config.orchestration.webhook_url
        if hook is not None:
            self.projects.ensure_webhook(project_id, str(hook), self.config.orchestration.webhook_secret)
        self._project_id = project_id
        return project_id

    def _url(self, key: str) -> str:
        storage = self.config.storage
        if storage.backend == "s3":
            return f"s3://{storage.s3_bucket}/{storage.s3_prefix}{key}"
        return "data:image/png;base64," + base64.b64encode(self.runs.store.get(key)).decode()

    def publish(
        self,
        round_index: int,
        current_best: np.ndarray | None,
        flow_run_id: str | None = None,
        rewards: list[float] | None = None,
    ) -> Published:
        """Publish committed round `round_index`; current_best: the best's pixels (None in round 0);
        rewards: the encoder's reward of each image (Engine.predicted_rewards), turned into suggestions
        when label_studio.suggestions is on."""
        manifest = self.runs.load_manifest(round_index)
        image_ids = list(manifest["image_ids"])
        prefix = self.runs.round_prefix(round_index)
        best_key = f"{prefix}/{CURRENT_BEST}"
        if not self.runs.store.exists(best_key):  # written once: what annotators of this round saw
            self.runs.put_round_object(round_index, CURRENT_BEST, _png(current_best))
        best_url = self._url(best_key)
        common = {"run_id": self.runs.run_id, "round_index": round_index, "prompt": manifest["prompt"]}
        suggested = (
            suggestions(rewards)
            if self.config.label_studio.suggestions and rewards is not None
            else [None] * len(image_ids)
        )
        tasks = [
            image_task(
                **common,
                image_id=image_id,
                position=position,
                image_url=self._url(f"{prefix}/images/{image_id}.png"),
                image_sha256=manifest["files"][f"images/{image_id}.png"]["sha256"],
                best_url=best_url,
                flow_run_id=flow_run_id,
                suggestion=suggested[position],
            )
            for position, image_id in enumerate(image_ids)
        ]
        tasks.append(
            best_task(
                **common,
                image_ids=image_ids,
                grid_url=self._url(f"{prefix}/{GRID}"),
                grid_sha256=manifest["files"][GRID]["sha256"],
                best_url=best_url,
                has_current_best=current_best is not None,
                flow_run_id=flow_run_id,
            )
        )
        if self.config.storage.backend == "local":
            largest = max(len(json.dumps(task["data"])) for task in tasks)
            if largest > INLINE_TASK_LIMIT_BYTES:
                raise ConfigError(
                    f"round {round_index}'s images are too large to travel inline (storage.backend local "
                    f"puts them in the tasks: the largest is {largest / 2**20:.1f} MiB, over "
                    f"{INLINE_TASK_LIMIT_BYTES / 2**20:.2f} MiB): label a real model's images with "
                    "storage.backend s3, which Label Studio reads by URL"
                )
        project_id = self.project()
        present = self.projects.held_tasks(project_id, tasks)  # another run's tasks: refused, nothing written
        self._withdraw_closed(list(present.values()), before=round_index)  # what their collection missed
        # the first attempt starts the clock, before the import: a crash part-way through the import
        # (tasks out, record not yet written) must not restart the deadline when publishing again
        published = self.runs.load_published(round_index)
        if published is None:
            published = PublishedRecord(
                published_at=_now(),
                project_id=project_id,
                flow_run_id=flow_run_id,
                tasks=len(tasks),
            )
            self.runs.save_published(round_index, published)
        elif published.project_id != project_id:
            # the project was made again (deleted, or Label Studio restored): the round's checks read the
            # project its tasks go to now; the deadline still counts from the first publication
            published = published.model_copy(update={"project_id": project_id, "imported_at": None})
            self.runs.save_published(round_index, published)
        created, existing = self.projects.publish(project_id, tasks, present)
        if published.imported_at is None or published.republish_failed_at is not None:
            done = {"imported_at": published.imported_at or _now(), "republish_failed_at": None}
            self.runs.save_published(round_index, published.model_copy(update=done))
        return Published(project_id, created, existing, self.projects.project_url(project_id))

    def publish_failed(self, round_index: int) -> None:
        """Record that publishing round `round_index` again failed (its tasks were all out before): its
        checks ask for the next try only REPUBLISH_BACKOFF later, should its tasks be gone."""
        published = self.runs.load_published(round_index)
        if published is not None:
            self.runs.save_published(
                round_index, published.model_copy(update={"republish_failed_at": _now()})
            )

    def readiness(self, round_index: int, now: datetime | None = None) -> Readiness:
        """Whether the published round may close now, by the run's policy (orchestration section).
        Reads the round's project as published: no project set-up, so a check costs one task read."""
        published = self.runs.load_published(round_index)
        if published is None:
            return Readiness(False, f"round {round_index} is not published")
        now = now or datetime.now(UTC)
        failed = published.republish_failed_at
        republish_after = None if failed is None else failed + REPUBLISH_BACKOFF
        try:
            project_tasks = self.projects.tasks(published.project_id)
        except LabelStudioError as err:
            if err.status_code != 404:
                raise
            gone = f"project {published.project_id} is gone from Label Studio"
            if republish_after is not None and now < republish_after:
                after = republish_after.isoformat(timespec="seconds")
                return Readiness(
                    False, f"{gone}: publishing round {round_index} again failed, next try after {after}"
                )
            again = (
                f"{gone}: publishing round {round_index} again (in the run's project, made anew if need be)"
            )
            return Readiness(False, again, republish=True)
        collected, _ = self._collect(round_index, self.runs.load_manifest(round_index), project_tasks)
        policy = self.config.orchestration
        return readiness(
            collected.progress,
            first_round=round_index == 0,
            published_at=published.published_at,
            now=now,
            deadline_h=policy.round_deadline_h,
            deadline_min_labels=policy.deadline_min_labels,
            not_counted=collected.problems,
            missing_tasks=collected.missing_tasks,
            republish_after=republish_after,
        )

    def _collect(
        self, round_index: int, manifest: dict[str, Any], project_tasks: list[dict]
    ) -> tuple[CollectedRound, list[dict]]:
        """The round's tasks among the project's (tasks without HERO metadata kept: they are reported),
        collected against its manifest's images and their digests."""
        tasks = [
            task
            for task in project_tasks
            if (key := task_key(task.get("data") or {})) is None
            or (key[0] == self.runs.run_id and key[1] == round_index)
        ]
        image_ids, files = list(manifest["image_ids"]), manifest["files"]
        digests = {i: files[f"images/{i}.png"]["sha256"] for i in image_ids} | {"": files[GRID]["sha256"]}
        collected = collect(
            tasks,
            run_id=self.runs.run_id,
            round_index=round_index,
            image_ids=image_ids,
            digests=digests,
            has_current_best=round_index > 0,
            annotators_per_image=self.config.feedback.annotators_per_image,
        )
        return collected, tasks

    def progress(self, round_indices: list[int]) -> dict[int, CollectedRound | str]:
        """Where each round's labelling stands: a collected round's as collected (its annotations.json:
        its unfinished tasks were withdrawn then), an open one's from its published project's tasks
        (one read a project); a round with no tasks to read, why ("not published", its project gone).
        Nothing is written or set up."""
        read: dict[int, list[dict] | None] = {}  # project id -> its tasks; None: the project is gone
        stands: dict[int, CollectedRound | str] = {}
        for k in round_indices:
            stored = self.runs.load_annotations(k)
            published = self.runs.load_published(k)
            if stored is not None and self.runs.load_feedback(k) is not None:  # collected: closed
                tasks = stored
            elif published is not None:
                if published.project_id not in read:
                    try:
                        read[published.project_id] = self.projects.tasks(published.project_id)
                    except LabelStudioError as err:
                        if err.status_code != 404:
                            raise
                        read[published.project_id] = None
                held = read[published.project_id]
                if held is None:
                    stands[k] = (
                        f"project {published.project_id} gone (the round's next check publishes it again)"
                    )
                    continue
                tasks = held
            else:
                stands[k] = "not published"
                continue
            stands[k] = self._collect(k, self.runs.load_manifest(k), tasks)[0]
        return stands

    def withdraw_closed(self, before: int) -> None:
        """Withdraw this run's unfinished tasks of rounds before `before` (all collected) from the
        project round before - 1 went to: what a failed withdrawal at their collection left (each
        publication does it too; the end of a run calls this)."""
        published = self.runs.load_published(before - 1) if before > 0 else None
        if published is not None:
            self._withdraw_closed(self.projects.tasks(published.project_id), before)

    def _withdraw_closed(self, tasks: list[dict], before: int) -> None:
        unfinished = self._unfinished(tasks, before)
        try:  # clean-up: never what stops a round
            self.projects.withdraw(unfinished)
        except LabelStudioError as err:
            logger.warning(
                "up to %d unfinished tasks of rounds before %d stay in Label Studio's queue, their labels "
                "read by no one: %s",
                len(unfinished),
                before,
                err,
            )
        else:
            if unfinished:
                logger.info(
                    "%d unfinished tasks of closed rounds withdrawn from Label Studio", len(unfinished)
                )

    def _unfinished(self, tasks: list[dict], before: int) -> list[int]:
        """The ids of this run's tasks of rounds before `before` that Label Studio would still hand out."""
        return [
            task["id"]
            for task in tasks
            if (key := task_key(task.get("data") or {})) is not None
            and key[0] == self.runs.run_id
            and key[1] < before
            and not task.get("is_labeled")
        ]

    def collect(self, round_index: int) -> tuple[RoundFeedback, CollectedRound]:
        """Store the round's raw annotations, then aggregate them (FeedbackError if images lack labels).
        Reads the project the round was published to, as `readiness` does: no project set-up (a set-up
        Label Studio refuses must not stop a labelled round from closing)."""
        manifest = self.runs.load_manifest(round_index)
        image_ids = list(manifest["image_ids"])
        published = self.runs.load_published(round_index)
        project_id = self.project() if published is None else published.project_id
        collected, tasks = self._collect(round_index, manifest, self.projects.tasks(project_id))
        record = {
            "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "progress": str(collected.progress),
            "problems": collected.problems,
            "cancelled": collected.cancelled,
            "replaced": collected.replaced,
            "tasks": tasks,
        }
        self.runs.put_round_object(
            round_index, ANNOTATIONS, json.dumps(record, indent=1, default=str).encode()
        )
        crash_point("collect")
        feedback = collected.round_feedback(image_ids, has_current_best=round_index > 0)
        # tracked before the feedback is stored: a crash between the two tracks them again on resume
        # (the same values at the same step), where the other order would lose them for good
        if self.tracker is not None:
            self.tracker.log_metrics(
                {
                    "labelling_label_agreement": feedback.label_agreement,
                    "labelling_unanimous_share": feedback.unanimous_share,
                    "labelling_best_agreement": feedback.best_agreement,
                    "labelling_annotators": len(feedback.annotators),
                    "labelling_skipped": collected.cancelled,
                    "labelling_problems": len(collected.problems),
                },
                step=round_index,
            )
        self.runs.save_feedback(round_index, feedback, collected.feedback)
        # closed: its unfinished tasks go, or Label Studio would hand them out before the next round's
        # (the oldest first) and their labels would be read by no one; missed here, the next publication
        # or the run's end does it
        self._withdraw_closed(tasks, before=round_index + 1)
        return feedback, collected


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _png(pixels: np.ndarray | None) -> bytes:
    """The current best as PNG, or a placeholder saying there is none yet (round 0)."""
    if pixels is not None:
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    else:
        image = Image.new("RGB", (128, 128), (235, 235, 235))
        ImageDraw.Draw(image).text((12, 56), "no best yet", fill=(90, 90, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
