"""The main job: `hero run` on the toy model end to end, and a run that stops and resumes."""

import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.training import hero_training, moved_services, resolve_config, with_stored_run
from hero_ml.adapters.storage import LocalStore, open_store
from hero_ml.adapters.tracking import TrackingError
from hero_ml.adapters.tracking.mlflow import RUN_ID_TAG, open_tracker
from hero_ml.cli import app
from hero_ml.config import ConfigError, HeroConfig, load_config, with_overrides
from hero_ml.engine import EngineError
from hero_ml.run_lease import LeaseLostError
from hero_ml.run_store import CorruptObjectError, RunStore
from hero_ml.sample_round import sample_round
from hero_ml.training import RunError, TrainingRun
from tests.conftest import tiny_run

runner = CliRunner()


def small(tmp_path: Path, **top: object) -> dict:
    return {
        **tiny_run(images=6),
        "feedback": {"budget": 12},
        "simulation": {"eval_images": 6},
        "storage": {"local_root": str(tmp_path / "data")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        **top,
    }


def test_hero_run_trains_tracks_and_stores_a_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "HERO_ORCHESTRATION__WEBHOOK_SECRET": "never-shown-anywhere",
        "HERO_STORAGE__S3_ACCESS_KEY_ID": "s3-key-id-never-shown",
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": "s3-secret-never-shown",
        "HERO_LABEL_STUDIO__API_KEY": "label-studio-token-never-shown",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path)))
    result = runner.invoke(app, ["run", "-c", str(config), "--run-id", "cli-run", "--task", "binding"])
    assert result.exit_code == 0, result.output
    assert "round 0 (" in result.output and "round 1 (" in result.output
    assert (
        "success rate before (6 images)" in result.output and "mlflow ui --backend-store-uri" in result.output
    )
    assert "success rate after, from the run's noise pool (6 images" in result.output
    # not a terminal (as a pipe or a log file): a line per phase where a terminal shows live bars
    phase = re.search(r"denoising \((\d+) sub-batch(?:es)? x (\d+) steps\): (\d+)", result.output)
    assert phase is not None and int(phase[1]) * int(phase[2]) == int(phase[3])
    assert "updating the LoRA: " in result.output and "evaluating before: 6" in result.output

    root = tmp_path / "data" / "runs" / "cli-run"
    assert json.loads((root / "progress.json").read_text()) == {"checkpoint": 1}
    manifest = json.loads((root / "rounds" / "1" / "manifest.json").read_text())
    assert len(manifest["image_ids"]) == 6 and manifest["prompt"] == "a red circle and a green square"
    feedback = json.loads((root / "rounds" / "1" / "feedback.json").read_text())
    assert feedback["aggregate"]["image_ids"] == manifest["image_ids"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'cli-run'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["sampling.num_steps"] == "4" and run.data.params["derived.rounds"] == "2"
    assert "never-shown-anywhere" not in json.dumps(run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "good")] == [0, 1]
    assert {"eval_success_rate_after", "eval_success_rate_after_guided"} <= set(run.data.metrics)
    stored = json.loads((root / "eval" / "after_guided.json").read_text())
    assert run.data.metrics["eval_success_rate_after_guided"] == stored["success_rate"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lora", "encoder", "rounds", "noise_pool"} <= artifacts
    lora = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert {"lora/MLmodel", "lora/adapter_weights"} <= lora  # MLflow's diffusers flavour
    mlmodel = yaml.safe_load(
        Path(client.download_artifacts(run.info.run_id, "lora/MLmodel", str(tmp_path))).read_text()
    )
    trained_on = json.loads((root / "model.json").read_text())["sha256"]  # what a resume compares
    assert mlmodel["metadata"] == {
        "hero_base_model": "toy",
        "hero_base_model_dtype": "float32",
        "hero_base_model_seed": 0,
        "hero_base_model_sha256": trained_on,
    }
    (version,) = client.search_model_versions("name = 'hero-lora'")
    assert version.run_id == run.info.run_id and version.tags["hero.task"] == "binding"
    for label in ("before", "after"):  # beside the version, for `hero registry ls`
        rate = json.loads((root / "eval" / f"{label}.json").read_text())["success_rate"]
        assert version.tags[f"hero.success_rate.{label}"] == f"{rate:.4f}"
    # the command as printed runs: on this run's config
    assert f"`hero promote --version 1 --config {config}`" in " ".join(result.output.split())
    # the logged config is a file to rerun from: its secrets null, never a mask taken for a secret
    logged = client.download_artifacts(run.info.run_id, "config/config.json", str(tmp_path / "logged"))
    with monkeypatch.context() as bare:  # read where none of the secrets is set
        for name in secrets:
            bare.delenv(name)
        rerun = load_config(Path(logged))
    assert (rerun.run_id, rerun.simulation.task) == ("cli-run", "binding")

    # no secret in the output, the run's objects, MLflow's database or its artifacts
    for value in secrets.values():
        assert value not in result.output
        leaks = [p for p in tmp_path.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]
        assert leaks == [], f"{value!r} written to {leaks}"

    again = runner.invoke(app, ["run", "-c", str(config), "--run-id", "cli-run"])
    assert again.exit_code == 1 and "hero run --resume cli-run" in again.output
    (root / "rounds" / "1" / "tracked.json").unlink()  # as a crash after its metrics, before the mark
    learned_at = json.loads((root / "rounds" / "1" / "stats.json").read_text())["learned_at"]
    resumed = runner.invoke(app, ["run", "-c", str(config), "--resume", "cli-run"])
    assert resumed.exit_code == 0, resumed.output
    assert "2 (0)" in resumed.output  # nothing left to do: the budget is spent
    assert (root / "rounds" / "1" / "tracked.json").exists()
    good = client.get_metric_history(run.info.run_id, "good")  # round 1 tracked again: one point
    assert [m.step for m in good] == [0, 1]
    assert good[1].timestamp == int(datetime.fromisoformat(learned_at).timestamp() * 1000)  # its time
    assert "evaluating after" not in resumed.output  # the same weights: their stored evaluations
    history = client.get_metric_history(run.info.run_id, "eval_success_rate_after")
    assert [m.step for m in history] == [2]  # tracked again at its time: one point


def test_hero_run_explains_bad_arguments(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path)))
    unknown = runner.invoke(app, ["run", "-c", str(config), "--task", "juggling"])
    assert unknown.exit_code == 1 and "no task named 'juggling'" in unknown.output
    missing = runner.invoke(app, ["run", "-c", str(config), "--resume", "nothing-here"])
    assert missing.exit_code == 1 and "no run 'nothing-here'" in missing.output
    method = runner.invoke(app, ["run", "-c", str(config), "--method", "magic"])
    assert method.exit_code == 1 and "method: Input should be 'hero'," in method.output
    assert "(got 'magic') [set by --method]" in " ".join(method.output.split())  # the flag, not the file

    zero = runner.invoke(app, ["run", "-c", str(config), "--budget", "0"])  # not "the config's budget"
    assert zero.exit_code == 1 and "budget: Input should be greater than or equal to 1" in zero.output
    assert "[set by --budget]" in zero.output
    markup = runner.invoke(app, ["run", "-c", str(config), "--run-id", "[red]x"])  # shown as given
    assert markup.exit_code == 1 and "(got '[red]x')" in " ".join(markup.output.split())
    assert "[set by --run-id]" in markup.output
    resume = runner.invoke(app, ["run", "-c", str(config), "--resume", "../x"])
    assert resume.exit_code == 1 and "[set by --resume]" in resume.output
    status = runner.invoke(app, ["labelstudio", "status", "bad id!", "-c", str(config)])
    assert status.exit_code == 1 and "run_id: String should match pattern" in status.output
    assert "[set by RUN_ID]" in status.output
    setup = runner.invoke(app, ["labelstudio", "setup", "--run-id", "bad id!", "-c", str(config)])
    assert setup.exit_code == 1 and "[set by --run-id]" in setup.output

    # a stored config.json that was edited: another run's, not a mapping, a field this release lacks
    stored = tmp_path / "data" / "runs" / "edited" / "config.json"
    stored.parent.mkdir(parents=True)
    for content, expected in [
        ({"run_id": "another"}, "names run 'another', not 'edited': restore the run's own config.json"),
        (["a", "list"], "not a readable run config (edited or damaged): a JSON list, not an object"),
        ({"run_id": "edited", "sampling": {"gone": 1}}, "no longer valid: sampling.gone: Extra inputs"),
    ]:
        stored.write_text(json.dumps(content))
        # the resume refuses it; verify (which checks a run for resuming) names it a problem
        for command in (["run", "--resume", "edited"], ["storage", "verify", "edited"]):
            edited = runner.invoke(app, [*command, "-c", str(config)])
            assert edited.exit_code == 1 and flat(expected) in flat(edited.output), edited.output
            assert "runs/edited/config.json" in "".join(edited.output.split())  # the file is named
    stored.write_text("{truncated")
    for command in (
        ["run", "-c", str(config), "--resume", "edited"],
        ["storage", "verify", "edited", "-c", str(config)],
    ):
        damaged = runner.invoke(app, command)
        assert damaged.exit_code == 1 and "Traceback" not in damaged.output
        assert flat("config.json is not a readable run config (edited or damaged)") in flat(damaged.output)


