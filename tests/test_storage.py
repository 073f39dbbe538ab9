"""Artifact stores against a real S3 server (moto on loopback, started by infra/s3-server.sh) and the
local directory: one contract for both, S3's own failures, and a run's objects verified end to end."""

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hero_ml.adapters.storage import ArtifactStore, InvalidKeyError, LocalStore, StorageError, open_store
from hero_ml.adapters.storage.s3 import S3Store
from hero_ml.cli import app
from hero_ml.config import HeroConfig, StorageConfig
from hero_ml.diffusion.pipeline import build_random_pipeline
from hero_ml.engine import Engine, RoundBatch, RoundStats, sample_batch
from hero_ml.feedback import AnnotatorFeedback, ImageLabel, aggregate
from hero_ml.run_store import CorruptObjectError, EvaluationRecord, RunStore
from tests.conftest import Service
from tests.fault_proxy import FaultProxy

runner = CliRunner()


def s3_config(server: Service, **fields: Any) -> StorageConfig:
    return StorageConfig(
        backend="s3",
        s3_bucket="hero-test",
        s3_endpoint_url=server.url,
        s3_access_key_id="test",
        s3_secret_access_key="s3cr3t-never-shown",
        s3_prefix=f"t-{uuid.uuid4().hex[:8]}/",  # each test its own corner of the shared bucket
        **fields,
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(s3_config(request.getfixturevalue("s3_server")))


def test_store_contract(store: ArtifactStore) -> None:
    store.put("runs/a/x.bin", b"one")
    store.put("runs/a/x.bin", b"two!")  # overwrite
    store.put("runs/a/deep/y.json", b"{}")
    store.put("runs/ab/z", b"12345")
    assert store.get("runs/a/x.bin") == b"two!"
    assert store.exists("runs/a/x.bin") and not store.exists("runs/a/missing")
    with pytest.raises(KeyError):
        store.get("runs/a/missing")
    # a prefix is a folder: runs/a never lists runs/ab
    assert store.list("runs/a") == {"runs/a/deep/y.json": 2, "runs/a/x.bin": 4}
    assert store.list("runs/a/") == store.list("runs/a")
    assert set(store.list("")) == {"runs/a/deep/y.json", "runs/a/x.bin", "runs/ab/z"}
    assert store.list("runs/none") == {}
    assert "runs/a/x.bin" in store.where("runs/a/x.bin")


@pytest.mark.parametrize(
    "key", ["../escape", "/etc/passwd", "runs//x", "runs/./x", "runs/ü", "runs/.hidden", "a\\b"]
)
def test_store_refuses_keys_that_could_escape(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidKeyError, match="not a plain relative path"):
        store.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get(key)
    with pytest.raises(InvalidKeyError):
        store.list(key)


def test_s3_objects_live_under_the_prefix_in_the_bucket(s3_server: Service, s3_client: Any) -> None:
    config = s3_config(s3_server)
    open_store(config).put("runs/r/k.txt", b"hello")
    body = s3_client.get_object(Bucket="hero-test", Key=f"{config.s3_prefix}runs/r/k.txt")["Body"].read()
    assert body == b"hello"


def test_s3_failures_are_storage_errors_that_name_the_object_not_the_secret(s3_server: Service) -> None:
    missing_bucket = open_store(s3_config(s3_server).model_copy(update={"s3_bucket": "no-such-bucket"}))
    with pytest.raises(
        StorageError, match=r"PUT of s3://no-such-bucket/.*runs/r/x failed.*NoSuchBucket"
    ) as err:
        missing_bucket.put("runs/r/x", b"x")
    assert "s3cr3t" not in str(err.value)
    # a HEAD's 404 has no body: without a look at the bucket, a typo in its name reads "no such run"
    with pytest.raises(StorageError, match=r"S3 bucket 'no-such-bucket' does not exist at http://127"):
        missing_bucket.exists("runs/r/config.json")

    # nothing listens on this port: connection refused, retried, then reported
    from tests.conftest import _free_port

    dead = S3Store.from_config(
        s3_config(s3_server).model_copy(
            update={
                "s3_endpoint_url": f"http://127.0.0.1:{_free_port()}",
                "s3_max_attempts": 2,
                "s3_timeout_s": 1,
            }
        )
    )
    with pytest.raises(
        StorageError,
        match=r"GET of s3://hero-test/.*runs/r/x failed after retries \(EndpointConnectionError\); check "
        r"storage.s3_endpoint_url \(http://127.0.0.1:\d+/?\) and that it is up",
    ):
        dead.get("runs/r/x")
    # a listing names its prefix (the whole store's too), not a key check's complaint about it
    for prefix in ("runs/r/", ""):
        listing = rf"LIST of s3://hero-test/t-\w+/{prefix} failed after retries"
        with pytest.raises(StorageError, match=listing):
            dead.list(prefix)


def test_folder_markers_of_s3_consoles_are_not_objects_of_a_run(
    s3_server: Service, s3_client: Any, batch: RoundBatch
) -> None:
    # "Create folder" in a console, and some sync tools, leave zero-byte keys ending in "/"
    config = s3_config(s3_server)
    runs = RunStore(open_store(config), "marked")
    runs.commit_batch(batch, {"prompt": "p"})
    for folder in ("runs/", "runs/marked/rounds/0/", "runs/marked/rounds/0/images/"):
        s3_client.put_object(Bucket="hero-test", Key=f"{config.s3_prefix}{folder}", Body=b"")
    assert not any(key.endswith("/") for key in runs.store.list(""))
    assert runs.verify().ok


def test_s3_config_explains_what_is_missing() -> None:
    with pytest.raises(ValueError, match="needs s3_bucket"):
        StorageConfig(backend="s3")
    with pytest.raises(ValueError, match="go together"):
        StorageConfig(backend="s3", s3_bucket="hero-runs", s3_access_key_id="only-the-id")
    with pytest.raises(ValueError, match="not a plain relative path"):
        StorageConfig(backend="s3", s3_bucket="hero-runs", s3_prefix="../other-team")
    for bucket in ["s3://hero-runs", "hero-runs/team", "b", "Hero-Runs"]:
        with pytest.raises(ValueError, match="is not a bucket name: give the name alone"):
            StorageConfig(backend="s3", s3_bucket=bucket)


def test_an_s3_prefix_is_kept_in_the_spelling_keys_are_joined_to() -> None:
    # Label Studio's image links are s3://bucket/{s3_prefix}{key}: the prefix must end in '/'
    for given, kept in [("team/hero", "team/hero/"), ("team/hero/", "team/hero/"), ("", "")]:
        assert StorageConfig(backend="s3", s3_bucket="hero-runs", s3_prefix=given).s3_prefix == kept


# -- a run's objects -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> RoundBatch:
    config = HeroConfig(
        model={"source": "random:tiny"},
        sampling={"prompt": "a red circle", "images_per_round": 4, "num_steps": 2, "sub_batch_size": 4},
        ddpo={"timesteps_per_trajectory": 1},
    )
    return sample_batch(build_random_pipeline("tiny", seed=0), config.sampling, 0)


def test_an_interrupted_upload_leaves_no_committed_round(s3_server: Service, batch: RoundBatch) -> None:
    puts = itertools.count(1)

    def plan(n: int, method: str, path: str) -> str | None:  # S3 goes down after the third PUT
        return "503" if method == "PUT" and next(puts) > 3 else None

    config = s3_config(s3_server)
    with FaultProxy(s3_server.url, plan) as proxy:
        proxied = config.model_copy(update={"s3_endpoint_url": proxy.url, "s3_max_attempts": 2})
        with pytest.raises(StorageError, match=r"PUT of s3://hero-test/.* failed after retries"):
            RunStore(open_store(proxied), "r").commit_batch(batch, {})
        assert proxy.injected  # the fault was served over HTTP
    runs = RunStore(open_store(config), "r")
    assert not runs.has_batch(0)
    report = runs.verify()
    assert report.ok and report.objects == 0 and len(report.incomplete) == 1
    assert "interrupted round" in report.incomplete[0]
    assert runs.list_rounds()[0].committed is False

    runs.commit_batch(batch, {})  # the retry writes the whole round, then commits it
    report = runs.verify()
    assert report.ok and report.incomplete == [] and report.objects == 4 + 2  # images, grid, trajectory
    assert runs.load_batch(0).image_ids == batch.image_ids


def test_storage_ls_counts_a_rounds_files_and_its_good_and_bad_images(
    tmp_path: Path, batch: RoundBatch
) -> None:
    runs = RunStore(LocalStore(tmp_path / "data"), "r")
    runs.save_config(HeroConfig(run_id="r").to_public_dict())
    runs.commit_batch(batch, {})
    labels = [
        AnnotatorFeedback(
            annotator="a",
            images=tuple(
                ImageLabel(image_id=i, label="bad" if n == 2 else "good", best=n == 0)
                for n, i in enumerate(batch.image_ids)
            ),
        )
    ]
    runs.save_feedback(0, aggregate(labels, batch.image_ids, has_current_best=False), labels)
    folder = tmp_path / "data" / "runs" / "r" / "rounds" / "0"
    on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    (listed,) = runs.list_rounds()
    assert (listed.images, listed.good, listed.bad, listed.bytes) == (4, 3, 1, on_disk)
    assert listed.committed and not listed.checkpoint

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"storage": {"local_root": str(tmp_path / "data")}}))
    shown = runner.invoke(app, ["storage", "ls", "r", "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if line.strip("│ ").startswith("0 "))
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells == ["0", "yes", "4", f"{on_disk / 1e6:.2f}", "3", "1", "—"], row


def test_a_damaged_record_of_a_run_is_named_with_what_is_wrong(tmp_path: Path, batch: RoundBatch) -> None:
    store = LocalStore(tmp_path)
    runs = RunStore(store, "r")
    runs.save_config(HeroConfig(run_id="r").to_public_dict())
    runs.commit_batch(batch, {})
    root = tmp_path / "runs" / "r"
    manifest = root / "rounds" / "0" / "manifest.json"
    good = json.loads(manifest.read_text())

    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "files"}))
    with pytest.raises(
        CorruptObjectError, match=r"rounds/0/manifest.json is not a readable record .*\n  files: "
    ):
        runs.load_batch(0)
    report = runs.verify()  # verify reports it and goes on
    assert not report.ok and "manifest.json is not a readable record" in report.problems[0]
    manifest.write_text("{not json")
    with pytest.raises(CorruptObjectError, match=r"(?s)manifest.json is not a readable .*Invalid JSON"):
        runs.load_manifest(0)
    # a file name that would leave the round's folder: the manifest is named, and verify goes on
    manifest.write_text(json.dumps({**good, "files": {"../../x.png": good["files"]["grid.png"]}}))
    with pytest.raises(
        CorruptObjectError,
        match=r"manifest.json is not a readable record .*\n  files: storage key .\.\./\.\./x\.png. is not a",
    ):
        runs.load_manifest(0)
    assert "manifest.json is not a readable record" in runs.verify().problems[0]
    manifest.write_text(json.dumps(good))
    assert runs.verify().ok
    # an image the manifest names without its file (publish and load_batch would fail on a bare KeyError)
    ghost = {**good, "image_ids": [*good["image_ids"], "ghost"]}
    manifest.write_text(json.dumps(ghost))
    with pytest.raises(CorruptObjectError, match=r"(?s)manifest.json is not a readable .*lacks images/ghost"):
        runs.load_manifest(0)
    manifest.write_text(json.dumps({**good, "image_ids": good["image_ids"] * 2}))
    assert "an image is named twice" in runs.verify().problems[0]
    manifest.write_text(json.dumps(good))
    grid = root / "rounds" / "0" / "grid.png"
    kept = grid.read_bytes()
    grid.unlink()
    grid.mkdir()  # a folder where the object should be: reported, and the check goes on
    report = runs.verify()
    assert [p for p in report.problems if "grid.png: cannot read" in p] and report.objects == len(
        good["files"]
    ) - 1
    grid.rmdir()
    grid.write_bytes(kept)

    (root / "rounds" / "0" / "feedback.json").write_text(json.dumps({"aggregate": {}, "annotators": []}))
    with pytest.raises(
        CorruptObjectError, match=r"(?s)feedback.json is not a readable record .*aggregate\.image_ids"
    ):
        runs.list_rounds()
    assert "feedback.json is not a readable record" in runs.verify().problems[0]  # checked though unsummed
    (root / "rounds" / "0" / "feedback.json").unlink()
    (root / "rounds" / "0" / "stats.json").write_text("[1, 2]")
    assert "stats.json is not a readable record of a round's learning" in runs.verify().problems[0]
    # a figure as text would fail only when the round is tracked, after verify said ok
    figures = {"round": 0, "feedbacks": 4, "good": 2, "bad": 2, "new_best": True, "label_agreement": 1.0}
    figures |= dict.fromkeys(["encoder_loss_first", "encoder_loss_last", "reward_bad_mean"], None)
    figures |= {"reward_good_mean": "abc", "update_loss": 0.1, "approx_kl": 0.0, "clip_fraction": 0.0}
    (root / "rounds" / "0" / "stats.json").write_text(json.dumps({**figures, "optimizer_steps": 3}))
    with pytest.raises(
        CorruptObjectError, match=r"learning \(edited or damaged\):\n  reward_good_mean: Input should"
    ):
        runs.load_stats(0)
    assert "reward_good_mean: Input should be a valid number" in runs.verify().problems[0]
    figures |= {"reward_good_mean": 0.5, "optimizer_steps": 3, "learned_at": "2026-12-06T10:00:00"}
    (root / "rounds" / "0" / "stats.json").write_text(json.dumps(figures))  # tracked in no zone
    with pytest.raises(CorruptObjectError, match=r"\n  learned_at: Input should have timezone info"):
        runs.load_stats(0)
    (root / "rounds" / "0" / "stats.json").unlink()
    # a naive time would start a deadline's clock in no zone
    published = {"published_at": "2026-12-06T10:00:00", "project_id": 3, "flow_run_id": None, "tasks": 7}
    (root / "rounds" / "0" / "published.json").write_text(json.dumps(published))
    with pytest.raises(
        CorruptObjectError, match=r"published.json is not a readable record .*\n  published_at: "
    ):
        runs.load_published(0)
    assert "published.json is not a readable record" in runs.verify().problems[0]
    (root / "rounds" / "0" / "published.json").write_text(
        json.dumps({**published, "published_at": "2026-12-06T10:00:00Z"})
    )
    assert runs.load_published(0).project_id == 3 and runs.verify().ok
    (root / "rounds" / "0" / "published.json").unlink()
    (root / "rounds" / "0" / "annotations.json").write_text('{"tasks": [tru')  # cut short
    with pytest.raises(CorruptObjectError, match=r"annotations.json is not a readable record"):
        runs.load_annotations(0)
    assert "annotations.json is not a readable record" in runs.verify().problems[0]
    (root / "rounds" / "0" / "annotations.json").unlink()
    # folders no run writes: named by verify, never read as a round (03 read as round 3; '²' crashed)
    for stray in ("rounds/03/manifest.json", "rounds/\u00b2/a", "checkpoints/x/state.json"):
        (root / stray).parent.mkdir(parents=True)
        (root / stray).write_text("{}")
    assert [r.round for r in runs.list_rounds()] == [0]
    assert runs.verify().problems == [
        "runs/r/rounds/03/manifest.json: not in a round's folder (rounds/<k>/)",
        "runs/r/rounds/\u00b2/a: not in a round's folder (rounds/<k>/)",
        "runs/r/checkpoints/x/state.json: not in a round's folder (checkpoints/<k>/)",
    ]
    for folder in ("rounds/03", "rounds/\u00b2", "checkpoints"):
        shutil.rmtree(root / folder)
    (root / "progress.json").write_text(json.dumps({"checkpoint": True}))  # read as 1, before
    with pytest.raises(CorruptObjectError, match=r"progress.json is not a readable record"):
        runs.latest_checkpoint()
    (root / "progress.json").write_text(json.dumps({"checkpoint": "x"}))
    with pytest.raises(
        CorruptObjectError, match=r"progress.json is not a readable record .*\n  checkpoint: "
    ):
        runs.latest_checkpoint()
    assert "progress.json is not a readable record" in runs.verify().problems[0]
    (root / "progress.json").unlink()

    runs.save_evaluation(EvaluationRecord(label="before", success_rate=0.25, images=256))
    assert runs.load_evaluation("before") == EvaluationRecord(label="before", success_rate=0.25, images=256)
    assert runs.load_evaluation("after") is None
    evaluation = root / "eval" / "before.json"
    evaluation.write_text(json.dumps({"label": "before", "success_rate": 25, "images": 256}))  # a percentage
    with pytest.raises(
        CorruptObjectError, match=r"eval/before.json is not a readable record .*\n  success_rate: "
    ):
        runs.load_evaluation("before")
    assert "before.json is not a readable record" in runs.verify().problems[0]
    evaluation.write_text(json.dumps({"label": "after", "success_rate": 0.5, "images": 256}))
    with pytest.raises(CorruptObjectError, match="holds evaluation 'after', not 'before'"):
        runs.load_evaluation("before")
    evaluation.write_text("[]")
    (root / "progress.json").write_text(json.dumps({"checkpoint": "x"}))
    listed = CliRunner().invoke(
        app, ["storage", "verify", "r"], env={"HERO_STORAGE__LOCAL_ROOT": str(tmp_path)}
    )
    unwrapped = "".join(listed.output.split())  # rich wraps the path wherever the line ends
    assert listed.exit_code == 1 and "corrupt" in unwrapped and "progress.jsonisnotareadable" in unwrapped


