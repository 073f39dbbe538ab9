"""Human feedback through a real Label Studio server (its own venv, on loopback): a round published
from S3 storage, annotators with their own accounts posting annotations through the API as the web
page does, the round collected, aggregated and stored for audit."""

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from label_studio_sdk import LabelStudio
from pydantic import HttpUrl, SecretStr
from typer.testing import CliRunner

from hero_ml.adapters.label_studio.client import IMPORT_CHUNK, LabelStudioError, LabelStudioProjects
from hero_ml.adapters.label_studio.rounds import LABEL_CONFIG
from hero_ml.adapters.storage import open_store
from hero_ml.adapters.tracking.mlflow import MlflowTracker
from hero_ml.cli import app
from hero_ml.config import ConfigError, HeroConfig, StorageConfig
from hero_ml.diffusion.pipeline import build_random_pipeline
from hero_ml.engine import sample_batch
from hero_ml.faults import CRASH_ENV
from hero_ml.labelling import LabelStudioRounds, Readiness
from hero_ml.run_store import ANNOTATIONS, RunStore
from hero_ml.training import TrainingRun
from tests.conftest import LabelStudioServer, Service, create_annotator, s3_storage, tiny_run
from tests.fault_proxy import FaultProxy

PROMPT = "three red circles"
runner = CliRunner()


def make_run(
    s3_server: Service, label_studio_server: LabelStudioServer, **label_studio: Any
) -> tuple[HeroConfig, RunStore]:
    """A committed round of 4 images in S3, and the config that publishes it to Label Studio (people
    label its prompt: no toy task)."""
    config = HeroConfig(
        run_id=f"ls-{uuid.uuid4().hex[:6]}",
        model={"source": "random:tiny"},
        sampling={"prompt": PROMPT, "images_per_round": 4, "num_steps": 2, "sub_batch_size": 4},
        simulation={"task": None},
        ddpo={"timesteps_per_trajectory": 1},
        feedback={"budget": 8, "annotators_per_image": 2},
        storage={
            "backend": "s3",
            "s3_bucket": "hero-test",
            "s3_endpoint_url": s3_server.url,
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
            "s3_prefix": f"t-{uuid.uuid4().hex[:8]}/",
        },
        label_studio={
            "enabled": True,
            "url": label_studio_server.url,
            "api_key": label_studio_server.admin_token,
            **label_studio,
        },
    )
    runs = RunStore(open_store(config.storage), config.run_id)
    batch = sample_batch(build_random_pipeline("tiny", seed=0), config.sampling, 0)
    runs.commit_batch(batch, {"prompt": PROMPT})
    return config, runs


@pytest.fixture
def run(s3_server: Service, label_studio_server: LabelStudioServer) -> tuple[HeroConfig, RunStore]:
    return make_run(s3_server, label_studio_server)


def rounds(config: HeroConfig, runs: RunStore) -> LabelStudioRounds:
    assert config.label_studio.api_key is not None
    projects = LabelStudioProjects(str(config.label_studio.url), config.label_studio.api_key)
    return LabelStudioRounds(config, runs, projects)