def test_a_run_resumes_where_its_services_moved_and_keeps_what_it_learns_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "r"})
    store = open_store(config.storage)  # where the flow looks for it
    with TrainingRun(config, store) as run:
        run.generate()
    # after the start: a secret set, the MLflow server moved, another poll interval and Label Studio
    # address; the shared file now gives new runs another lr and deadline
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "set-after-the-start")
    moved = {
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'moved.db'}"},
        "orchestration": {"poll_interval_s": 45, "round_deadline_h": 2.0},
        "label_studio": {"url": "http://127.0.0.1:9"},
        "ddpo": {"lr": 1e-2},
    }
    worker = with_overrides(with_overrides(load_config(), {**small(tmp_path), "run_id": "r"}), moved)
    assert worker.orchestration.webhook_secret is not None
    with pytest.raises(RunError, match=r"settings differ: ddpo.lr, orchestration.round_deadline_h\)"):
        TrainingRun(worker, store)  # the worker's file as it is: not the run's
    resumed = with_stored_run(worker, {})
    assert resumed.ddpo.lr == config.ddpo.lr and resumed.orchestration.round_deadline_h is None
    assert resumed.tracking == worker.tracking and str(resumed.label_studio.url) == "http://127.0.0.1:9/"
    assert resumed.orchestration.poll_interval_s == 45 and resumed.orchestration.webhook_secret is not None
    with TrainingRun(resumed, store) as run:
        assert run.engine.round == 0  # the committed round is there to be labelled
    # a flow run's own override that contradicts the stored run is still refused
    with pytest.raises(RunError, match=r"settings differ: sampling.guidance_scale\)"):
        TrainingRun(with_stored_run(worker, {"sampling": {"guidance_scale": 2.0}}), store)


