"""Production wiring end to end on loopback: `hero run` with S3 storage and an MLflow server whose
artifacts live in S3, the LoRA registered as a model version, and promotion that moves `champion`
only on a real win (a LoRA that measurably improves the toy model, tests/data/README.md)."""

import functools
import http.server
import json
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from safetensors.torch import load as load_tensors
from typer.testing import CliRunner

from flows.registry import promote
from flows.training import hero_training
from hero_ml.adapters.storage import open_store
from hero_ml.adapters.tracking import TrackingError
from hero_ml.adapters.tracking.mlflow import RUN_ID_TAG, MlflowTracker
from hero_ml.adapters.tracking.registry import AliasHolder, Registry, RegistryError
from hero_ml.cli import app
from hero_ml.config import ModelConfig, load_config
from hero_ml.diffusion.lora import add_lora, save_lora
from hero_ml.diffusion.pipeline import TOY_FOLDER, ModelNotFoundError, load_pipeline, weights_sha256
from hero_ml.engine import TENSORS
from hero_ml.run_store import RunStore, TrackingRecord
from tests.conftest import Service, _free_port, _infra, s3_storage, tiny_run
from tests.fault_proxy import FaultProxy

runner = CliRunner()
WINNING_LORA = Path(__file__).parent / "data" / "anomaly-lora"
SECRET = "s3cr3t-never-shown"


def production_config(tmp_path: Path, s3: Service, mlflow: Service, **top: Any) -> Path:
    """A small run on the toy model: S3 storage (its own prefix) and the MLflow server."""
    data = {
        **tiny_run(images=6),
        "feedback": {"budget": 12},
        "simulation": {"eval_images": 6},
        "storage": s3_storage(s3, f"t-{uuid.uuid4().hex[:8]}/", local_root=str(tmp_path / "local")),
        "tracking": {"tracking_uri": mlflow.url, "registered_model": f"lora-{uuid.uuid4().hex[:6]}"},
        **top,
    }
    path = tmp_path / "production.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_STORAGE__S3_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("HERO_STORAGE__S3_SECRET_ACCESS_KEY", SECRET)