def choice(control: str, value: str) -> list[dict[str, Any]]:
    return [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def test_publish_is_idempotent_and_images_display_through_s3(
    run: tuple[HeroConfig, RunStore], label_studio_server: LabelStudioServer
) -> None:
    config, runs = run
    published = rounds(config, runs).publish(0, current_best=None, flow_run_id="flow-123")
    assert (published.created, published.existing) == (5, 0)  # 4 image tasks + the best task
    again = rounds(config, runs).publish(0, current_best=None, flow_run_id="flow-123")
    assert (again.project_id, again.created, again.existing) == (published.project_id, 0, 5)

    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    tasks = list(admin.tasks.list(project=published.project_id, fields="all"))
    assert len(tasks) == 5
    image_task = next(t for t in tasks if t.data["hero"]["kind"] == "image")
    assert image_task.data["hero"]["flow_run_id"] == "flow-123"
    # Label Studio hands the page a resolve URL for the task's s3:// URI ...
    resolve = image_task.data["image"]
    assert resolve.startswith(f"{label_studio_server.url}/tasks/{image_task.id}/resolve/?fileuri=")
    s3_uri = base64.b64decode(resolve.split("fileuri=")[1]).decode()
    assert s3_uri.startswith(
        f"s3://hero-test/{config.storage.s3_prefix}runs/{config.run_id}/rounds/0/images/"
    )
    # ... and answers it with a redirect to a fresh presigned S3 URL: what the browser's <img> loads
    headers = {"Authorization": f"Token {label_studio_server.admin_token}"}
    redirect = requests.get(resolve, headers=headers, timeout=30, allow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["Location"].startswith(
        str(config.storage.s3_endpoint_url)
    )
    image = requests.get(resolve, headers=headers, timeout=30)
    image_id = image_task.data["hero"]["image_id"]
    assert image.status_code == 200
    assert image.content == runs.store.get(f"runs/{config.run_id}/rounds/0/images/{image_id}.png")
    assert image.content.startswith(b"\x89PNG")

    # the run restarted in a new flow run (a dead worker's recovery) with rotated S3 keys: the tasks
    # now name the live flow run, whose annotation events must resume it, and Label Studio's storage
    # gets today's settings (Label Studio never shows keys: the link lifetime, sent with them, shows)
    (connected,) = admin.import_storage.s3.list(project=published.project_id)
    assert connected.presign_ttl == 15  # storage.presigned_url_ttl_s 900 s, in minutes
    storage = config.storage.model_copy(
        update={"s3_access_key_id": SecretStr("rotated-key-id"), "presigned_url_ttl_s": 1800}
    )
    restarted = rounds(config.model_copy(update={"storage": storage}), runs)
    moved = restarted.publish(0, current_best=None, flow_run_id="flow-456")
    assert (moved.created, moved.existing) == (0, 5)
    tasks = list(admin.tasks.list(project=published.project_id, fields="all", resolve_uri=False))
    assert {t.data["hero"]["flow_run_id"] for t in tasks} == {"flow-456"}
    # re-pointing wrote back the data as imported, not Label Studio's proxy links (host-bound)
    assert all(t.data["image"].startswith("s3://") for t in tasks if t.data["hero"]["kind"] == "image")
    (connected,) = admin.import_storage.s3.list(project=published.project_id)
    assert connected.presign_ttl == 30
    assert requests.get(resolve, headers=headers, timeout=30).content == image.content
    # an S3 endpoint only the services resolve (compose's minio:9000): Label Studio streams the image
    proxied = config.label_studio.model_copy(update={"proxy_images": True})
    rounds(config.model_copy(update={"label_studio": proxied}), runs).publish(0, current_best=None)
    streamed = requests.get(resolve, headers=headers, timeout=30, allow_redirects=False)
    assert streamed.status_code == 200 and streamed.content == image.content


def test_a_new_run_under_a_kept_projects_name_is_refused_not_fed_its_labels(
    s3_server: Service, label_studio_server: LabelStudioServer
) -> None:
    config, runs = make_run(s3_server, label_studio_server)
    first = rounds(config, runs).publish(0, current_best=None, flow_run_id="flow-old")
    # the same run_id started again on fresh storage (data deleted, another bucket or prefix): other
    # images, the old project still in Label Studio under the run's name
    storage = config.storage.model_copy(update={"s3_prefix": f"t-{uuid.uuid4().hex[:8]}/"})
    again = config.model_copy(update={"storage": storage})
    again_runs = RunStore(open_store(storage), config.run_id)
    batch = sample_batch(build_random_pipeline("tiny", seed=1), config.sampling, 0)
    again_runs.commit_batch(batch, {"prompt": PROMPT})
    with pytest.raises(LabelStudioError, match=f"already holds round 0 of a run named '{config.run_id}'"):
        rounds(again, again_runs).publish(0, current_best=None, flow_run_id="flow-new")
    assert again_runs.load_published(0) is None  # nothing written: the clock has not started
    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    tasks = list(admin.tasks.list(project=first.project_id, fields="all"))
    assert len(tasks) == 5 and {t.data["hero"]["flow_run_id"] for t in tasks} == {"flow-old"}


def test_images_too_large_to_travel_inline_are_refused_before_anything_goes_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # local storage puts the pictures in the tasks: a real model's would break webhook events
    import hero_ml.labelling

    config = HeroConfig(
        run_id="inline",
        model={"source": "random:tiny"},
        sampling={"prompt": PROMPT, "images_per_round": 4, "num_steps": 2, "sub_batch_size": 4},
        ddpo={"timesteps_per_trajectory": 1},
        storage={"local_root": str(tmp_path)},
        label_studio={"enabled": True, "url": "http://127.0.0.1:9", "api_key": "unused"},  # never asked
    )
    runs = RunStore(open_store(config.storage), config.run_id)
    runs.commit_batch(
        sample_batch(build_random_pipeline("tiny", seed=0), config.sampling, 0), {"prompt": PROMPT}
    )
    humans = rounds(config, runs)
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio"):  # small enough: it goes on
        humans.publish(0, current_best=None)
    monkeypatch.setattr(hero_ml.labelling, "INLINE_TASK_LIMIT_BYTES", 1024)  # tiny images, a tiny limit
    with pytest.raises(ConfigError, match=r"round 0's images are too large .* storage.backend s3"):
        humans.publish(0, current_best=None)
    assert runs.load_published(0) is None


def test_a_round_whose_project_was_made_again_is_checked_where_its_tasks_are_now(
    s3_server: Service, label_studio_server: LabelStudioServer
) -> None:
    config, runs = make_run(s3_server, label_studio_server)
    first = rounds(config, runs).publish(0, current_best=None, flow_run_id="flow-1")
    published_at = runs.load_published(0).published_at
    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    admin.projects.delete(id=first.project_id)  # reset by hand, or lost with Label Studio's data
    # its labels can no longer come: the round is to be entered again, which publishes it anew
    gone = rounds(config, runs).readiness(0)
    assert gone.republish and not gone.ready
    assert gone.reason.startswith(f"project {first.project_id} is gone from Label Studio: publishing round 0")
    # `hero labelstudio status` says so for the round (and makes no project under the run's title)
    assert rounds(config, runs).progress([0]) == {
        0: f"project {first.project_id} gone (the round's next check publishes it again)"
    }
    assert [p for p in admin.projects.list() if p.title == f"HERO {config.run_id}"] == []
    again = rounds(config, runs).publish(0, current_best=None, flow_run_id="flow-1")
    assert again.project_id != first.project_id and again.created == 5
    record = runs.load_published(0)
    assert (record.project_id, record.published_at) == (again.project_id, published_at)  # same deadline
    assert rounds(config, runs).readiness(0).reason == "waiting for 0/8 labels, 0/2 best votes"


def test_a_closed_rounds_unfinished_tasks_leave_the_queue_and_a_deleted_task_is_published_again(
    s3_server: Service, label_studio_server: LabelStudioServer, caplog: pytest.LogCaptureFixture
) -> None:
    with behind_the_fault_proxy(s3_server, label_studio_server, frozenset({"DELETE"})) as (
        config,
        runs,
        _,
        down,
    ):
        humans = rounds(config, runs)
        project = humans.publish(0, current_best=None).project_id
        admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)

        def held() -> dict[tuple[int, str, str], int]:
            listed = admin.tasks.list(project=project, fields="all")
            return {
                (t.data["hero"]["round"], t.data["hero"]["kind"], t.data["hero"].get("image_id") or ""): t.id
                for t in listed
            }

        image_ids = list(runs.load_manifest(0)["image_ids"])
        # a task deleted in Label Studio: its image's labels cannot come, so the round is to be entered
        # again (the poller resumes it), which publishes the task anew
        admin.tasks.delete(id=str(held()[(0, "image", image_ids[3])]))
        gone = humans.readiness(0)
        assert gone.republish and not gone.ready and f"(e.g. image {image_ids[3]!r})" in gone.reason
        assert humans.publish(0, current_best=None).created == 1
        assert not humans.readiness(0).republish

        # every image labelled once of the two wanted and one best vote of two: the round closes short (a
        # deadline), and Label Studio would hand its tasks out before the next round's, the oldest first
        tasks = held()
        annotator = LabelStudio(
            base_url=label_studio_server.url,
            api_key=create_annotator(
                label_studio_server, f"dee-{uuid.uuid4().hex[:6]}@hero.local", "dee-password-123"
            ),
        )
        for image_id in image_ids:
            annotator.annotations.create(
                id=tasks[(0, "image", image_id)], result=choice("label", "good"), was_cancelled=False
            )
        annotator.annotations.create(id=tasks[(0, "best", "")], result=choice("best", image_ids[0]))
        down.set()  # Label Studio refuses the withdrawal: the round is learned all the same
        with caplog.at_level(logging.WARNING, logger="hero_ml.labelling"):
            feedback, _ = humans.collect(0)
        assert feedback.good == (True, True, True, True)
        assert "up to 5 unfinished tasks of rounds before 1 stay in Label Studio's queue" in caplog.text
        assert len(held()) == 5
        down.clear()

        # the next round's publication withdraws them; round 0's labels stay in its annotations.json
        batch = sample_batch(build_random_pipeline("tiny", seed=0), config.sampling, 1)
        runs.commit_batch(batch, {"prompt": PROMPT})
        humans.publish(1, current_best=batch.trajectory.images[0].numpy())
        assert sorted(held()) == sorted(
            (1, kind, i) for kind, i in [("best", ""), *(("image", i) for i in batch.image_ids)]
        )
        stored = json.loads(runs.store.get(f"{runs.round_prefix(0)}/{ANNOTATIONS}"))
        assert sum(len(task["annotations"]) for task in stored["tasks"]) == 5

        # collected without a fault, a round withdraws its own unfinished tasks at once
        tasks = held()
        for image_id in batch.image_ids:
            annotator.annotations.create(
                id=tasks[(1, "image", image_id)], result=choice("label", "bad"), was_cancelled=False
            )
        annotator.annotations.create(id=tasks[(1, "best", "")], result=choice("best", "keep"))
        humans.collect(1)
        assert held() == {}


@contextlib.contextmanager
def behind_the_fault_proxy(
    s3_server: Service, label_studio_server: LabelStudioServer, methods: frozenset[str] | None = None
) -> Iterator[tuple[HeroConfig, RunStore, FaultProxy, threading.Event]]:
    """A training run's committed round 0 whose Label Studio is reached through the fault proxy, which
    answers every request (of `methods`, when given) with 503 once the event is set (an outage)."""
    down = threading.Event()

    def plan(n: int, method: str, path: str) -> str | None:
        return "503" if down.is_set() and (methods is None or method in methods) else None

    with FaultProxy(label_studio_server.url, plan) as proxy:
        config, runs = make_run(s3_server, label_studio_server)
        proxied = config.label_studio.model_copy(update={"url": HttpUrl(proxy.url)})
        config = config.model_copy(update={"label_studio": proxied})
        runs.save_config(config.to_public_dict())  # a training run's round 0, not `hero sample`'s
        yield config, runs, proxy, down


def test_a_published_round_label_studio_cannot_check_waits_instead_of_failing_the_run(
    s3_server: Service, label_studio_server: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Label Studio down after the round went out (a restart, an outage): a failed flow run would wait
    # for a person; a waiting one is checked again by the poller
    import flows.round

    with behind_the_fault_proxy(s3_server, label_studio_server) as (config, runs, proxy, down):
        humans = rounds(config, runs)
        # the round's own retries (5, 30, 120 s) are not what is tested: one try each
        for name in ("check_labelling", "collect_annotations"):
            monkeypatch.setattr(flows.round, name, getattr(flows.round, name).with_options(retries=0))
        with TrainingRun(config, runs.store) as run:
            first = flows.round.hero_round(run, 0, humans)
            assert first.stats is None and first.waiting is not None
            assert first.waiting.reason == "waiting for 0/8 labels, 0/2 best votes"
            publish = flows.round.publish_round

            def publish_then_go_down(*args: Any) -> Any:  # the outage begins once the round is out
                published = publish(*args)
                down.set()
                return published

            monkeypatch.setattr(flows.round, "publish_round", publish_then_go_down)
            outage = flows.round.hero_round(run, 0, humans)
        assert outage.stats is None and outage.waiting is not None and not outage.waiting.ready
        assert outage.waiting.reason.startswith("cannot check round 0 in Label Studio: Label Studio refused")
        assert "(HTTP 503)" in outage.waiting.reason and proxy.injected


def test_a_round_entered_again_in_an_outage_waits_once_all_its_tasks_are_out(
    s3_server: Service, label_studio_server: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a resumed round publishes again (idempotent) before it checks: Label Studio down at that moment
    # must not fail a round whose tasks are all out, but must fail one whose import was cut short
    import flows.round

    with behind_the_fault_proxy(s3_server, label_studio_server) as (config, runs, proxy, down):
        for name in ("publish_round", "check_labelling"):
            monkeypatch.setattr(flows.round, name, getattr(flows.round, name).with_options(retries=0))
        with TrainingRun(config, runs.store) as run:
            first = flows.round.hero_round(run, 0, rounds(config, runs))
            assert first.waiting is not None
            assert first.waiting.reason == "waiting for 0/8 labels, 0/2 best votes"
            imported = runs.load_published(0)
            assert imported is not None and imported.imported_at is not None
            assert imported.imported_at >= imported.published_at
            down.set()
            # a new LabelStudioRounds, as a resumed process has: it sets up the project again
            again = flows.round.hero_round(run, 0, rounds(config, runs))
            assert again.stats is None and again.waiting is not None and not again.waiting.ready
            assert again.waiting.reason.startswith("cannot publish round 0 again in Label Studio: ")
            assert "; cannot check round 0 in Label Studio: " in again.waiting.reason
            assert "(HTTP 503)" in again.waiting.reason and proxy.injected
            assert runs.load_published(0).republish_failed_at is not None  # should its tasks be gone
            # the record as an import cut short leaves it (written before the import, not after)
            runs.save_published(0, imported.model_copy(update={"imported_at": None}))
            with pytest.raises(LabelStudioError, match="HTTP 503"):
                flows.round.hero_round(run, 0, rounds(config, runs))
            assert run.engine.round == 0


def test_a_round_whose_deleted_tasks_cannot_be_published_again_is_retried_an_hour_later(
    s3_server: Service, label_studio_server: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each try is a resumed flow run (a process start, a model load, the publication's retries): a
    # refusal that lasts must not have the poller resume the round at every check
    import flows.round

    with behind_the_fault_proxy(s3_server, label_studio_server, frozenset({"POST"})) as (
        config,
        runs,
        _,
        down,
    ):
        for name in ("publish_round", "check_labelling"):
            monkeypatch.setattr(flows.round, name, getattr(flows.round, name).with_options(retries=0))
        admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
        with TrainingRun(config, runs.store) as run:
            assert flows.round.hero_round(run, 0, rounds(config, runs)).waiting is not None
            project = runs.load_published(0).project_id
            (best,) = [
                t for t in admin.tasks.list(project=project, fields="all") if t.data["hero"]["kind"] == "best"
            ]
            admin.tasks.delete(id=str(best.id))
            assert rounds(config, runs).readiness(0).republish  # the poller would resume it
            down.set()  # the import refused
            again = flows.round.hero_round(run, 0, rounds(config, runs))
            assert again.waiting is not None and not again.waiting.republish
            assert "publishing them again failed, next try after" in again.waiting.reason
            failed = runs.load_published(0).republish_failed_at
            assert not rounds(config, runs).readiness(0).republish  # the poller leaves it
            later = rounds(config, runs).readiness(0, now=failed + timedelta(hours=1, seconds=1))
            assert later.republish
            down.clear()
            healed = flows.round.hero_round(run, 0, rounds(config, runs))
            assert (
                healed.waiting is not None
                and healed.waiting.reason == "waiting for 0/8 labels, 0/2 best votes"
            )
            assert runs.load_published(0).republish_failed_at is None


def test_a_labelled_round_entered_again_is_learned_though_label_studio_refuses_its_set_up(
    s3_server: Service,
    label_studio_server: LabelStudioServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Label Studio answers reads but refuses the project's set-up (its S3 storage's update: e.g.
    # restarted without HERO_LABEL_STUDIO_ALLOW_LOOPBACK). The resumer reads the round complete; had the
    # round waited on the refusal, the poller would resume it again at every interval, for ever
    import flows.round

    with behind_the_fault_proxy(s3_server, label_studio_server, frozenset({"PATCH"})) as (
        config,
        runs,
        proxy,
        refused,
    ):
        config = config.model_copy(
            update={
                "tracking": config.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/m.db"})
            }
        )
        for name in ("publish_round", "check_labelling"):
            monkeypatch.setattr(flows.round, name, getattr(flows.round, name).with_options(retries=0))
        with TrainingRun(config, runs.store) as run:
            assert flows.round.hero_round(run, 0, rounds(config, runs)).waiting is not None
            published = runs.load_published(0)
            assert published is not None
            refused.set()
            waiting = flows.round.hero_round(run, 0, rounds(config, runs)).waiting
            assert waiting is not None and waiting.reason.startswith("cannot publish round 0 again")
            assert "refused to update S3 storage (HTTP 503)" in waiting.reason
            assert waiting.reason.endswith("; waiting for 0/8 labels, 0/2 best votes")
            tag = uuid.uuid4().hex[:6]
            image_ids = list(runs.load_manifest(0)["image_ids"])
            for name in ("ann", "bob"):
                team = LabelStudio(
                    base_url=label_studio_server.url,
                    api_key=create_annotator(label_studio_server, f"{name}-{tag}@hero.local", "password-123"),
                )
                for task in team.tasks.list(project=published.project_id, fields="all"):
                    is_image = task.data["hero"]["kind"] == "image"
                    value = choice("label", "good") if is_image else choice("best", image_ids[0])
                    team.annotations.create(id=task.id, result=value, was_cancelled=False)
            learned = flows.round.hero_round(run, 0, rounds(config, runs))
            assert learned.stats is not None and run.engine.round == 1
        assert {method for _, method, _, _ in proxy.injected} == {"PATCH"}


def test_a_round_that_changed_between_its_check_and_its_collection_waits_again(
    s3_server: Service, label_studio_server: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check saw the round complete, then an annotation was deleted before the collection read the
    # project (the race is injected: the check's answer is the one it gave before the deletion)
    import flows.round

    config, runs = make_run(s3_server, label_studio_server)
    runs.save_config(config.to_public_dict())  # a training run's round 0, not `hero sample`'s
    monkeypatch.setattr(flows.round, "check_labelling", lambda humans, k: Readiness(True, "complete"))
    retry_once = flows.round.collect_annotations.with_options(retries=0)
    monkeypatch.setattr(flows.round, "collect_annotations", retry_once)
    with TrainingRun(config, runs.store) as run:
        outcome = flows.round.hero_round(run, 0, rounds(config, runs))
        assert run.engine.round == 0  # nothing learned
    assert outcome.stats is None and outcome.waiting is not None and not outcome.waiting.ready
    assert outcome.waiting.reason.startswith("round 0 changed while it was collected: no usable annotation")
    assert runs.load_feedback(0) is None


def test_a_team_labels_a_round_and_the_pipeline_reads_exactly_that(
    run: tuple[HeroConfig, RunStore], label_studio_server: LabelStudioServer, tmp_path: Path
) -> None:
    config, runs = run
    labelling = rounds(config, runs)
    labelling.tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "hero", config.run_id)
    project = labelling.publish(0, current_best=None).project_id
    tag = uuid.uuid4().hex[:6]
    clients = {
        name: LabelStudio(
            base_url=label_studio_server.url,
            api_key=create_annotator(label_studio_server, f"{name}-{tag}@hero.local", f"{name}-password-123"),
        )
        for name in ("ann", "bob", "cat")
    }
    ids = {name: str(client.users.whoami().id) for name, client in clients.items()}
    tasks = {
        (t.data["hero"]["kind"], t.data["hero"].get("image_id", "")): t.id
        for t in clients["ann"].tasks.list(project=project, fields="all")
    }
    image_ids = list(runs.load_manifest(0)["image_ids"])
    image = {n: tasks[("image", i)] for n, i in enumerate(image_ids)}

    def label(who: str, n: int, value: str) -> Any:
        return clients[who].annotations.create(
            id=image[n], result=choice("label", value), was_cancelled=False
        )

    label("ann", 0, "good"), label("bob", 0, "good"), label("cat", 0, "bad")  # a disagreement
    label("ann", 1, "bad"), label("bob", 1, "bad")
    clients["cat"].annotations.create(id=image[1], result=[], was_cancelled=True)  # cat skipped it
    first = label("ann", 2, "bad")
    label("bob", 2, "good")
    label("ann", 3, "good")  # image 3 has one label of the two wanted
    clients["ann"].annotations.create(id=tasks[("best", "")], result=choice("best", image_ids[0]))
    clients["bob"].annotations.create(id=tasks[("best", "")], result=choice("best", image_ids[3]))

    progress = labelling.progress([0])[0]
    assert str(progress.progress) == "7/8 labels, 2/2 best votes" and not progress.progress.complete
    assert progress.cancelled == 1 and progress.problems == []

    clients["ann"].annotations.update(id=first.id, result=choice("label", "good"))  # a late change of mind
    label("cat", 3, "good")
    # the run's own settings, stored as a training run stores them; the file at hand wants 3 annotators
    # an image (a flow run's overrides differ from the worker's file so): the status is the run's
    runs.save_config(config.to_public_dict())
    other_team = config.feedback.model_copy(update={"annotators_per_image": 3, "budget": 24})
    path, env = cli_config(config.model_copy(update={"feedback": other_team}), tmp_path)
    # any text an annotator posts through the API is shown as text: '[/]' is no closing markup tag
    clients["cat"].annotations.create(id=tasks[("best", "")], result=choice("best", "[/]"))
    wrong_best = f"by annotator {ids['cat']}: best '[/]' is not an image of round 0"

    def status() -> str:
        shown = runner.invoke(app, ["labelstudio", "status", config.run_id, "-c", str(path)], env=env)
        assert shown.exit_code == 0, shown.output
        assert f"annotator {ids['ann']}: 4 labels" in shown.output  # images 0-3 (2 updated in place)
        assert wrong_best in " ".join(shown.output.split())  # rich wraps lines at the terminal's width
        return shown.output

    assert "8/8" in (before := status()) and "2/2" in before and "complete" in before
    feedback, collected = labelling.collect(0)
    assert collected.progress.complete and collected.cancelled == 1
    assert len(collected.problems) == 1 and wrong_best in collected.problems[0]
    # collected, the round stands as it was read: later annotations change nothing
    clients["cat"].annotations.create(id=image[2], result=choice("label", "bad"), was_cancelled=False)
    assert "8/8" in (after := status()) and "collected" in after
    assert f"annotator {ids['cat']}: 2 labels" in after  # not 3: the late label is not the round's
    # image 0: good 2/3; image 1: bad 0/2; image 2: good 2/2 after ann's update; image 3: good 2/2
    assert feedback.good == (True, False, True, True)
    # ann voted image 0, bob image 3: one vote each. Bob had not labelled image 3: picking it as best
    # labels it good (the best is good by definition), so image 3 has 3 good labels to image 0's 2 and
    # wins the tie
    assert feedback.best == 3 and feedback.best_agreement == 0.5
    assert set(feedback.annotators) == set(ids.values())
    assert feedback.feedbacks == 3 + 2 + 2 + 3

    record = runs.store.get(f"{runs.round_prefix(0)}/{ANNOTATIONS}")
    assert all(f'"completed_by": {ids[name]}'.encode() in record for name in ids)  # raw, for audit
    assert runs.load_feedback(0) == feedback
    assert runs.verify().ok
    logged = labelling.tracker.client.get_run(labelling.tracker.run_id).data.metrics
    assert logged["labelling_label_agreement"] == pytest.approx(feedback.label_agreement)
    assert logged["labelling_best_agreement"] == 0.5 and logged["labelling_skipped"] == 1


def cli_config(config: HeroConfig, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The config as a YAML file (its secrets left out) and the environment that carries the secrets."""
    path = tmp_path / "hero.yaml"
    data = json.loads(config.model_dump_json())
    data["storage"].pop("s3_access_key_id"), data["storage"].pop("s3_secret_access_key")
    data["label_studio"].pop("api_key")
    path.write_text(yaml.safe_dump(data))
    assert config.label_studio.api_key is not None
    return path, {
        "HERO_STORAGE__S3_ACCESS_KEY_ID": "test",
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": "test",
        "HERO_LABEL_STUDIO__API_KEY": config.label_studio.api_key.get_secret_value(),
        "HERO_ORCHESTRATION__WEBHOOK_SECRET": "hook-secret-0123456789",
    }


def test_setup_creates_the_project_and_its_webhook_once(
    run: tuple[HeroConfig, RunStore], label_studio_server: LabelStudioServer, tmp_path: Path
) -> None:
    config, _ = run
    path, env = cli_config(config, tmp_path)
    args = [
        "labelstudio",
        "setup",
        "--run-id",
        "setup-run",
        "--webhook-url",
        "http://127.0.0.1:9/hooks",
        "-c",
        str(path),
    ]
    first = runner.invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "project 'HERO setup-run'" in first.output and "webhook registered" in first.output
    again = runner.invoke(app, args, env=env)
    assert again.exit_code == 0 and "already registered" in again.output

    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    (project,) = [p for p in admin.projects.list() if p.title == "HERO setup-run"]
    (hook,) = admin.webhooks.list(project=str(project.id))
    assert hook.url == "http://127.0.0.1:9/hooks" and set(hook.actions) == {
        "ANNOTATION_CREATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATION_UPDATED",
    }
    assert hook.headers == {"X-Hero-Webhook-Secret": "hook-secret-0123456789"}
    assert "hook-secret" not in first.output + again.output

    # a rotated secret reaches the registered webhook: else every event would be refused with 401
    rotated_env = {**env, "HERO_ORCHESTRATION__WEBHOOK_SECRET": "rotated-secret-987"}
    rotated = runner.invoke(app, args, env=rotated_env)
    assert rotated.exit_code == 0 and "webhook secret updated" in rotated.output, rotated.output
    (hook,) = admin.webhooks.list(project=str(project.id))
    assert hook.headers == {"X-Hero-Webhook-Secret": "rotated-secret-987"}

    # a process without the secret is refused: it would strip the header, and the receiver refuse all
    refused = runner.invoke(app, args, env={**env, "HERO_ORCHESTRATION__WEBHOOK_SECRET": None})
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "webhook_url is set but webhook_secret is not" in message
    (hook,) = admin.webhooks.list(project=str(project.id))
    assert hook.headers == {"X-Hero-Webhook-Secret": "rotated-secret-987"}


def test_suggestions_arrive_as_predictions_when_asked_for(
    s3_server: Service, label_studio_server: LabelStudioServer
) -> None:
    config, runs = make_run(s3_server, label_studio_server, suggestions=True)
    project = rounds(config, runs).publish(0, current_best=None, rewards=[0.1, 0.8, 0.3, 0.6]).project_id
    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    suggested = {
        t.data["hero"]["image_id"]: [
            p.result[0]["value"]["choices"][0] for p in admin.predictions.list(task=t.id)
        ]
        for t in admin.tasks.list(project=project, fields="all")
        if t.data["hero"]["kind"] == "image"
    }
    image_ids = list(runs.load_manifest(0)["image_ids"])
    assert [suggested[i] for i in image_ids] == [["bad"], ["good"], ["bad"], ["good"]]


def test_label_studio_validates_the_labeling_config_when_a_project_is_created(
    label_studio_server: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hero_ml.adapters.label_studio import client

    broken = LABEL_CONFIG.replace(
        'toName="image" value="$label_options"', 'toName="no-such-image" value="$label_options"'
    )
    assert broken != LABEL_CONFIG
    monkeypatch.setattr(client, "LABEL_CONFIG", broken)
    projects = LabelStudioProjects(label_studio_server.url, SecretStr(label_studio_server.admin_token))
    with pytest.raises(
        LabelStudioError, match=r"refused to create project 'HERO broken' \(HTTP 400\).*no-such-image"
    ):
        projects.ensure_project("broken", 1)


def test_label_studio_errors_name_the_problem_not_the_token(label_studio_server: LabelStudioServer) -> None:
    wrong = LabelStudioProjects(label_studio_server.url, SecretStr("not-the-token-0123456789"))
    with pytest.raises(LabelStudioError, match=r"refused to list projects \(HTTP 401\)") as err:
        wrong.ensure_project("x", 1)
    assert "not-the-token" not in str(err.value)
    with pytest.raises(
        LabelStudioError, match=r"refused to say who the API key belongs to \(HTTP 401\)"
    ) as err:
        wrong.check()
    assert "check HERO_LABEL_STUDIO__API_KEY" in str(err.value)
    LabelStudioProjects(
        label_studio_server.url, SecretStr(label_studio_server.admin_token)
    ).check()  # the right key
    nowhere = LabelStudioProjects("http://127.0.0.1:9", SecretStr("t" * 20), timeout_s=2)
    with pytest.raises(LabelStudioError, match=r"cannot reach Label Studio at http://127\.0\.0\.1:9"):
        nowhere.ensure_project("x", 1)


# -- in a real browser ----------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Selenium (`make browser` installs both Debian packages)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "no Chromium: run `make browser` (Debian packages)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_task(driver: Any, server: LabelStudioServer, project: int, task: int) -> None:
    """Open a task's labeling page and wait until its images have loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server.url}/projects/{project}/data?task={task}")
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('button')).some(b => b.innerText === 'Submit')"
            " && Array.from(document.images).filter(i => i.src.startsWith('blob:')).length >= 2"
            " && Array.from(document.images).filter(i => i.src.startsWith('blob:')).every(i => i.complete)"
        )
    )


def loaded_widths(driver: Any) -> list[int]:
    """naturalWidth of the labeling panel's images (Label Studio shows them as blob: URLs)."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => i.src.startsWith('blob:')).map(i => i.naturalWidth)"
    )


def click(driver: Any, xpath: str) -> None:
    """Click the element at xpath, finding it again while the page re-renders it (a React panel can
    replace an element between finding and clicking it: a stale reference)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.XPATH, xpath).click() or True
    )


def submit(driver: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    click(driver, "//button[normalize-space()='Submit']")
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('button')).some(b => b.innerText === 'Update')"
        )
    )