def test_a_resumed_run_tracks_into_its_mlflow_run_with_its_services_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "tracked"})
    store = open_store(config.storage)
    with TrainingRun(config, store) as run:
        run.track_with(open_tracker(config))
        run.generate()
    # resumed by another worker: a secret set since, another poll interval and Label Studio address
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "set-after-the-start")
    moved = {"orchestration": {"poll_interval_s": 45}, "label_studio": {"url": "http://127.0.0.1:9"}}
    resumed = with_stored_run(
        with_overrides(load_config(), {**small(tmp_path), "run_id": "tracked", **moved}), {}
    )
    with TrainingRun(resumed, store) as run:
        tracking = run.tracking()
        run.track_with(
            open_tracker(resumed, tracking.tracker_run_id, tracking.uid)
        )  # its params as they were
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    (tracked,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'tracked'"
    )
    assert tracked.data.params["ddpo.lr"] == str(config.ddpo.lr)
    assert not any(key.startswith(("orchestration.poll", "label_studio.url")) for key in tracked.data.params)
    assert tracked.data.tags["service.orchestration.poll_interval_s"] == "45"
    assert tracked.data.tags["service.label_studio.url"] == "http://127.0.0.1:9/"
    assert tracked.data.tags["service.orchestration.webhook_secret"] == "**********"

    # the experiment renamed in the worker's config (tracking is a service setting): the run goes on in
    # its own MLflow run, not a new one holding only the rounds after the resume
    renamed = with_overrides(resumed, {"tracking": {"experiment": "renamed"}})
    with TrainingRun(renamed, store) as run:
        run.track_with(open_tracker(renamed, run.tracking().tracker_run_id))
        assert run.tracker is not None and run.tracker.run_id == tracked.info.run_id
        elsewhere = {"tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"}}
        with pytest.raises(
            TrackingError, match=f"run 'tracked' is tracked in MLflow run {tracked.info.run_id}"
        ):
            open_tracker(with_overrides(renamed, elsewhere), run.tracking().tracker_run_id)
    assert client.get_experiment_by_name("renamed") is None

    # a param that does differ (an edited stored config) is refused by name, with the way out
    tracker = open_tracker(resumed, tracked.info.run_id)
    with pytest.raises(TrackingError, match=r"other values of ddpo.lr: resume run 'tracked' with its own"):
        tracker.log_params({"ddpo": {"lr": 0.5}})