def test_verify_checks_every_checkpoint_against_its_commit_record(tmp_path: Path) -> None:
    from hero_ml.engine import STATE, TENSORS
    from tests.unit.test_engine import run_rounds, small_config

    runs = RunStore(LocalStore(tmp_path), "r")
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    run_rounds(engine, 1)
    runs.save_checkpoint(engine)  # checkpoint 0, progress.json points at it
    report = runs.verify()
    assert report.ok and report.objects == 1 and report.incomplete == []  # the tensors, checked
    checkpoint = tmp_path / "runs" / "r" / "checkpoints" / "0"
    tensors = (checkpoint / TENSORS).read_bytes()

    (checkpoint / TENSORS).write_bytes(tensors[:-1] + bytes([tensors[-1] ^ 1]))
    assert [p for p in runs.verify().problems if "state.safetensors" in p and "do not match" in p]
    (checkpoint / TENSORS).write_bytes(tensors)
    state = (checkpoint / STATE).read_text()
    (checkpoint / STATE).write_text(state[:20])
    assert [p for p in runs.verify().problems if "checkpoints/0/state.json is not a readable record" in p]
    # a state.json a resume refuses is not 'ok': another format, another round, tensors not safetensors
    fields = json.loads(state)
    for edit, wanted in (
        ({"format": 1}, "format 1 and round 1, where a resume reads format 2 and round 1"),
        ({"round": 5}, "format 2 and round 5, where a resume reads format 2 and round 1"),
        ({"method": 5}, r"state.json is not a readable record .*\n  method: "),
    ):
        (checkpoint / STATE).write_text(json.dumps(fields | edit))
        assert [p for p in runs.verify().problems if re.search(wanted, p)], runs.verify().problems
    junk = b"not a safetensors file at all"
    (checkpoint / TENSORS).write_bytes(junk)
    commit = {"bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    (checkpoint / STATE).write_text(json.dumps(fields | {"tensors": commit}))
    assert [p for p in runs.verify().problems if "state.safetensors: not a safetensors file" in p]
    (checkpoint / TENSORS).write_bytes(tensors)
    (checkpoint / STATE).write_text(state)
    assert runs.verify().ok
    (checkpoint / STATE).unlink()  # as if the writer died before the commit record
    report = runs.verify()
    assert report.incomplete == [
        "runs/r/checkpoints/0: no state.json (a checkpoint interrupted while written)"
    ]
    assert report.problems == ["runs/r/progress.json points at checkpoint 0, which is not committed"]
    (checkpoint / STATE).write_text(state)
    assert runs.verify().ok


class CountingStore:
    """A store that counts the requests made of it, to check what an operation costs on S3."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.inner, name)


def test_a_rounds_stats_read_back_as_stored_a_figure_not_finite_and_the_time_included(tmp_path: Path) -> None:
    runs = RunStore(LocalStore(tmp_path), "r")
    figures = dict.fromkeys(RoundStats.__dataclass_fields__, 0) | {"round": 0, "new_best": False}
    figures |= {"label_agreement": float("nan"), "update_loss": float("inf"), "approx_kl": None}
    stats = RoundStats(**figures | {"learned_at": datetime(2026, 12, 7, 22, 30, 5, 123456, tzinfo=UTC)})
    runs.save_stats(stats)
    read = runs.load_stats(0)
    assert math.isnan(read.label_agreement) and read.update_loss == math.inf and read.approx_kl is None
    assert replace(read, label_agreement=0.0) == replace(stats, label_agreement=0.0)  # the time to the µs
    assert "learned_at" not in stats.metrics() and "round" not in stats.metrics()


def test_untracked_rounds_are_found_with_one_listing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    runs = RunStore(store, "r")
    assert runs.untracked_rounds() == []  # no checkpoint yet: nothing learned
    for k in range(5):
        stats = dict.fromkeys(RoundStats.__dataclass_fields__, None) | {"round": k}
        runs.save_stats(RoundStats(**stats))
    for k in (0, 2):
        runs.mark_tracked(k)
    store.put(f"{runs.prefix}/progress.json", json.dumps({"checkpoint": 3}).encode())  # 4 not learned

    counting = CountingStore(store)
    assert RunStore(counting, "r").untracked_rounds() == [1, 3]
    assert counting.calls.count("list") == 1 and "exists" in counting.calls  # progress.json only
    assert counting.calls.count("exists") == 1


def test_verify_finds_tampered_missing_and_unlisted_objects(
    s3_server: Service, s3_client: Any, batch: RoundBatch, tmp_path: Path
) -> None:
    config = s3_config(s3_server)
    runs = RunStore(open_store(config), "r")
    runs.save_config({"run_id": "r"})
    runs.commit_batch(batch, {})
    prefix = f"{config.s3_prefix}runs/r/rounds/0"
    s3_client.put_object(Bucket="hero-test", Key=f"{prefix}/images/r0000-001.png", Body=b"swapped")
    s3_client.delete_object(Bucket="hero-test", Key=f"{prefix}/grid.png")
    s3_client.put_object(Bucket="hero-test", Key=f"{prefix}/images/stray.png", Body=b"?")

    report = runs.verify()
    assert not report.ok
    assert len(report.problems) == 3
    text = "\n".join(report.problems)
    assert "r0000-001.png: 7 bytes do not match" in text
    assert "grid.png: missing" in text
    assert "stray.png: not listed in the round's manifest" in text

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(json.dumps({"storage": json.loads(config.model_dump_json())}))
    # the dump masks the secrets (a mask is no secret: refused from a file): they come from the environment
    env = {
        "HERO_STORAGE__S3_ACCESS_KEY_ID": "test",
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": "s3cr3t-never-shown",
    }
    result = runner.invoke(app, ["storage", "verify", "r", "-c", str(yaml_file)], env=env)
    assert result.exit_code == 1, result.output
    assert "3 problems" in result.output and "s3cr3t" not in result.output
    listing = runner.invoke(app, ["storage", "ls", "r", "-c", str(yaml_file)], env=env)
    assert listing.exit_code == 0, listing.output
    assert "run r" in listing.output and f"s3://hero-test/{config.s3_prefix}runs/r" in listing.output


# -- storage faults: S3 errors and timeouts at the HTTP level, a full local disk ---------------------


def through(proxy: FaultProxy, s3_server: Service, **fields: Any) -> ArtifactStore:
    config = s3_config(s3_server).model_copy(update={"s3_endpoint_url": proxy.url, **fields})
    return open_store(config)


def test_s3_throttling_and_timeouts_are_retried_and_the_round_commits(
    s3_server: Service, batch: RoundBatch
) -> None:
    stalled: set[str] = set()

    def plan(n: int, method: str, path: str) -> str | None:
        if method == "PUT" and path not in stalled and len(stalled) < 2:
            stalled.add(path)  # the first two objects' first PUT: past the read timeout
            return "stall"
        return "503" if n % 3 == 0 else None  # every third request: SlowDown

    with FaultProxy(s3_server.url, plan, stall_s=4) as proxy:
        runs = RunStore(through(proxy, s3_server, s3_max_attempts=5, s3_timeout_s=1), "flaky")
        runs.commit_batch(batch, {})
        report = runs.verify()
        assert runs.load_batch(0).image_ids == batch.image_ids
    assert report.ok and report.incomplete == [] and report.objects == 6
    faults = [fault for *_, fault in proxy.injected]
    assert faults.count("stall") == 2 and faults.count("503") >= 3


def test_s3_that_keeps_failing_fails_clearly_and_commits_nothing(
    s3_server: Service, batch: RoundBatch
) -> None:
    def plan(n: int, method: str, path: str) -> str | None:
        return "503" if method == "PUT" and path.endswith("manifest.json") else None

    with FaultProxy(s3_server.url, plan) as proxy:
        runs = RunStore(through(proxy, s3_server, s3_max_attempts=3), "down")
        with pytest.raises(
            StorageError, match=r"PUT of s3://hero-test/.*manifest.json failed after retries.*SlowDown"
        ):
            runs.commit_batch(batch, {})
        assert len(proxy.injected) == 3  # s3_max_attempts requests in all, every one answered 503
        assert not runs.has_batch(0) and len(runs.verify().incomplete) == 1  # no committed-looking round


def test_s3_without_credentials_says_how_to_give_them(
    s3_server: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask on this machine
    config = s3_config(s3_server).model_copy(update={"s3_access_key_id": None, "s3_secret_access_key": None})
    with pytest.raises(
        StorageError, match=r"\(NoCredentialsError\); set HERO_STORAGE__S3_ACCESS_KEY_ID"
    ) as err:
        open_store(config).get("runs/x")
    assert "s3_endpoint_url" not in str(err.value)  # the endpoint is not what is wrong


def test_an_s3_answer_cut_off_while_read_is_read_again(s3_server: Service, batch: RoundBatch) -> None:
    # botocore retries until an answer's headers; a body cut short is the store's to retry
    config = s3_config(s3_server)
    RunStore(open_store(config), "cut").commit_batch(batch, {})
    cuts = [0]

    def plan(n: int, method: str, path: str) -> str | None:
        if method == "GET" and "trajectory" in path and cuts[0] < 2:
            cuts[0] += 1
            return "cut"
        return None

    with FaultProxy(s3_server.url, plan) as proxy:

        def runs(attempts: int) -> RunStore:
            update = {"s3_endpoint_url": proxy.url, "s3_max_attempts": attempts}
            return RunStore(open_store(config.model_copy(update=update)), "cut")

        assert runs(3).load_batch(0).image_ids == batch.image_ids  # the third GET reads it whole
        assert [fault for *_, fault in proxy.injected] == ["cut", "cut"]
        cuts[0] = 0
        with pytest.raises(StorageError, match=r"GET of s3://hero-test/.*trajectory.* failed after retries"):
            runs(2).load_batch(0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 KiB tmpfs, a real full disk (ENOSPC) for the local store: a round's trajectory fits on
    it (141 KB), the rest of the round does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs CAP_SYS_ADMIN (root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_clearly_leaves_no_partial_object_and_commits_nothing(
    small_disk: Path, batch: RoundBatch
) -> None:
    runs = RunStore(LocalStore(small_disk), "full")
    with pytest.raises(StorageError, match=r"cannot write runs/full/rounds/0/.* No space left on device"):
        runs.commit_batch(batch, {})
    assert not runs.has_batch(0)
    assert len(runs.verify().incomplete) == 1 and runs.verify().problems == []
    assert list(small_disk.rglob(".*.tmp")) == []  # no half-written temporary file left behind

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)  # space again
    runs.commit_batch(batch, {})  # the same round, whole, then committed
    assert runs.verify().ok and runs.load_batch(0).image_ids == batch.image_ids


def test_local_objects_get_the_mode_open_would_give_them(tmp_path: Path) -> None:
    # a temporary file is private (0600); renamed into place it would stay so, and a team's other
    # accounts sharing the store could not read its runs
    store = LocalStore(tmp_path)
    store.put("runs/r/a.json", b"{}")
    assert store.create("runs/r/b.json", b"{}")
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("a.json", "b.json"):
        assert (tmp_path / "runs" / "r" / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_local_write_syncs_the_folders_that_gained_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a power cut cannot be staged in a test: what is observable is which folders get synced
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = LocalStore(tmp_path)
    store.put("runs/r/rounds/0/manifest.json", b"{}")
    folders = [Path(p) for p in synced if Path(p).is_dir()]
    # the object's folder (its rename), and the parent of each folder made for it (their entries)
    assert folders == [tmp_path / "runs/r/rounds/0", tmp_path / "runs/r/rounds", tmp_path / "runs/r",
                       tmp_path / "runs", tmp_path]  # fmt: skip
    synced.clear()
    store.put("runs/r/rounds/0/grid.png", b"png")  # an existing folder: only its own entry
    assert [Path(p) for p in synced if Path(p).is_dir()] == [tmp_path / "runs/r/rounds/0"]


def test_a_store_folder_this_process_may_not_read_is_named_not_a_traceback(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    (locked / "runs" / "r").mkdir(parents=True)
    if os.geteuid() == 0:  # root reads anything: ask as nobody, whom pytest's 0700 tmp folders keep out
        as_another = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        as_another = []
        locked.chmod(0)
    hero = str(Path(sys.executable).parent / "hero")
    env = {**os.environ, "HERO_STORAGE__LOCAL_ROOT": str(locked)}
    try:
        for command in (["storage", "ls"], ["storage", "verify", "r"]):
            result = subprocess.run(
                [*as_another, hero, *command], capture_output=True, text=True, env=env, timeout=120
            )
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert "Permission denied" in result.stderr and str(locked) in "".join(result.stderr.split())
    finally:
        locked.chmod(0o700)
