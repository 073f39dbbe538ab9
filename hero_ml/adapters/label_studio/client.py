"""Label Studio through label-studio-sdk: a project per run, idempotent task import, an S3 source
storage connection, and the round's tasks with their annotations. Errors become LabelStudioError with
the status and Label Studio's own explanation, never the API token."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from pydantic import SecretStr

from hero_ml.adapters.label_studio.rounds import INSTRUCTIONS, LABEL_CONFIG, TaskKey, task_key
from hero_ml.config import SECRET_MASK
from hero_ml.errors import HeroError
from hero_ml.faults import crash_point
from hero_ml.redact import mask_secrets

T = TypeVar("T")
WEBHOOK_SECRET_HEADER = "X-Hero-Webhook-Secret"
IMPORT_CHUNK = 32  # tasks per import call: a large round goes out in several requests
BODY_SHOWN = 500  # characters of a refusal's body an error quotes (a proxy may answer a whole page)


class LabelStudioError(HeroError, RuntimeError):
    """Label Studio refused a request or could not be reached; the message says which and why.
    status_code: the refusal's HTTP status (None when Label Studio was not reached)."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class LabelStudioProjects:
    def __init__(self, url: str, api_key: SecretStr, title_prefix: str = "HERO", timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.title_prefix = title_prefix
        self.client = LabelStudio(base_url=self.url, api_key=api_key.get_secret_value(), timeout=timeout_s)
        # and each webhook secret or S3 key sent: never echoed. Kept as SecretStr: an encoder that walks
        # this object (Prefect's, for a flow's parameters) finds masks
        self._secrets: list[SecretStr] = [api_key]

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except ApiError as err:
            # a server or proxy may echo the request it refused, in its own escaping
            body = mask_secrets(str(err.body), self._secret_values(), SECRET_MASK)
            body = body if len(body) <= BODY_SHOWN else body[: BODY_SHOWN - 1] + "…"
            if err.status_code is not None and 200 <= err.status_code < 300:
                # a success the SDK could not read: not Label Studio's API at this URL
                raise self._not_label_studio(what, f"HTTP {err.status_code}: {body[:200]}") from None
            refused = f"Label Studio refused to {what} (HTTP {err.status_code}): {body}"
            if err.status_code == 401:
                refused += (
                    f"; check HERO_LABEL_STUDIO__API_KEY (an access token of {self.url}'s Account page)"
                )
            raise LabelStudioError(refused, err.status_code) from None
        except httpx.HTTPError as err:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} to {what}: {err}; start it "
                "(infra/label-studio.sh start) or set HERO_LABEL_STUDIO__URL"
            ) from None
        except (TypeError, ValueError) as err:  # the SDK could not read a 2xx answer's JSON as its type
            error = mask_secrets(f"{type(err).__name__}: {err}", self._secret_values(), SECRET_MASK)[
                :BODY_SHOWN
            ]
            raise self._not_label_studio(what, f"JSON the SDK cannot read ({error})") from None

    def _secret_values(self) -> set[str]:
        return {secret.get_secret_value() for secret in self._secrets}

    def _call(self, what: str, request: Callable[[], T]) -> T:
        with self._calling(what):
            return request()

    def _not_label_studio(self, what: str, answer: str) -> LabelStudioError:
        return LabelStudioError(
            f"the server at {self.url} is not Label Studio: asked to {what}, it answered {answer}; "
            "check HERO_LABEL_STUDIO__URL"
        )

    def check(self) -> None:
        """Label Studio answers at its URL and takes the API key (one light request)."""
        user = self._call("say who the API key belongs to", self.client.users.whoami)
        if getattr(user, "id", None) is None:
            raise self._not_label_studio("say who the API key belongs to", "no user id")

    def title(self, run_id: str) -> str:
        return f"{self.title_prefix} {run_id}"

    def ensure_project(self, run_id: str, annotators_per_image: int) -> int:
        """The run's project, created on first use with HERO's labeling config (Label Studio
        validates it then) and `annotators_per_image` annotations wanted per task."""
        title = self.title(run_id)
        projects: list[Any] = self._call(
            "list projects", lambda: list(self.client.projects.list(title=title))
        )
        for project in projects:
            if project.title == title:
                return int(project.id)
        project = self._call(
            f"create project {title!r}",
            lambda: self.client.projects.create(
                title=title,
                description=f"HERO run {run_id}: image tasks (good/bad) and one best task per round.",
                label_config=LABEL_CONFIG,
                expert_instruction=INSTRUCTIONS,
                show_instruction=True,
                show_skip_button=True,
                maximum_annotations=annotators_per_image,
            ),
        )
        if project.id is None:
            raise self._not_label_studio(f"create project {title!r}", "no project id")
        return int(project.id)

    def connect_s3(
        self,
        project_id: int,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: SecretStr | None,
        secret_access_key: SecretStr | None,
        presign_ttl_s: int,
        proxy: bool = False,
    ) -> None:
        """Let Label Studio show `s3://bucket/…` task images: it answers each image request with a
        presigned URL of its own (fresh at every view, so tasks never outlive their links), or, proxy,
        with the image itself, read from S3 (annotators' browsers never reach S3). A storage already
        connected gets today's credentials and settings (keys may have been rotated since)."""
        self._secrets += [key for key in (access_key_id, secret_access_key) if key]
        existing = self._call(
            "list S3 storages", lambda: list(self.client.import_storage.s3.list(project=project_id))
        )
        settings: dict[str, Any] = {
            "s3endpoint": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key_id.get_secret_value() if access_key_id else None,
            "aws_secret_access_key": secret_access_key.get_secret_value() if secret_access_key else None,
            "presign": not proxy,
            "presign_ttl": max(1, math.ceil(presign_ttl_s / 60)),  # Label Studio counts minutes
            "use_blob_urls": False,
            "recursive_scan": True,
        }
        connected = [s.id for s in existing if s.bucket == bucket and (s.prefix or "") == prefix and s.id]
        if connected:
            storage_id = connected[0]
            self._call(
                "update S3 storage", lambda: self.client.import_storage.s3.update(id=storage_id, **settings)
            )
            return
        self._call(
            "connect S3 storage",
            lambda: self.client.import_storage.s3.create(
                project=project_id,
                title=f"HERO images s3://{bucket}/{prefix}",
                bucket=bucket,
                prefix=prefix,
                **settings,
            ),
        )

    def ensure_webhook(self, project_id: int, url: str, secret: SecretStr | None) -> str:
        """Label Studio posts the project's annotation events (created, bulk-created, updated) to
        `url`, carrying the shared secret in WEBHOOK_SECRET_HEADER (Label Studio signs nothing). A
        webhook already there gets today's secret (it may have been rotated since). Returns what was
        done: "registered", "secret updated" or "already registered"."""
        existing = self._call(
            "list webhooks", lambda: list(self.client.webhooks.list(project=str(project_id)))
        )
        headers = {WEBHOOK_SECRET_HEADER: secret.get_secret_value()} if secret is not None else {}
        self._secrets += [secret] if secret is not None else []
        registered = [hook for hook in existing if hook.url == url]
        if registered:
            hook_id = registered[0].id
            if (registered[0].headers or {}) != headers and hook_id is not None:
                self._call(
                    "update webhook secret", lambda: self.client.webhooks.update(id=hook_id, headers=headers)
                )
                return "secret updated"
            return "already registered"
        self._call(
            "create webhook",
            lambda: self.client.webhooks.create(
                url=url,
                project=project_id,
                actions=["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"],
                headers=headers,
                send_payload=True,
                send_for_all_actions=False,
                is_active=True,
            ),
        )
        return "registered"

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations, as JSON dicts."""
        with self._calling("list tasks"):
            # resolve_uri=False: the data as imported (s3:// URLs), not rewritten to Label Studio's proxy
            # links, which publish would write back into a task it re-points
            found: list[Any] = list(
                self.client.tasks.list(project=project_id, fields="all", resolve_uri=False)
            )
            return [task.model_dump() for task in found]

    def held_tasks(
        self, project_id: int, tasks: list[dict[str, Any]]
    ) -> dict[TaskKey | None, dict[str, Any]]:
        """The project's tasks by run, round, kind and image id, refusing any that is one of `tasks`
        but shows other pixels (an earlier run of the same name, whose project was kept: its labels
        are not this round's). A task published by a release before the digest has none to compare."""
        present: dict[TaskKey | None, dict[str, Any]] = {}
        for task in self.tasks(project_id):  # the first of tasks claiming one key, as collect counts it
            present.setdefault(task_key(task["data"]), task)
        foreign = [
            held["id"]
            for task in tasks
            if (held := present.get(task_key(task["data"]))) is not None
            and held["data"]["hero"].get("sha256") not in (None, task["data"]["hero"]["sha256"])
        ]
        if foreign:
            hero = tasks[0]["data"]["hero"]
            raise LabelStudioError(
                f"project {self.project_url(project_id)} already holds round {hero['round']} of a run named "
                f"{hero['run_id']!r} showing other images (tasks {foreign[:5]}): an earlier run of that "
                "name, whose project was kept. Archive or rename that project in Label Studio, or start "
                "this run with another run_id"
            )
        return present

    def publish(
        self, project_id: int, tasks: list[dict[str, Any]], present: dict[TaskKey | None, dict[str, Any]]
    ) -> tuple[int, int]:
        """Import the tasks (Label Studio's import form: {"data": …, "predictions": […]}) the project
        does not hold yet (present: held_tasks'), so publishing a round twice creates nothing the
        second time. A task already there that names another flow run (a run restarted in a new one)
        is pointed at this one: its annotation events must resume the live flow run.
        Returns (created, already there)."""
        new = [task for task in tasks if task_key(task["data"]) not in present]
        for task in tasks:
            held = present.get(task_key(task["data"]))
            flow_run = task["data"]["hero"].get("flow_run_id")
            if held is not None and held["data"].get("hero", {}).get("flow_run_id") != flow_run:
                data = {**held["data"], "hero": {**held["data"]["hero"], "flow_run_id": flow_run}}
                self._call(
                    "point a task at this flow run",
                    lambda held=held, data=data: self.client.tasks.update(id=held["id"], data=data),  # type: ignore[misc]
                )
        for start in range(0, len(new), IMPORT_CHUNK):
            chunk = new[start : start + IMPORT_CHUNK]
            self._call(
                f"import {len(chunk)} tasks",
                lambda chunk=chunk: self.client.projects.import_tasks(  # type: ignore[misc]
                    id=project_id,
                    request=chunk,  # task data: plain JSON objects
                    return_task_ids=True,
                ),
            )
            crash_point("publish")
        return len(new), len(tasks) - len(new)

    def withdraw(self, task_ids: list[int]) -> None:
        """Delete tasks (a closed round's unfinished ones: Label Studio hands out the oldest tasks first,
        and their labels would be read by no one); one already gone counts as withdrawn."""
        for task_id in task_ids:
            try:
                self._call(f"withdraw task {task_id}", partial(self.client.tasks.delete, id=str(task_id)))
            except LabelStudioError as err:
                if err.status_code != 404:
                    raise

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}/data"