def test_a_run_is_tracked_in_its_own_mlflow_run_never_in_an_earlier_runs_of_its_name(tmp_path: Path) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "reused"})
    with TrainingRun(config, open_store(config.storage)) as run:
        made = open_tracker(config, None, run.tracking().uid)  # a crash before track_with records it
    with TrainingRun(config, open_store(config.storage)) as run:
        tracking = run.tracking()
        assert tracking.tracker_run_id is None
        run.track_with(open_tracker(config, None, tracking.uid))
        assert run.tracker is not None and run.tracker.run_id == made.run_id  # found again by its uid
        assert run.tracking().tracker_run_id == made.run_id
    # the run's storage wiped, the MLflow server kept: a new run of the same name (its metrics, LoRA
    # artifact and registered version were written over the earlier run's)
    shutil.rmtree(tmp_path / "data" / "runs" / "reused")
    with TrainingRun(config, open_store(config.storage)) as run:
        tracking = run.tracking()
        run.track_with(open_tracker(config, tracking.tracker_run_id, tracking.uid))
        assert run.tracker is not None and run.tracker.run_id != made.run_id


def test_a_budget_of_no_whole_number_of_rounds_stops_a_new_run_not_a_stored_one(tmp_path: Path) -> None:
    uneven = HeroConfig.model_validate({**small(tmp_path), "run_id": "uneven", "feedback": {"budget": 15}})
    store = open_store(uneven.storage)
    with pytest.raises(
        RunError, match=r"run 'uneven': feedback.budget \(15\) is 2 rounds of 6 .* give 12 or 18"
    ):
        TrainingRun(uneven, store)
    assert RunStore(store, "uneven").load_config() is None  # nothing stored
    # a run stored by a release that took such a budget resumes as it began
    RunStore(store, "uneven").save_config(uneven.to_public_dict())
    with TrainingRun(uneven, store) as run:
        assert run.engine.round == 0


def two_rounds_learned(tmp_path: Path, run_id: str) -> tuple[HeroConfig, LocalStore, list[torch.Tensor]]:
    """A run of two rounds learned and checkpointed: its config, its store and its final LoRA."""
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": run_id})
    store = LocalStore(config.storage.local_root)
    with TrainingRun(config, store) as run:
        for _ in range(2):
            batch = run.generate()
            run.learn(batch, run.feedback(batch))
        return config, store, final_lora(run)