def test_hero_run_on_s3_and_an_mlflow_server(
    tmp_path: Path, s3_server: Service, mlflow_server: Service, s3_client: Any, secrets: None
) -> None:
    path = production_config(tmp_path, s3_server, mlflow_server)
    config = load_config(path)
    result = runner.invoke(app, ["run", "-c", str(path), "--run-id", "prod", "--task", "counting"])
    assert result.exit_code == 0, result.output
    assert f"s3://hero-test/{config.storage.s3_prefix}runs/prod" in result.output
    assert f"registered {config.tracking.registered_model} version 1" in result.output

    # every object of the run is in the bucket and matches its recorded checksum
    runs = RunStore(open_store(config.storage), "prod")
    report = runs.verify()
    assert report.ok and report.incomplete == []
    assert report.objects == 2 * (6 + 2) + 2  # 2 rounds x (6 images, grid, trajectory) + 2 checkpoints
    assert [(r.round, r.committed, r.images, r.checkpoint) for r in runs.list_rounds()] == [
        (0, True, 6, True),
        (1, True, 6, True),
    ]

    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'prod'"
    )
    assert run.info.status == "FINISHED"
    for metric in (
        "good",
        "bad",
        "feedbacks",
        "encoder_loss_last",
        "update_loss",
        "approx_kl",
        "clip_fraction",
        "lora_step_norm",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1], metric
    assert {"eval_success_rate_before", "eval_success_rate_after"} <= set(run.data.metrics)
    # where the run's data lives is a tag (a resume may move it), what it learns with a param
    assert (
        run.data.tags["service.storage.s3_bucket"] == "hero-test"
        and "storage.s3_bucket" not in run.data.params
    )
    assert run.data.tags["service.storage.s3_secret_access_key"] == "**********"
    assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)

    # artifacts went through the server into its S3 bucket
    stored = {item["Key"] for item in s3_client.list_objects_v2(Bucket="hero-mlflow").get("Contents", [])}
    for name in (
        "lora/MLmodel",
        "lora/adapter_weights/pytorch_lora_weights.safetensors",
        "encoder/encoder.safetensors",
        "config/config.json",
        "rounds/0001/grid.png",
    ):
        assert any(key.endswith(f"{run.info.run_id}/artifacts/{name}") for key in stored), name

    # no object of the run, in either bucket, holds the S3 secret
    run_keys = [key for key in stored if run.info.run_id in key]
    prefix = config.storage.s3_prefix
    data_keys = [
        item["Key"] for item in s3_client.list_objects_v2(Bucket="hero-test", Prefix=prefix)["Contents"]
    ]
    for bucket, keys in (("hero-mlflow", run_keys), ("hero-test", data_keys)):
        for key in keys:
            assert SECRET.encode() not in s3_client.get_object(Bucket=bucket, Key=key)["Body"].read(), key

    (version,) = client.search_model_versions(f"name = '{config.tracking.registered_model}'")
    assert version.run_id == run.info.run_id
    rates = {
        f"hero.success_rate.{label}": f"{runs.load_evaluation(label).success_rate:.4f}"
        for label in ("before", "after")
    }
    assert {k: v for k, v in version.tags.items() if k.startswith("hero.")} == {
        "hero.run_id": "prod",
        "hero.rounds": "2",
        "hero.feedbacks": "12",
        "hero.method": "hero",
        "hero.task": "counting",
        "hero.base_model": "toy",
        **rates,
    }
    resumed = runner.invoke(app, ["run", "-c", str(path), "--resume", "prod"])
    assert resumed.exit_code == 0, resumed.output
    assert len(client.search_model_versions(f"name = '{config.tracking.registered_model}'")) == 1

    # the run's last noise pool went beside the LoRA: the final checkpoint's best and good noises
    pool = Registry(mlflow_server.url, version.name, "champion").noise_pool(version)
    final = load_tensors(runs.store.get(f"{runs.checkpoint_prefix(1)}/{TENSORS}"))
    assert torch.equal(pool.best, final["best.noise"]) and torch.equal(pool.good, final["good_noises"])
    assert (pool.prompt, pool.best_ratio, pool.eps) == ("three purple squares", 0.5, 0.1)
    # generate --guided starts from it (other images than plain noise's, same seed) and says when the
    # prompt is not the one the pool's images were liked for
    images = {}
    for flags in ([], ["--guided"]):
        out = tmp_path / f"generated{len(flags)}"
        generated = runner.invoke(
            app,
            ["generate", f"models:/{version.name}/1", "--prompt", "three green squares", "--out", str(out),
             "--count", "2", "-c", str(path), *flags],
        )  # fmt: skip
        assert generated.exit_code == 0, generated.output
        assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png"]
        images[bool(flags)] = (out / "000.png").read_bytes()
        noted = "note: the noise pool was liked for the prompt 'three purple squares'" in generated.output
        assert noted == bool(flags), generated.output
        said = " ".join(generated.output.split())
        start = "from the run's noise pool (its best and" if flags else "from plain N(0, I) noises"
        assert f"2 images of {version.name} version 1 {start}" in said, said
    assert images[True] != images[False]
    # into a folder that holds images: refused, nothing written; --overwrite leaves this generation's only
    again = ["generate", f"models:/{version.name}/1", "--prompt", "three green squares", "--count", "1",
             "--out", str(out), "-c", str(path)]  # fmt: skip
    refused = runner.invoke(app, again)
    assert refused.exit_code == 1 and "already holds 000.png and 2 more" in refused.output, refused.output
    assert (out / "000.png").read_bytes() == images[True]
    replaced = runner.invoke(app, [*again, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "grid.png"]


def register(
    config_path: Path, lora_folder: Path, run_id: str, task: str | None = "anomaly", base: str = "toy"
) -> str:
    """Log and register a LoRA as `hero run` does at its end (the tracker's real code path); task None:
    a run of a real prompt (simulation.task null), which has no hero.task tag; base: its hero.base_model
    tag (its weights are the toy model's LoRA)."""
    config = load_config(config_path)
    tracker = MlflowTracker(config.tracking.tracking_uri, config.tracking.experiment, run_id)
    # as a run records it: the after-training promotion finds the run's version by its MLflow run
    RunStore(open_store(config.storage), run_id).save_tracking(TrackingRecord(tracker_run_id=tracker.run_id))
    tracker.log_lora(lora_folder, ModelConfig())
    tags = {"hero.run_id": run_id, "hero.rounds": "4", "hero.base_model": base}
    version = tracker.register_lora(
        config.tracking.registered_model, tags | ({"hero.task": task} if task else {})
    )
    tracker.finish()
    return version


def test_promotion_moves_champion_only_on_a_real_win(
    tmp_path: Path,
    mlflow_server: Service,
    s3_server: Service,
    monkeypatch: pytest.MonkeyPatch,
    secrets: None,  # the run store (S3) records each run's MLflow run, as a run does
) -> None:
    # promotion samples as configured: the default 20 steps, not the 4 of the small runs
    path = production_config(
        tmp_path,
        s3_server,
        mlflow_server,
        sampling={},
        feedback={},
        promotion={"eval_images": 64, "margin": 0.05},
    )
    config = load_config(path)
    name, client = config.tracking.registered_model, MlflowClient(tracking_uri=mlflow_server.url)

    winner = register(path, WINNING_LORA, "winner")
    result = runner.invoke(app, ["promote", "-c", str(path), "--version", winner])
    assert result.exit_code == 0, result.output
    assert "promoted" in result.output and "not promoted" not in result.output
    assert client.get_model_version_by_alias(name, "champion").version == winner
    tags = client.get_model_version(name, winner).tags
    assert tags["hero.promotion.decision"] == "promoted" and tags["hero.promotion.against"] == "base"
    assert (
        float(tags["hero.promotion.challenger_rate"]) >= float(tags["hero.promotion.incumbent_rate"]) + 0.05
    )

    # a LoRA that is still the identity draws exactly what the base model draws: no win over the champion
    pipe = load_pipeline("toy")
    add_lora(pipe.unet, rank=4, alpha=4.0)
    identity = register(path, save_lora(pipe.unet, tmp_path / "identity").parent, "identity")
    result = runner.invoke(app, ["promote", "-c", str(path)])  # the latest version
    assert result.exit_code == 0, result.output
    assert "not promoted" in result.output and f"stays on version {winner}" in result.output
    assert client.get_model_version_by_alias(name, "champion").version == winner
    tags = client.get_model_version(name, identity).tags
    assert tags["hero.promotion.decision"] == "rejected" and tags["hero.promotion.against"] == winner
    assert float(tags["hero.promotion.challenger_rate"]) < float(tags["hero.promotion.incumbent_rate"])

    again = runner.invoke(app, ["promote", "-c", str(path), "--version", winner])
    assert again.exit_code == 1 and "already holds @champion" in again.output

    # after a training (the deployment's trigger): that run's version, not the latest; nothing to do
    # when its version is already the champion or it registered none
    registry = Registry(mlflow_server.url, name, "champion")
    identity_run = client.get_model_version(name, identity).run_id
    assert registry.version_of_run(identity_run).version == identity
    monkeypatch.setenv("HERO_CONFIG_FILE", str(path))
    with get_client(sync_client=True) as prefect:
        trained = {
            run_id: prefect.create_flow_run(hero_training, parameters={"config": {"run_id": run_id}}).id
            for run_id in ("winner", "never-registered")
        }
    assert promote(after_flow_run=f"prefect.flow-run.{trained['winner']}") is None
    assert promote(after_flow_run=str(trained["never-registered"])) is None
    # a run of a real prompt has no judge: its version is left for people, the champion stays
    unjudged = register(path, tmp_path / "identity", "people-labelled", task=None)
    with get_client(sync_client=True) as prefect:
        labelled = prefect.create_flow_run(
            hero_training, parameters={"config": {"run_id": "people-labelled"}}
        )
    assert promote(after_flow_run=str(labelled.id)) is None
    assert client.get_model_version_by_alias(name, "champion").version == winner
    # a run on another base model: not judged after training (a person decides, --allow-base-change)
    register(path, WINNING_LORA, "rebased", base="some/other-base")
    with get_client(sync_client=True) as prefect:
        rebased = prefect.create_flow_run(hero_training, parameters={"config": {"run_id": "rebased"}})
    assert promote(after_flow_run=str(rebased.id)) is None
    assert client.get_model_version_by_alias(name, "champion").version == winner
    with pytest.raises(ValueError, match="allow_base_change: true or false, got 'false'"):
        promote(allow_base_change="false")  # a deployment's parameters come unvalidated
    # a new run under the name of run 'identity' (its storage wiped), which registered nothing: the
    # earlier run's version is not judged for it
    fresh = MlflowTracker(config.tracking.tracking_uri, config.tracking.experiment, "identity")
    RunStore(open_store(config.storage), "identity").save_tracking(
        TrackingRecord(tracker_run_id=fresh.run_id)
    )
    with get_client(sync_client=True) as prefect:
        again_named = prefect.create_flow_run(hero_training, parameters={"config": {"run_id": "identity"}})
    assert promote(after_flow_run=str(again_named.id)) is None  # by its name: a decision on `identity`
    by_hand = runner.invoke(app, ["promote", "-c", str(path), "--version", unjudged])
    assert by_hand.exit_code == 1 and f"version {unjudged} has no hero.task tag" in by_hand.output
    other_task = register(path, tmp_path / "identity", "other-task", task="counting")
    mixed = runner.invoke(app, ["promote", "-c", str(path), "--version", other_task])
    said = " ".join(mixed.output.split())
    assert mixed.exit_code == 1 and "the judge cannot compare them. Promote within one task" in said
    assert (
        f"the champion (version {winner}) was trained on task 'anomaly', the challenger for task 'counting'"
        in said
    )
    with pytest.raises(ValueError, match="after_flow_run 'run-7' is not a flow run id"):
        promote(after_flow_run="run-7")

    out = tmp_path / "champion-images"
    generated = runner.invoke(
        app,
        [
            "generate",
            f"models:/{name}@champion",
            "--prompt",
            "three green squares",
            "--out",
            str(out),
            "--count",
            "3",
            "-c",
            str(path),
        ],
    )
    assert generated.exit_code == 0, generated.output
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png", "grid.png"]
    # a LoRA logged without a run's noise pool cannot be sampled --guided: said, nothing written
    guided = runner.invoke(
        app,
        ["generate", f"models:/{name}@champion", "--prompt", "three green squares", "--out",
         str(tmp_path / "guided"), "--guided", "-c", str(path)],
    )  # fmt: skip
    assert guided.exit_code == 1 and f"version {winner} of {name} has no noise pool" in guided.output
    assert not (tmp_path / "guided").exists()

    # MLflow's own load path resolves the alias to the adapter and the base model it references
    import mlflow.diffusers

    registry = Registry(mlflow_server.url, name, "champion")
    assert registry.resolve(f"models:/{name}@champion").version == winner
    for uri in ("runs:/abc/lora", f"models:/{name}/{winner}\n", f"models:/{name}/\u0661"):  # Arabic 1
        with pytest.raises(RegistryError, match="not a model URI"):
            registry.resolve(uri)
    (tmp_path / "dl").mkdir()
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        loaded = mlflow.diffusers.load_model(f"models:/{name}@champion", dst_path=str(tmp_path / "dl"))
    finally:
        mlflow.set_tracking_uri(None)
    assert Path(loaded.base_model, "model_index.json").is_file()
    assert Path(loaded.adapter_path, "pytorch_lora_weights.safetensors").is_file()


def test_a_tracking_server_lost_mid_run_stops_the_run_and_a_resume_tracks_what_it_missed(
    tmp_path: Path, s3_server: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "mlflow-state"
    state.mkdir()
    port = _free_port()
    env = {**s3_server.env, "HERO_INFRA_STATE": str(state), "HERO_MLFLOW_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of retries
    config = load_config(
        production_config(
            tmp_path,
            s3_server,
            Service(url, env),
            **{
                "feedback": {"budget": 18},
                "storage": {"backend": "local", "local_root": str(tmp_path / "d")},
            },
        )
    ).model_copy(update={"run_id": "lost"})
    runs = RunStore(open_store(config.storage), "lost")

    def stop_the_server_after_round_0(stats: Any) -> None:
        if stats.round == 0:
            _infra("mlflow-server.sh", "stop", env)

    _infra("mlflow-server.sh", "start", env)
    try:
        with pytest.raises(TrackingError, match=rf"(?s)MLflow at {url}: logging metrics of step 1 failed.*"
                           r"`hero run --resume lost` tracks what it missed"):  # fmt: skip
            hero_training(config=config, on_round=stop_the_server_after_round_0)
        # round 1 was learned and committed before its tracking failed; nothing was lost
        assert runs.latest_checkpoint() == 1 and runs.untracked_rounds() == [1]
        assert runs.verify().ok

        with pytest.raises(TrackingError, match=rf"MLflow at {url} does not answer \(.*refused"):
            hero_training(config=config)  # a run cannot start against a dead server
        assert runs.latest_checkpoint() == 1

        _infra("mlflow-server.sh", "start", env)
        summary = hero_training(config=config)
        assert (summary.rounds, [s.round for s in summary.rounds_now]) == (3, [2])
        client = MlflowClient(tracking_uri=url)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'lost'"
        )
        assert run.info.status == "FINISHED" and runs.untracked_rounds() == []
        assert [m.step for m in client.get_metric_history(run.info.run_id, "good")] == [0, 1, 2]
        grids = {a.path for a in client.list_artifacts(run.info.run_id, "rounds")}
        assert grids == {"rounds/0000", "rounds/0001", "rounds/0002"}
    finally:
        _infra("mlflow-server.sh", "stop", env)


def test_a_version_whose_lora_artifact_is_gone_or_damaged_is_named(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "hero", "gone", artifact_location=artifacts.as_uri())
    tracker.log_lora(WINNING_LORA, ModelConfig())
    registry = Registry(uri, "gone-lora", "champion")
    version = registry.version(tracker.register_lora("gone-lora", {}))
    # a version is a number (a Prefect parameter, say, is any string): named as given, not as a URI
    with pytest.raises(RegistryError, match=r"version 'abc' of gone-lora: a registry version is its number"):
        registry.version("abc")
    with pytest.raises(RegistryError, match=r"models:/gone-lora/7: gone-lora has no version 7; its versions"):
        registry.version("7")
    with pytest.raises(RegistryError, match=r"models:/none@champion: no registered model 'none' \(there are"):
        registry.resolve("models:/none@champion")  # no such registered model: the ones there are
    with pytest.raises(RegistryError, match=r"models:/gone-lora@champion: .*`hero promote` moves @champion"):
        registry.resolve("models:/gone-lora@champion")  # a model, but no champion yet: what moves it
    hub = MlflowTracker(uri, "hero", "hub-based", artifact_location=artifacts.as_uri())
    hub.log_lora(
        WINNING_LORA, ModelConfig(source="nobody-here/no-such-model")
    )  # trained on a hub model this machine lacks
    on_hub = registry.version(hub.register_lora("gone-lora", {}))
    with pytest.raises(ModelNotFoundError) as missing_base:
        registry.load(on_hub)
    said = str(missing_base.value)
    assert "the base model of version 2 of gone-lora 'nobody-here/no-such-model': cannot load" in said
    assert "model.allow_download=true" in said  # which promote and generate pass on
    (model_file,) = (path for path in artifacts.rglob("MLmodel") if "no-such-model" not in path.read_text())
    (weights,) = model_file.parent.rglob("*.safetensors")
    weights.rename(weights.with_suffix(".kept"))
    with pytest.raises(RegistryError) as no_weights:  # said of the artifact, not of a temporary copy
        registry.load(version)
    assert str(no_weights.value) == (
        f"version 1 of gone-lora: its LoRA artifact ({version.source}): it has no adapter_weights/"
        "pytorch_lora_weights.safetensors; restore it, or register it again from its run"
    )
    weights.with_suffix(".kept").rename(weights)
    model_file.write_text("flavors: [unclosed")
    with pytest.raises(RegistryError, match=r"version 1 of gone-lora: its LoRA artifact .* cannot be read"):
        registry.load(version)
    shutil.rmtree(model_file.parent)  # the artifact store lost the LoRA
    with pytest.raises(RegistryError) as gone:
        registry.load(version)
    assert str(gone.value) == (  # MLflow's report of the download, on one line
        f"version 1 of gone-lora: its LoRA artifact ({version.source}) cannot be read: No such artifact: "
        "'lora'; restore it, or register it again from its run"
    )


def test_a_version_whose_base_model_changed_under_it_is_refused(tmp_path: Path) -> None:
    # the LoRA was trained on one set of weights; the folder its base model names was rewritten since
    base = tmp_path / "base"
    shutil.copytree(TOY_FOLDER, base)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "hero", "based", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker.log_lora(WINNING_LORA, ModelConfig(source=str(base)), weights_sha256(load_pipeline(str(base))))
    registry = Registry(uri, "based-lora", "champion")
    version = registry.version(tracker.register_lora("based-lora", {}))
    registry.load(version)  # the same weights: its LoRA applies
    pipe = load_pipeline(str(base))
    with torch.no_grad():
        pipe.unet.conv_in.bias.mul_(1.01)
    pipe.unet.save_pretrained(base / "unet")
    with pytest.raises(RegistryError) as refused:
        registry.load(version)
    assert str(refused.value).startswith(
        f"version 1 of based-lora was trained on other weights than its base model {str(base)!r} loads "
        "now (unet changed): its LoRA would apply to another model"
    )


def registered_versions(uri: str, name: str, count: int, artifacts: Path | None = None) -> list[str]:
    """`count` versions of `name`, each its run's LoRA; artifacts: where a SQLite store keeps them
    (MLflow would write them under the current folder)."""
    versions = []
    for index in range(count):
        where = None if artifacts is None else artifacts.as_uri()
        tracker = MlflowTracker(uri, "hero", f"{name}-{index}", artifact_location=where)
        tracker.log_lora(WINNING_LORA, ModelConfig())
        versions.append(tracker.register_lora(name, {"hero.run_id": f"{name}-{index}", "hero.rounds": "4"}))
    return versions


def test_a_promotion_judges_against_the_champion_another_promotion_moved_in_meanwhile(
    tmp_path: Path,
) -> None:
    # promotions of runs that finish together overlap: each must compare with the champion it replaces
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best, challenger, third = registered_versions(uri, "raced", 3, tmp_path / "artifacts")
    registry = Registry(uri, "raced", "champion")
    rates = {best: 0.9, challenger: 0.6, third: 0.5, None: 0.1}

    def evaluate(version: Any) -> float:
        if version is not None and version.version == challenger and registry.champion() is None:
            registry.client.set_registered_model_alias("raced", "champion", best)  # the other promotion
        return rates[None if version is None else version.version]

    decision = registry.promote(registry.version(challenger), margin=0.05, images=8, evaluate=evaluate)
    assert (decision.incumbent, decision.incumbent_rate, decision.promoted) == (best, 0.9, False)
    assert registry.champion().version == best  # not replaced by the worse challenger

    moves = iter([third, best] * 3)

    def busy(version: Any) -> float:  # the alias moves during every incumbent's evaluation
        if version is None or version.version != challenger:
            registry.client.set_registered_model_alias("raced", "champion", next(moves))
        return 0.5

    registry.client.set_registered_model_alias("raced", "champion", best)
    recorded = registry.version(challenger).tags  # the first decision's
    with pytest.raises(RegistryError, match=r"@champion of raced moved 3 times while version 2 was judged"):
        registry.promote(registry.version(challenger), margin=0.05, images=8, evaluate=busy)
    assert registry.version(challenger).tags == recorded

    # a champion moved in meanwhile is checked as the first was (another task, another base model)
    registry.client.delete_registered_model_alias("raced", "champion")

    def not_best(incumbent: Any) -> None:
        if incumbent is not None and incumbent.version == best:
            raise RegistryError("not comparable")

    with pytest.raises(RegistryError, match="not comparable"):
        registry.promote(
            registry.version(challenger), margin=0.05, images=8, evaluate=evaluate, comparable=not_best
        )
    assert registry.version(challenger).tags == recorded


def test_a_registry_failing_mid_promotion_is_said_and_never_read_as_no_champion(
    mlflow_server: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one 503 is the failure, not a retry
    name = f"flaky-{uuid.uuid4().hex[:8]}"
    champion, challenger = registered_versions(mlflow_server.url, name, 2)
    MlflowClient(mlflow_server.url).set_registered_model_alias(name, "champion", champion)
    rates = {champion: 0.5, challenger: 0.9}
    failing: set[tuple[str, str]] = set()
    plan = lambda n, method, path: "503" if (method, path.split("?")[0]) in failing else None  # noqa: E731
    alias, tag = "/api/2.0/mlflow/registered-models/alias", "/api/2.0/mlflow/model-versions/set-tag"
    with FaultProxy(mlflow_server.url, plan) as proxy:
        registry = Registry(proxy.url, name, "champion")
        won = registry.version(challenger)
        evaluate = lambda version: rates[version.version]  # noqa: E731
        failing.add(("GET", alias))
        with pytest.raises(
            RegistryError, match=rf"the champion \(@champion\) of {name} cannot be read: .*503"
        ):
            registry.promote(won, margin=0.05, images=8, evaluate=evaluate)  # not judged against the base
        failing.clear()
        failing.add(("POST", alias))
        with pytest.raises(RegistryError) as refused:
            registry.promote(won, margin=0.05, images=8, evaluate=evaluate)
        said = str(refused.value)
        assert said.startswith(f"version {challenger} of {name} won (0.900 vs {champion}: 0.500), but ")
        assert "@champion could not be moved to it: " in said and said.endswith("; promote it again")
        assert "hero.promotion.decision" not in registry.version(challenger).tags
        failing.clear()
        failing.add(("POST", tag))
        with pytest.raises(RegistryError, match="holds @champion now, but the decision's tags were not"):
            registry.promote(won, margin=0.05, images=8, evaluate=evaluate)
        failing.clear()
        assert registry.champion().version == challenger
    assert {(method, path.split("?")[0]) for _, method, path, _ in proxy.injected} == {
        ("GET", alias),
        ("POST", alias),
        ("POST", tag),
    }


@pytest.mark.parametrize(
    "base", [ModelConfig(dtype="bfloat16"), ModelConfig(source="random:tiny", seed=3)], ids=["bf16", "seed"]
)
def test_a_version_loads_onto_its_base_model_as_trained_in_its_dtype_and_from_its_seed(
    tmp_path: Path, base: ModelConfig
) -> None:
    # the weights' fingerprint depends on both: a float32 or seed-0 base would read as other weights
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "hero", "as-trained", artifact_location=(tmp_path / "artifacts").as_uri())
    dtype = getattr(torch, base.dtype)
    trained_on = load_pipeline(base.source, dtype=dtype, seed=base.seed)
    fingerprint = weights_sha256(trained_on)  # as training takes it: before its LoRA
    add_lora(trained_on.unet, rank=2, alpha=2, init="gaussian")
    save_lora(trained_on.unet, tmp_path / "lora")
    tracker.log_lora(tmp_path / "lora", base, fingerprint)
    registry = Registry(uri, "as-trained-lora", "champion")
    version = registry.version(tracker.register_lora("as-trained-lora", {}))
    loaded = registry.load(version)
    assert loaded.unet.dtype == dtype
    assert any("lora" in name for name, _ in loaded.unet.named_parameters())
    bare = registry.load(version, lora=False)  # the incumbent of a first promotion
    assert not any("lora" in name for name, _ in bare.unet.named_parameters())
    assert weights_sha256(bare) == fingerprint


def test_a_version_logged_before_its_metadata_kept_the_dtype_loads_in_its_runs(tmp_path: Path) -> None:
    # MLmodel metadata of the release before: source and fingerprint, no dtype or seed; the run's
    # params (model.dtype is a learning setting: always logged) say how the base was loaded
    import mlflow.diffusers

    from hero_ml.adapters.tracking.registry import BASE_MODEL_KEY, BASE_WEIGHTS_KEY, MODEL_ARTIFACT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "hero", "older", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker.log_params({"model": {"source": "toy", "dtype": "bfloat16", "seed": 0}})
    trained_on = load_pipeline("toy", dtype=torch.bfloat16)
    metadata = {BASE_MODEL_KEY: "toy", BASE_WEIGHTS_KEY: weights_sha256(trained_on)}
    add_lora(trained_on.unet, rank=2, alpha=2, init="gaussian")
    adapter = save_lora(trained_on.unet, tmp_path / "lora").parent
    out = tmp_path / "model"
    mlflow.diffusers.save_model(
        adapter_path=str(adapter), path=str(out), base_model=str(TOY_FOLDER), metadata=metadata
    )
    tracker.client.log_artifacts(tracker.run_id, str(out), MODEL_ARTIFACT)
    registry = Registry(uri, "older-lora", "champion")
    version = registry.version(tracker.register_lora("older-lora", {}))
    assert registry.load(version).unet.dtype == torch.bfloat16


def test_a_web_server_that_is_not_mlflow_is_said_in_a_line_not_its_html_page(tmp_path: Path) -> None:
    # a real web server on loopback at the tracking URI (a wrong port, say): it answers MLflow's API with
    # its own 404 page, which MLflow's message would quote whole
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    said = "the answer was an HTML page ('Error response'), not MLflow's JSON; the server at the tracking URI"
    try:
        with pytest.raises(RegistryError) as registry_error:
            Registry(uri, "hero-lora", "champion").version()
        with pytest.raises(TrackingError) as tracking_error:
            MlflowTracker(uri, "hero", "r")
    finally:
        server.shutdown()
        server.server_close()
    for caught in (registry_error, tracking_error):
        message = str(caught.value)
        assert said in message and "error code 404" in message and "<html" not in message.lower(), message


def test_a_tracking_store_that_cannot_open_is_said_in_a_line(tmp_path: Path) -> None:
    # no PostgreSQL driver here (or, where there is one, no database on port 9): named, not a traceback
    database = "postgresql://hero@127.0.0.1:9/mlflow"
    with pytest.raises(RegistryError, match=r"database driver '\w+' is not installed|cannot be opened"):
        Registry(database, "hero-lora", "champion")
    with pytest.raises(TrackingError, match=r"database driver '\w+' is not installed|cannot be opened"):
        MlflowTracker(database, "hero", "r")
    # a folder where the SQLite file should be: not MLflow retrying to open it for minutes
    with pytest.raises(RegistryError, match="no MLflow database at"):
        Registry(f"sqlite:///{tmp_path}", "hero-lora", "champion")


def test_registry_ls_describes_the_versions_and_alias_points_one_by_hand_and_back(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second, third = map(str, registered_versions(uri, "owned", 3, tmp_path / "artifacts"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tracking": {"tracking_uri": uri, "registered_model": "owned"}}))
    registry = Registry(uri, "owned", "champion")
    client = registry.client
    for key, value in {"hero.task": "counting", "hero.method": "hero", "hero.feedbacks": "12"}.items():
        client.set_model_version_tag("owned", second, key, value)
    client.set_model_version_tag("owned", second, "hero.success_rate.after", "0.3750")

    def hero(*args: str) -> Any:
        return runner.invoke(app, [*args, "-c", str(config)])

    moved = hero("registry", "alias", str(second))
    assert moved.exit_code == 0, moved.output
    assert "@champion of owned: nobody -> version 2 (by hand)" in moved.output
    assert hero("registry", "alias", str(third)).exit_code == 0
    assert "version 3 already holds @champion: nothing moved" in hero("registry", "alias", str(third)).output
    assert hero("registry", "alias", str(first), "--alias", "staging").exit_code == 0
    assert str(registry.champion().version) == third and str(registry.holder("staging").version) == first
    record = registry.aliases()["champion"].record
    assert record is not None and (record["previous"], record["by"]) == (second, "hand")

    listed = hero("registry", "ls", "--limit", "2")
    said = listed.output
    assert listed.exit_code == 0, said
    assert said.index("version 3  @champion") < said.index("version 2  registered")  # newest first
    assert "run owned-1, hero, task counting, 12 feedbacks" in said and "success rate ? -> 0.3750" in said
    assert "version 1  @staging" not in said and "(1 older versions: --limit 3 shows them)" in said
    assert "@champion -> version 3 (by hand, " in said
    assert "before: version 2 (`hero registry alias 2` goes back)" in said
    assert "@staging -> version 1 (by hand, " in said and "no version held it before" in said

    back = hero("registry", "alias", str(second))  # the rollback ls named
    assert back.exit_code == 0 and "version 3 -> version 2" in back.output
    assert str(registry.champion().version) == second
    holder = registry.aliases()["champion"]
    assert holder.version == second and holder.record is not None and holder.record["previous"] == third
    client.set_registered_model_alias("owned", "champion", first)  # in MLflow's UI: no record of hero's
    assert registry.aliases()["champion"] == AliasHolder(first, None)
    elsewhere = hero("registry", "ls").output
    assert "@champion -> version 1 (moved outside hero, in MLflow's UI or API: no record of the version" in (
        " ".join(elsewhere.split())
    )
    assert "hero registry alias 3` goes back" not in elsewhere  # the old record is not taken for this move
    assert hero("registry", "alias", second).exit_code == 0

    for args, error in [
        (("registry", "alias", "7"), "models:/owned/7: owned has no version 7; its versions: 1, 2, 3"),
        (("registry", "alias", "1", "--alias", "v2"), "--alias 'v2': 'latest' and v<number> are MLflow's"),
        (("registry", "alias", "1", "--alias", "prod ready"), "an alias is 1 to 255 letters, digits"),
        (("generate", "models:/owned@champoin", "--prompt", "x", "--out", str(tmp_path / "o")),
         "owned has no alias @champoin; its versions: 1, 2, 3 (`hero registry ls` describes them); its "
         "aliases: @champion -> 2, @staging -> 1"),
        (("generate", "models:/owend/1", "--prompt", "x", "--out", str(tmp_path / "o")),
         "no registered model 'owend' (there are owned; tracking.registered_model names it)"),
    ]:  # fmt: skip
        result = hero(*args)
        assert result.exit_code == 1 and error in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    config.write_text(yaml.safe_dump({"tracking": {"tracking_uri": uri, "registered_model": "none-yet"}}))
    empty = hero("registry", "ls")
    assert empty.exit_code == 1 and "no registered model 'none-yet' (there are owned;" in empty.output


def test_a_promotion_to_another_base_model_is_refused_unless_allowed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    champion, rebased = map(str, registered_versions(uri, "bases", 2, tmp_path / "artifacts"))
    registry = Registry(uri, "bases", "champion")
    for version, base in ((champion, "toy"), (rebased, "some/other-base")):
        registry.client.set_model_version_tag("bases", version, "hero.base_model", base)
        registry.client.set_model_version_tag("bases", version, "hero.task", "anomaly")
    registry.point_alias(registry.version(champion), "champion")
    tracking = {"tracking_uri": uri, "registered_model": "bases"}
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"tracking": tracking, "promotion": {"eval_images": 16}, **tiny_run(images=4)})
    )
    refused = runner.invoke(app, ["promote", "-c", str(config), "--version", rebased])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert (
        "version 2 was trained on the base model 'some/other-base', the champion (version 1) on 'toy': a win "
        "would change the model @champion serves. Judge them anyway with --allow-base-change" in said
    )
    assert "evaluating" not in refused.output  # refused before any image
    allowed = runner.invoke(app, ["promote", "-c", str(config), "--version", rebased, "--allow-base-change"])
    assert allowed.exit_code == 0, allowed.output
    assert "version 2: " in allowed.output and "vs version 1: " in allowed.output  # judged, each on its base
    assert registry.version(rebased).tags["hero.promotion.against"] == champion