def test_an_annotator_labels_in_the_browser_and_the_pipeline_reads_it(
    s3_server: Service,
    label_studio_server: LabelStudioServer,
    browser: Any,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    config, runs = make_run(s3_server, label_studio_server)
    labelling = rounds(config, runs)
    project = labelling.publish(0, current_best=None).project_id
    email, password = f"web-{uuid.uuid4().hex[:6]}@hero.local", "web-annotator-password"
    create_annotator(label_studio_server, email, password)
    browser.get(f"{label_studio_server.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(email)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)
    tasks = {
        (t.data["hero"]["kind"], t.data["hero"].get("image_id", "")): t.id
        for t in admin.tasks.list(project=project, fields="all")
    }
    image_ids = list(runs.load_manifest(0)["image_ids"])
    screenshots = request.config.getoption("--screenshots") or tmp_path  # for a person to look at
    screenshots.mkdir(parents=True, exist_ok=True)

    # an image task: the image and the current best load from S3 (through Label Studio's presigning)
    open_task(browser, label_studio_server, project, tasks[("image", image_ids[1])])
    browser.save_screenshot(str(screenshots / "label_studio_image_task.png"))
    assert sorted(loaded_widths(browser)) == [32, 128]  # the 32 px toy image, the 128 px "no best yet"
    ActionChains(browser).send_keys("1").perform()  # hotkey 1: good
    submit(browser)

    # the best task: the round's grid; click image #1
    open_task(browser, label_studio_server, project, tasks[("best", "")])
    click(browser, "//label[.//*[normalize-space()='#1'] or normalize-space()='#1']")
    browser.save_screenshot(str(screenshots / "label_studio_best_task.png"))
    assert all(width > 0 for width in loaded_widths(browser))
    submit(browser)

    collected = labelling.progress([0])[0]
    assert collected.problems == [] and len(collected.feedback) == 1
    (mine,) = collected.feedback
    assert [(label.image_id, label.label, label.best) for label in mine.images] == [
        (image_ids[1], "good", True)
    ]
    assert str(collected.progress) == "1/8 labels, 1/2 best votes"


def test_hero_run_with_label_studio_waits_in_its_process_and_survives_crashes_while_publishing_and_collecting(
    s3_server: Service, label_studio_server: LabelStudioServer, tmp_path: Path
) -> None:
    """Outside a deployment nothing can suspend: `hero run` publishes, checks every poll_interval_s,
    and learns once the round is labelled. Killed (SIGKILL) after the first of its task imports, the
    resumed run publishes the rest and no task twice; killed after it stored the raw annotations but
    before the feedback, the resumed run collects them again: nothing lost, nothing duplicated."""
    run_id = f"wait-{uuid.uuid4().hex[:6]}"
    images = IMPORT_CHUNK + 4  # two import calls: the crash falls between them
    run = tiny_run(images=images)
    settings = {
        **run,
        # as production runs: a prompt of no toy task, labelled by people only, no evaluation to make
        "sampling": {**run["sampling"], "prompt": "a photo of a black cat"},
        "simulation": {"task": None},
        "feedback": {"budget": images},
        "storage": s3_storage(s3_server, f"w-{uuid.uuid4().hex[:8]}/", local_root=str(tmp_path / "data")),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "label_studio": {"enabled": True, "url": label_studio_server.url},
        "orchestration": {"poll_interval_s": 10},
    }
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    env = {
        **s3_server.env,
        "HERO_STORAGE__S3_ACCESS_KEY_ID": "test",
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": "test",
        "HERO_LABEL_STUDIO__API_KEY": label_studio_server.admin_token,
        "COLUMNS": "200",
    }
    storage = StorageConfig(**settings["storage"], s3_access_key_id="test", s3_secret_access_key="test")
    runs = RunStore(open_store(storage), run_id)
    admin = LabelStudio(base_url=label_studio_server.url, api_key=label_studio_server.admin_token)

    logs = iter(range(3))

    def hero_run(*args: str, crash_at: str | None = None) -> tuple[subprocess.Popen, Path]:
        """Output to a file, not a pipe: a killed run's orphan (its ephemeral Prefect server) would hold
        a pipe open; its own session, so that the crash takes the orphan with it."""
        log = tmp_path / f"hero-run-{next(logs)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                ["hero", "run", "-c", str(config_file), *args],
                env={**env, CRASH_ENV: crash_at} if crash_at else env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return process, log

    def finish(run: tuple[subprocess.Popen, Path], timeout: float = 900) -> tuple[int | None, str]:
        """The run's return code (None: it did not end within `timeout`, a guard against a hang, not a
        speed limit: a round of 36 images took 213 s on a loaded 2-core machine) and output; it is gone
        after."""
        process, log = run
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return code, log.read_text()

    def project_tasks() -> dict[str, list[int]]:
        (project,) = [p for p in admin.projects.list() if p.title == f"HERO {run_id}"]
        found: dict[str, list[int]] = {}
        for task in admin.tasks.list(project=project.id, fields="all"):
            found.setdefault(task.data["hero"].get("image_id", "best"), []).append(task.id)
        return found

    code, output = finish(hero_run("--run-id", run_id, crash_at="publish:1"))
    assert code == -signal.SIGKILL, output
    assert len(project_tasks()) == IMPORT_CHUNK
    # the round's clock (its deadline counts from it) started with the first attempt, and stays
    published_key = f"{runs.round_prefix(0)}/published.json"
    first_published = json.loads(runs.store.get(published_key))["published_at"]

    resumed = hero_run("--resume", run_id, crash_at="collect:1")
    try:
        deadline = time.monotonic() + 180
        while len(tasks := project_tasks()) < images + 1:
            assert resumed[0].poll() is None, finish(resumed)[1]
            assert time.monotonic() < deadline, "round 0 was never published whole"
            time.sleep(1)
        assert len(tasks) == images + 1 and all(len(ids) == 1 for ids in tasks.values())  # none twice
        image_ids = runs.load_manifest(0)["image_ids"]
        for n, image_id in enumerate(image_ids):
            admin.annotations.create(
                id=tasks[image_id][0], result=choice("label", "good" if n < 2 else "bad")
            )
        admin.annotations.create(id=tasks["best"][0], result=choice("best", image_ids[1]))
    finally:
        code, output = finish(resumed)
    assert code == -signal.SIGKILL, output
    assert f"round 0 is in Label Studio: waiting for 0/{images} labels" in output
    assert runs.store.exists(f"{runs.round_prefix(0)}/annotations.json")
    assert runs.load_feedback(0) is None  # killed between the raw annotations and the feedback
    assert json.loads(runs.store.get(published_key))["published_at"] == first_published

    code, output = finish(hero_run("--resume", run_id))
    assert code == 0, output
    assert "round 0 (" in output and "no toy task ('a photo of a black cat')" in " ".join(output.split())
    stored = runs.load_feedback(0)
    assert stored is not None and stored.best == 1
    assert stored.good == (True, True) + (False,) * (images - 2)
    assert json.loads(runs.store.get(f"{runs.prefix}/progress.json")) == {"checkpoint": 0}
    assert len(project_tasks()) == images + 1