def test_a_checkpoint_committed_just_before_a_crash_is_resumed_from_not_learned_again(tmp_path: Path) -> None:
    config, store, learned = two_rounds_learned(tmp_path, "committed")
    runs = RunStore(store, "committed")
    state = (tmp_path / "data" / "runs" / "committed" / "checkpoints" / "1" / "state.json").read_bytes()
    # the crash came after checkpoint 1's state.json, before progress.json moved to it
    store.put("runs/committed/progress.json", json.dumps({"checkpoint": 0}).encode())
    with TrainingRun(config, store) as run:
        assert run.engine.round == 2 and run.done  # nothing learned again
        assert all(torch.equal(a, b) for a, b in zip(final_lora(run), learned, strict=True))
    assert runs.latest_checkpoint() == 1 and runs.verify().ok
    assert (
        tmp_path / "data" / "runs" / "committed" / "checkpoints" / "1" / "state.json"
    ).read_bytes() == state


def test_a_run_refuses_to_go_on_with_other_base_weights_under_its_model_source(tmp_path: Path) -> None:
    # the folder a run samples from is rewritten under it (`hero toy pretrain`, a hub id's new revision)
    model = tmp_path / "model"
    assert runner.invoke(app, ["model", "build", "tiny", str(model), "--seed", "3"]).exit_code == 0
    data = {**small(tmp_path), "run_id": "rebuilt", "model": {"source": str(model)}}
    config = HeroConfig.model_validate(data)
    store = open_store(config.storage)
    with TrainingRun(config, store) as run:
        run.generate()
    record = RunStore(store, "rebuilt").load_model()
    assert record is not None and record.source == str(model)
    assert set(record.sha256) == {"unet", "text_encoder", "vae"}
    TrainingRun(config, store).close()  # the same weights: it resumes
    kept = runner.invoke(app, ["model", "build", "tiny", str(model), "--seed", "4"])
    assert kept.exit_code == 1 and "already holds model_index.json and 5 more" in kept.output, kept.output
    TrainingRun(config, store).close()  # refused before any write: the same weights still
    rebuilt = runner.invoke(app, ["model", "build", "tiny", str(model), "--seed", "4", "--overwrite"])
    assert rebuilt.exit_code == 0, rebuilt.output
    with pytest.raises(RunError) as refused:
        TrainingRun(config, store)
    assert str(refused.value).startswith(
        f"run 'rebuilt' began on other weights than model.source {str(model)!r} loads now (sha256 of unet "
        f"{record.sha256['unet'][:12]}… now "
    )
    assert "text_encoder" in str(refused.value) and "or choose a new run_id" in str(refused.value)
    assert RunStore(store, "rebuilt").load_model() == record  # nothing overwritten


def test_a_damaged_checkpoint_not_yet_acknowledged_is_learned_again_from_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, store, learned = two_rounds_learned(tmp_path, "damaged")
    # the crash came before progress.json moved to checkpoint 1, and a bit of its tensors flipped since
    store.put("runs/damaged/progress.json", json.dumps({"checkpoint": 0}).encode())
    tensors = tmp_path / "data" / "runs" / "damaged" / "checkpoints" / "1" / "state.safetensors"
    damaged = bytearray(tensors.read_bytes())
    damaged[-1] ^= 1
    tensors.write_bytes(bytes(damaged))
    runs = RunStore(store, "damaged")
    with TrainingRun(config, store) as run:
        assert run.engine.round == 1 and runs.latest_checkpoint() == 0  # progress.json stayed
        assert "does not match its state.json" in caplog.text and "round 1 is learned again" in caplog.text
        batch = run.generate()  # the committed batch and feedback of round 1, learned again
        run.learn(batch, run.feedback(batch))
        assert all(torch.equal(a, b) for a, b in zip(final_lora(run), learned, strict=True))
    assert runs.latest_checkpoint() == 1 and runs.verify().ok


def test_a_checkpoint_not_yet_acknowledged_that_its_engine_refuses_is_learned_again_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # refused after the engine took the pipeline (an edited learning rate, a copied state.json): the
    # fallback's engine takes the same pipeline, which must not still hold the refused one's LoRA
    config, store, learned = two_rounds_learned(tmp_path, "refused")
    checkpoints = tmp_path / "data" / "runs" / "refused" / "checkpoints"
    store.put("runs/refused/progress.json", json.dumps({"checkpoint": 0}).encode())
    state = json.loads((checkpoints / "1" / "state.json").read_text())
    state["optimizers"]["lora"]["param_groups"][0]["lr"] = 0.5
    (checkpoints / "1" / "state.json").write_text(json.dumps(state))
    with TrainingRun(config, store) as run:
        assert run.engine.round == 1 and "round 1 is learned again" in caplog.text
        batch = run.generate()
        run.learn(batch, run.feedback(batch))
        assert all(torch.equal(a, b) for a, b in zip(final_lora(run), learned, strict=True))
    for name in ("state.safetensors", "state.json"):  # checkpoint 0's files where checkpoint 1's were
        (checkpoints / "1" / name).write_bytes((checkpoints / "0" / name).read_bytes())
    store.put("runs/refused/progress.json", json.dumps({"checkpoint": 0}).encode())
    with TrainingRun(config, store) as run:  # refused by the round check, after loading
        assert run.engine.round == 1 and "holds the engine after round 0, not 1" in caplog.text


def test_a_checkpoint_whose_state_json_was_edited_is_refused(tmp_path: Path) -> None:
    config, store, _ = two_rounds_learned(tmp_path, "edited")
    checkpoints = tmp_path / "data" / "runs" / "edited" / "checkpoints"
    state = json.loads((checkpoints / "1" / "state.json").read_text())
    faster = json.loads(json.dumps(state))
    faster["optimizers"]["lora"]["param_groups"][0]["lr"] = 0.5  # the state.json is not hashed
    (checkpoints / "1" / "state.json").write_text(json.dumps(faster))
    with pytest.raises(EngineError, match=r"optim.lora has hyper-parameters \{'lr': 0.5, .*the config's are"):
        TrainingRun(config, store)
    for name in ("state.safetensors", "state.json"):  # checkpoint 0's files where checkpoint 1's were
        (checkpoints / "1" / name).write_bytes((checkpoints / "0" / name).read_bytes())
    with pytest.raises(EngineError, match=r"checkpoints/1' holds the engine after round 0, not 1 \(its"):
        TrainingRun(config, store)


def test_a_training_run_does_not_adopt_a_round_that_hero_sample_committed(tmp_path: Path) -> None:
    # `hero sample` stores no run config: its round's prompt, model and seed cannot be checked
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "sampled"})
    sample_round(config)
    with pytest.raises(RunError, match="run 'sampled' holds a round 0 but no run config: a round sampled by"):
        TrainingRun(config, open_store(config.storage))
    assert RunStore(open_store(config.storage), "sampled").load_config() is None  # nothing written


def test_the_base_models_evaluation_is_tracked_though_it_was_stored_untracked(tmp_path: Path) -> None:
    # a crash between storing the 'before' evaluation and tracking it: the resume tracks the stored one
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "before"})
    store = open_store(config.storage)
    with TrainingRun(config, store) as run:
        measured = run.evaluate("before")  # stored; no tracker yet
    for _ in range(2):  # every resume tracks it again (a suspended flow run is entered once a round)
        with TrainingRun(config, store) as run:
            tracking = run.tracking()
            run.track_with(open_tracker(config, tracking.tracker_run_id, tracking.uid))
            assert run.evaluate("before") == measured  # not measured again
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    (tracked,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'before'"
    )
    history = client.get_metric_history(tracked.info.run_id, "eval_success_rate_before")
    # one point: tracked again at the time it was measured (it was a point more at every resume)
    assert measured is not None and [(m.step, m.value) for m in history] == [(0, measured.success_rate)]


def test_an_evaluation_is_reused_for_the_weights_it_measured_and_taken_again_after_more_learning(
    tmp_path: Path,
) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "evals"})
    store = open_store(config.storage)
    runs = RunStore(store, "evals")
    phases: list[str] = []

    def on_progress(phase: str, done: int, total: int) -> None:
        phases.append(phase)

    with TrainingRun(config, store) as run:
        batch = run.generate()
        run.learn(batch, run.feedback(batch))
        measured = run.evaluate("after")
    stored = runs.load_evaluation("after")
    assert measured is not None and stored is not None and stored.round == 1
    with TrainingRun(config, store, on_progress=on_progress) as run:  # a resume on the same weights
        assert run.evaluate("after") == measured and "evaluating after" not in phases
        batch = run.generate()
        run.learn(batch, run.feedback(batch))
        run.evaluate("after")  # the LoRA learned more: measured again
    assert "evaluating after" in phases
    again = runs.load_evaluation("after")
    assert again is not None and again.round == 2 and again.measured_at != stored.measured_at


def flat(text: str) -> str:
    """Text without whitespace: rich wraps a long path anywhere, even inside a word."""
    return "".join(text.split())


def final_lora(run: TrainingRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.engine.lora_params]


def test_a_run_says_what_it_is_doing_phase_by_phase(tmp_path: Path) -> None:
    # sub-batches of 4 for 6 images: 2 of 4 steps a round
    data = {**small(tmp_path), "run_id": "phases", "simulation": {"eval_images": 6}}
    data["sampling"] = {**data["sampling"], "sub_batch_size": 4}
    seen: list[tuple[str, int, int | None]] = []
    with TrainingRun(
        HeroConfig.model_validate(data), LocalStore(tmp_path), on_progress=lambda *p: seen.append(p)
    ) as run:
        run.evaluate("before")
        batch = run.generate()
        run.learn(batch, run.feedback(batch))
    evaluating = [("evaluating before", done, 6) for done in (0, 4, 6)]  # images, by sub-batch
    denoising = [("denoising", done, 8) for done in range(1, 9)]
    epochs, steps = run.config.encoder.epochs_per_round, run.config.optimizer_steps_per_round
    encoder = [("training the encoder", done, epochs) for done in range(epochs + 1)]
    lora = [("updating the LoRA", done, steps) for done in range(steps + 1)]
    loading = [("loading the model", 0, 1), ("loading the model", 1, 1)]  # 1 of 1: the run is stored
    assert seen == loading + evaluating + denoising + encoder + lora
    assert steps > 1 and run.runs.load_stats(0).optimizer_steps == steps  # every step taken and counted


def test_a_run_stopped_mid_round_resumes_to_the_same_result(tmp_path: Path) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "steady", "feedback": {"budget": 18}})
    steady = TrainingRun(config, LocalStore(tmp_path / "steady"))
    while not steady.done:
        batch = steady.generate()
        steady.learn(batch, steady.feedback(batch))

    store = LocalStore(tmp_path / "crashy")
    first = TrainingRun(config, store)
    batch = first.generate()
    first.learn(batch, first.feedback(batch))
    first.generate()  # round 1 committed, then the process stops before its feedback
    first.close()
    second = TrainingRun(config, store)
    assert second.engine.round == 1
    batch = second.generate()
    assert torch.equal(batch.trajectory.latents, RunStore(store, "steady").load_batch(1).trajectory.latents)
    second.learn(batch, second.feedback(batch))
    second.close()
    with TrainingRun(config, store) as third:  # and once more, between rounds
        while not third.done:
            batch = third.generate()
            third.learn(batch, third.feedback(batch))
    assert third.engine.feedbacks == steady.engine.feedbacks == 18
    assert all(torch.equal(a, b) for a, b in zip(final_lora(steady), final_lora(third), strict=True))


def test_a_run_refuses_another_config_and_a_tampered_round(tmp_path: Path) -> None:
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "r"})
    store = LocalStore(tmp_path / "s")
    with TrainingRun(config, store) as run:
        run.generate()
    other = with_overrides(config, {"method": "d3po", "ddpo": {"lr": 1e-2}, "tracking": {"experiment": "x"}})
    with pytest.raises(RunError, match=r"another config \(settings differ: ddpo.lr, method\)"):
        TrainingRun(other, store)
    # a run stored by a release without a field resumes at the field's default, and only there
    stored = tmp_path / "s" / "runs" / "r" / "config.json"
    fields = json.loads(stored.read_text())
    del fields["model"]["lora_init"]
    stored.write_text(json.dumps(fields))
    TrainingRun(config, store).close()
    gaussian = config.model_copy(update={"model": config.model.model_copy(update={"lora_init": "gaussian"})})
    with pytest.raises(RunError, match=r"settings differ: model.lora_init\)"):
        TrainingRun(gaussian, store)
    path = tmp_path / "s" / "runs" / "r" / "rounds" / "0" / "trajectory.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptObjectError, match="changed or truncated after the round was committed"):
        RunStore(store, "r").load_batch(0)
    data = small(tmp_path)
    data["sampling"]["prompt"] = "a red square"
    with pytest.raises(RunError, match="not a prompt of task 'counting'"):
        TrainingRun(HeroConfig.model_validate(data), store)


def test_a_run_whose_lease_was_taken_leaves_its_mlflow_run_to_the_new_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the process that took the lease trains on in the same MLflow run: the loser must not mark it
    # FAILED (the loss is injected: a real takeover needs a stalled renewal of a minute or more)
    import flows.training

    def taken_over(*args: object, **kwargs: object) -> None:
        raise LeaseLostError("run 'taken': this process's lease (epoch 0) was taken over")

    monkeypatch.setattr(flows.training, "hero_round", taken_over)
    config = HeroConfig.model_validate({**small(tmp_path), "run_id": "taken"})
    with pytest.raises(LeaseLostError):
        flows.training.hero_training(config=config)
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    (tracked,) = client.search_runs(
        [client.get_experiment_by_name("hero").experiment_id], f"tags.`{RUN_ID_TAG}` = 'taken'"
    )
    assert tracked.info.status == "RUNNING"


def test_flow_parameters_that_name_two_runs_are_refused() -> None:
    # the overrides go on last: run_id 'a' with config.run_id 'b' would train b while the poller watched a
    with pytest.raises(ConfigError, match=r"name two runs, run_id 'a' and config.run_id 'b': give one"):
        resolve_config("a", {"run_id": "b"})
    assert resolve_config("a", {"run_id": "a"}).run_id == "a"
    assert resolve_config(None, {"run_id": "b"}).run_id == "b"


@pytest.mark.parametrize(
    ("overrides", "moved"),
    [
        ({"storage": {"local_root": "/elsewhere"}}, ["storage"]),
        ({"label_studio": {"url": "http://127.0.0.1:9"}}, ["label_studio.url"]),
        ({"storage": {"backend": "local", "local_root": "hero-data"}}, []),  # the worker's own: no move
        ({"label_studio": {"project_title_prefix": "t"}}, []),  # how it is labelled, not where
    ],
)
def test_flow_parameters_cannot_move_a_run_away_from_the_services_that_resume_it(
    overrides: dict[str, Any], moved: list[str]
) -> None:
    # the receiver and the poller look for a suspended run's rounds in their own storage and Label
    # Studio: a run kept elsewhere would wait forever
    assert moved_services(resolve_config("a", overrides), load_config()) == moved
    if moved:
        with pytest.raises(ConfigError, match=rf"config override of {moved[0]}: where runs are stored"):
            hero_training(run_id="a", config=overrides)
