import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from starlette.routing import Route
from typer.core import TyperGroup
from typer.testing import CliRunner

from hero_ml.cli import app, run_header
from hero_ml.config import ConfigError, HeroConfig, load_config, with_overrides
from hero_ml.diffusion.sampler import Trajectory
from hero_ml.toy.cli import PRETRAINED
from tests.conftest import _free_port

runner = CliRunner()
HERO = str(Path(sys.executable).parent / "hero")  # the installed entry point beside this interpreter


def small_config(tmp_path: Path, **model: object) -> Path:
    path = tmp_path / "small.yaml"
    data = {
        "run_id": "cli-test",
        "model": {"source": "random:tiny", **model},
        "sampling": {"images_per_round": 4, "num_steps": 3, "sub_batch_size": 3},
        "ddpo": {"timesteps_per_trajectory": 2},
        "feedback": {"budget": 8},
        "storage": {"local_root": str(tmp_path / "data")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def command_paths(group: TyperGroup, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """(words, help text) of every command and group under `group`, itself included."""
    found = [(path, group.help or "")]
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            found += command_paths(command, (*path, name))
        else:
            found.append(((*path, name), command.help or ""))
    return found


def test_every_command_has_help() -> None:
    top = typer.main.get_command(app)
    assert isinstance(top, TyperGroup)
    commands = command_paths(top)
    # every command of every group, found by walking the app, not a hand-kept list
    assert {("run",), ("config", "validate"), ("toy", "eval"), ("rounds", "poll")} <= {w for w, _ in commands}
    for words, text in commands:
        assert text.strip(), f"`hero {' '.join(words)}` has no help text"
        result = runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (words, result.output)
        assert text.split()[0] in result.output


def test_help_paragraphs_fill_the_terminal_instead_of_breaking_where_the_source_wraps() -> None:
    for words, text in command_paths(typer.main.get_command(app)):
        result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "1000"})
        for paragraph in text.split("\n\n"):  # each one line on a wide terminal, as written in a docstring
            assert " ".join(paragraph.split()) in result.output, (words, paragraph, result.output)


def test_the_hero_command_prints_an_error_it_can_explain_without_a_traceback(tmp_path: Path) -> None:
    # the installed entry point, as a user runs it: a bad run id is a message, exit 1
    result = subprocess.run(
        [HERO, "run", "--resume", "bad id"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "run_id" in result.stderr and "bad id" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_show_prints_the_resolved_config_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "tok-do-not-print")
    monkeypatch.setenv("HERO_SAMPLING__ETA", "0.7")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "tok-do-not-print" not in result.output
    shown = yaml.safe_load(result.output.split("# derived:")[0])
    assert shown["sampling"]["eta"] == 0.7
    assert shown["label_studio"]["api_key"] is None
    assert "api_key: null  # set, not shown: give it through HERO_LABEL_STUDIO__API_KEY" in result.output
    assert "# DDIM denoising steps (the trajectory's length)." in result.output

    plain = runner.invoke(app, ["config", "show", "--no-comments"]).output
    assert "tok-do-not-print" not in plain and "# DDIM" not in plain
    # a file never carries a secret: null, as in the commented form (a mask read back would become one)
    assert yaml.safe_load(plain.split("# derived:")[0])["label_studio"]["api_key"] is None


def test_debug_logging_never_shows_the_s3_keys(tmp_path: Path) -> None:
    # botocore's debug log prints each request's Authorization header, which names the access key id
    env = {
        **os.environ,
        "HERO_STORAGE__BACKEND": "s3",
        "HERO_STORAGE__S3_BUCKET": "hero-runs",
        "HERO_STORAGE__S3_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",  # nothing listens
        "HERO_STORAGE__S3_MAX_ATTEMPTS": "1",
        "HERO_STORAGE__S3_ACCESS_KEY_ID": "AKIA-hunter2-id",
        "HERO_STORAGE__S3_SECRET_ACCESS_KEY": "hunter2-secret",
    }
    result = subprocess.run(
        [HERO, "-v", "storage", "ls", "r"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1 and "check storage.s3_endpoint_url" in " ".join(result.stderr.split())
    assert "hunter2" not in result.stdout + result.stderr


def test_config_show_output_is_a_valid_config_file_with_the_same_values(tmp_path: Path) -> None:
    data = yaml.safe_load(small_config(tmp_path).read_text())
    data["storage"]["s3_endpoint_url"] = "http://127.0.0.1:9000"
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(data))
    shown = runner.invoke(app, ["config", "show", "-c", str(tmp_path / "custom.yaml")]).output
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(tmp_path / "shown.yaml") == load_config(tmp_path / "custom.yaml")


def test_config_validate_accepts_a_good_file_and_rejects_a_bad_one(tmp_path: Path) -> None:
    good = runner.invoke(app, ["config", "validate", str(small_config(tmp_path))])
    assert good.exit_code == 0, good.output
    assert "rounds=2" in good.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  guidance_scale: 0.5\n")
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert "sampling.guidance_scale" in result.output and "greater than or equal to 1" in result.output
    assert "Traceback" not in result.output


def test_sample_commits_a_round_with_grid_trajectory_and_manifest(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--config", str(small_config(tmp_path))])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "data" / "runs" / "cli-test" / "rounds" / "0"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"] == 4 and "random weights" in manifest["note"]
    assert set(manifest["files"]) == {"trajectory.safetensors", "grid.png"} | {
        f"images/r0000-{i:03d}.png" for i in range(4)
    }
    for name, described in manifest["files"].items():
        assert (folder / name).stat().st_size == described["bytes"]

    trajectory = Trajectory.load(folder / "trajectory.safetensors")
    assert trajectory.latents.shape == (4, 4, 4, 16, 16) and trajectory.log_probs.shape == (4, 3)
    first = torch.from_numpy(np.array(Image.open(folder / "images/r0000-000.png")))
    assert torch.equal(first, trajectory.images[0])
    assert Image.open(folder / "grid.png").size[0] > 2 * 32

    leases = sorted((tmp_path / "data" / "runs" / "cli-test" / "lease").iterdir())
    again = runner.invoke(app, ["sample", "--config", str(small_config(tmp_path))])
    assert again.exit_code == 1 and "already committed" in again.output
    assert sorted((tmp_path / "data" / "runs" / "cli-test" / "lease").iterdir()) == leases  # nothing written


def test_sample_from_a_built_model_folder(tmp_path: Path) -> None:
    built = runner.invoke(app, ["model", "build", "tiny", str(tmp_path / "model"), "--seed", "3"])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "model" / "model_index.json").is_file()
    result = runner.invoke(
        app, ["sample", "--config", str(small_config(tmp_path, source=str(tmp_path / "model")))]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data/runs/cli-test/rounds/0/manifest.json").read_text())
    assert manifest["note"] == "sampled from the configured model"


def test_a_missing_model_is_a_readable_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--config", str(small_config(tmp_path, source="someone/missing"))])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "model.source 'someone/missing': cannot load the model" in said and "Traceback" not in said
    assert "model.allow_download=true" in said  # `hero sample` reads it: offered
    assert "loading someone/missing" not in result.output  # no progress bar left under the error
    assert not (tmp_path / "data").exists()  # refused before the run's lease or anything else is written
    malformed = runner.invoke(app, ["sample", "--config", str(small_config(tmp_path, source="models:/x@y"))])
    assert malformed.exit_code == 1 and "Traceback" not in malformed.output
    assert "model.source 'models:/x@y' is neither a folder nor a hub id" in " ".join(malformed.output.split())


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("HERO_STORAGE__LOCAL_ROOT", "", "storage.local_root: is empty"),
        ("HERO_MODEL__SOURCE", "", "model.source: String should have at least 1 character"),
        ("HERO_MODEL__DEVICE", "cuda:99999999999999999999", "model.device: String should match pattern"),
    ],
)
def test_an_empty_folder_or_an_absurd_device_is_refused_by_name(
    variable: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 1 and says in " ".join(result.output.split()), result.output


def test_options_that_would_be_ignored_or_fail_late_are_refused_first(tmp_path: Path) -> None:
    empty_id = runner.invoke(app, ["run", "-c", str(small_config(tmp_path)), "--run-id", ""])
    assert empty_id.exit_code == 1 and "run_id" in empty_id.output  # not taken for "not given"
    assert not (tmp_path / "data").exists()
    build = runner.invoke(app, ["model", "build", "tiny", "/proc/hero-model"])
    assert build.exit_code == 1 and "OUT /proc/hero-model: cannot create it" in build.output
    for command in ("ls", "verify"):
        for run_id in ("../x", "a/b", "r" * 65):
            listed = runner.invoke(app, ["storage", command, run_id, "-c", str(small_config(tmp_path))])
            assert listed.exit_code == 1 and f"(got {run_id!r})" in listed.output
            assert "[set by RUN_ID]" in listed.output
    steps = runner.invoke(app, ["toy", "pretrain", "--out", str(tmp_path / "toy"), "--vae-steps", "0"])
    assert steps.exit_code == 2 and "Invalid value for '--vae-steps'" in steps.output
    assert not (tmp_path / "toy").exists()


def test_a_run_against_a_dead_tracking_server_fails_at_once_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HERO_TRACKING__TRACKING_URI", dead)
    result = runner.invoke(app, ["run", "-c", str(small_config(tmp_path))])
    assert result.exit_code == 1
    assert f"MLflowat{dead}doesnotanswer" in "".join(result.output.split())  # rich wraps long lines
    assert "denoising" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "data" / "runs" / "cli-test" / "rounds").exists()  # nothing sampled


@pytest.mark.parametrize("command", [["deploy"], ["rounds", "poll"], ["serve-webhooks"]])
def test_the_server_commands_refuse_a_prefect_server_that_does_not_answer(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", f"http://user:hunter2@{dead}")  # credentials are never printed
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "s" * 16)
    if command == ["serve-webhooks"]:  # its port is bound first: a free one, not the default 8765
        command = [*command, "--port", str(_free_port())]
    result = subprocess.run([HERO, *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    message = "".join(result.stderr.split())  # rich wraps long lines
    assert f"thePrefectserverathttp://…@{dead}failsitshealthcheck" in message and "refused" in message
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


@pytest.mark.parametrize("command", [["deploy"], ["rounds", "poll"]])
def test_the_server_commands_name_a_request_the_prefect_server_refuses(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server that passes the health check but is not Prefect's API (another service, another version)
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse

    from tests.conftest import serve

    async def health_only(request: Request) -> JSONResponse:
        found = request.url.path == "/api/health"
        return JSONResponse(True if found else {"detail": "Not Found"}, 200 if found else 404)

    async def unauthorized(request: Request) -> JSONResponse:
        return JSONResponse({"detail": "Unauthorized"}, 401)

    async def a_web_page(request: Request) -> HTMLResponse:  # 200 on every path, health included
        return HTMLResponse("<html><body>welcome</body></html>")

    for answer in (health_only, unauthorized, a_web_page):
        server = serve(Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST", "PATCH"])]))
        # credentials in the URL are never printed, nor the URL's in the HTTP client's error
        monkeypatch.setenv("PREFECT_API_URL", f"{next(server)}/api".replace("//", "//user:hunter2@", 1))
        monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")  # the poller needs one: never asked, here
        try:
            result = subprocess.run([HERO, *command], capture_output=True, text=True, timeout=120)
        finally:
            server.close()
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "hunter2" not in result.stderr
        message = " ".join(result.stderr.split())
        if answer is health_only:
            assert "the Prefect server refused" in message
            assert '(HTTP 404: {"detail":"Not Found"}); check' in message
        elif answer is a_web_page:
            assert "answered, but not as Prefect's API does" in message and "check PREFECT_API_URL" in message
        else:
            assert "fails its health check (Client error '401 Unauthorized'" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1/api", "PREFECT_API_URL http://[::1/api is not a URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:99999/api", "is not a URL (Port out of range"),
        ("notaurl", "PREFECT_API_URL notaurl is not an http(s) URL: e.g. http://127.0.0.1:4200/api"),
    ],
)
def test_a_prefect_url_that_is_not_one_is_refused(
    url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", url)
    result = runner.invoke(app, ["rounds", "poll"])
    assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output


def test_a_prefect_url_without_its_api_path_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200")
    result = runner.invoke(app, ["rounds", "poll"])
    assert result.exit_code == 1
    assert (
        "PREFECT_API_URL http://127.0.0.1:4200 names no API path: add it, e.g. http://127.0.0.1:4200/api"
        in (" ".join(result.output.split()))
    )


@pytest.mark.parametrize("command", [["deploy"], ["serve-webhooks"], ["rounds", "poll"]])
def test_server_commands_name_a_bad_config_before_asking_for_the_server(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server either: the config is said first
    monkeypatch.setenv("HERO_ORCHESTRATION__POLL_INTERVAL_S", "-5")
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "s" * 16)
    result = runner.invoke(app, command)
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "orchestration.poll_interval_s" in message, message
    assert "PREFECT_API_URL" not in message
    monkeypatch.delenv("HERO_ORCHESTRATION__POLL_INTERVAL_S")
    monkeypatch.delenv("HERO_ORCHESTRATION__WEBHOOK_SECRET")
    no_secret = runner.invoke(app, command)  # a good config: now the server is asked for
    needs_secret = command == ["serve-webhooks"]
    expected = "set HERO_ORCHESTRATION__WEBHOOK_SECRET" if needs_secret else "no Prefect server"
    assert no_secret.exit_code == 1 and expected in " ".join(no_secret.output.split())


@pytest.mark.parametrize("command", [["promote"], ["generate", "models:/m@champion", "--prompt", "a"]])
def test_registry_commands_refuse_a_tracking_server_that_does_not_answer(
    command: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if command[0] == "generate":
        command = [*command, "--out", str(tmp_path / "out")]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HERO_TRACKING__TRACKING_URI", dead)
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"MLflowat{dead}doesnotanswer" in "".join(result.output.split())  # at once, not after retries


def test_generate_refuses_an_output_folder_it_cannot_write_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for out, reason in (
        (tmp_path / "a-file", "File exists"),
        (Path("/proc/none"), "No such file or directory"),
    ):
        result = runner.invoke(app, ["generate", "models:/none@champion", "--prompt", "a", "--out", str(out)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"--out {out}: cannot create it ({reason})" in " ".join(result.output.split())


def test_generate_checks_its_arguments_before_anything_loads(tmp_path: Path) -> None:
    # a deployment's hero-generate-samples flow run passes them unvalidated (no CLI bounds on that path)
    from hero_ml.promotion import generate_from_registry

    config = HeroConfig(tracking={"tracking_uri": "http://127.0.0.1:9"})  # nothing answers there
    for prompt, count, seed, wanted in (
        ("a", 0, 0, r"count: the images to generate, 1 to 1024, got 0"),
        ("a", 1025, 0, r"count: .* got 1025"),
        ("a", "3", 0, r"count: .* got '3'"),
        ("a", 1, -1, r"seed: a whole number 0 to \d+, got -1"),
        (" ", 1, 0, r"prompt: give the text to draw, got ' '"),
    ):
        with pytest.raises(ConfigError, match=wanted):
            generate_from_registry(config, "models:/m@champion", prompt, count, tmp_path / "out", seed)
    result = runner.invoke(app, ["generate", "models:/m@c", "--prompt", "", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "prompt: give the text to draw" in result.output
    assert not (tmp_path / "o").exists()  # the folder it made is gone again


def test_promote_refuses_a_version_that_is_not_a_number() -> None:
    for given in ("abc", "0"):
        result = runner.invoke(app, ["promote", "--version", given])
        assert result.exit_code == 2 and "Invalid value for '--version'" in " ".join(result.output.split())


def test_promote_without_a_version_says_so_and_leaves_no_bar(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"tracking_uri": uri, "registered_model": "empty"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"tracking": tracking}))
    result = runner.invoke(app, ["promote", "-c", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1  # a path with a typo: MLflow would have made an empty store there
    assert f"no MLflow database at {tmp_path / 'mlflow.db'}" in " ".join(result.output.split())
    assert not (tmp_path / "mlflow.db").exists()
    MlflowClient(uri).search_experiments()  # the store a run's tracking creates, without versions
    result = runner.invoke(app, ["promote", "-c", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "no registered model 'empty' (a finished `hero run` registers its LoRA; tracking." in said
    assert "evaluating" not in result.output and "Traceback" not in result.output


def test_an_interrupted_round_is_sampled_again_and_its_leftovers_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "runs" / "cli-test" / "rounds" / "0"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "r0000-003.png").write_bytes(b"half-written by a crashed run")
    result = runner.invoke(app, ["sample", "--config", str(small_config(tmp_path))])
    assert result.exit_code == 0, result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    rewritten = (folder / "images" / "r0000-003.png").read_bytes()
    assert len(rewritten) == manifest["files"]["images/r0000-003.png"]["bytes"]
    assert Image.open(folder / "images" / "r0000-003.png").size == (32, 32)


def test_toy_eval_names_a_lora_folder_without_weights(tmp_path: Path) -> None:
    result = runner.invoke(app, ["toy", "eval", "--task", "counting", "--n", "1", "--lora", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no LoRA weights at" in result.output and "lora/adapter_weights" in result.output


def test_toy_eval_takes_a_runs_lora_artifact_as_mlflow_keeps_it(tmp_path: Path) -> None:
    from hero_ml.diffusion.lora import add_lora, save_lora
    from hero_ml.diffusion.pipeline import load_pipeline
    from hero_ml.toy.cli import PRETRAINED

    pipe = load_pipeline(str(PRETRAINED))
    add_lora(pipe.unet, rank=4, alpha=4)
    save_lora(pipe.unet, tmp_path / "lora" / "adapter_weights")  # the artifact lora/: MLmodel beside it
    command = [
        "toy",
        "eval",
        "--task",
        "counting",
        "--n",
        "1",
        "--steps",
        "2",
        "--lora",
        str(tmp_path / "lora"),
    ]
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "success rate" in result.output, result.output


def test_a_budget_of_no_whole_number_of_rounds_is_refused_for_a_new_run(tmp_path: Path) -> None:
    config = small_config(tmp_path)  # 4 images a round
    result = runner.invoke(app, ["run", "-c", str(config), "--budget", "6"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "feedback.budget (6) is 1 round of 4 feedbacks" in message and "give 4 or 8 (--budget)" in message
    assert not (tmp_path / "data" / "runs").exists()
    (tmp_path / "uneven.yaml").write_text(config.read_text().replace("budget: 8", "budget: 10"))
    checked = runner.invoke(app, ["config", "validate", str(tmp_path / "uneven.yaml")])
    assert checked.exit_code == 1 and "give 8 or 12" in " ".join(checked.output.split())


def test_a_tracking_folder_that_cannot_be_made_is_said_before_the_run_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config(tmp_path)
    monkeypatch.setenv("HERO_TRACKING__TRACKING_URI", f"sqlite:///{config}/mlflow.db")  # under a file
    result = runner.invoke(app, ["run", "-c", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"tracking.tracking_uri sqlite:///{config}/mlflow.db: cannot create the folder {config}" in message
    assert not (tmp_path / "data" / "runs" / "cli-test").exists()  # fixed, the same command starts it


@pytest.mark.parametrize(
    ("to", "sent", "when"),
    [
        ("process group", signal.SIGINT, "running"),
        ("process", signal.SIGINT, "running"),
        ("process", signal.SIGTERM, "running"),
        # while the flows are imported (seconds): a handler importing there deadlocked or let the run go on
        ("process group", signal.SIGINT, "starting"),
    ],
    ids=["ctrl-c", "sigint", "sigterm", "ctrl-c-at-start"],
)
def test_a_signal_stops_a_run_at_once_and_says_how_to_resume(
    tmp_path: Path, to: str, sent: int, when: str
) -> None:
    config = small_config(tmp_path)
    started = tmp_path / "data" / "runs" / "cli-test" / "config.json"  # written once the flow runs
    # a session of its own: Ctrl+C in a terminal signals the whole foreground process group
    process = subprocess.Popen(
        [HERO, "run", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    header = ""
    try:
        if when == "starting":  # the header's line: printed as the handler is installed
            while "run cli-test" not in header and process.poll() is None:
                header += process.stdout.readline()
        while when == "running" and not started.exists() and process.poll() is None:
            time.sleep(0.2)
        # a terminal's Ctrl+C, or a supervisor's SIGINT or SIGTERM (kill, timeout, systemd) to the process
        (os.killpg if to == "process group" else os.kill)(process.pid, sent)
        output, _ = process.communicate(timeout=60)  # Prefect's own shutdown took minutes
        output = header + output
        try:  # nothing of the run left: its ephemeral Prefect server (a child) stopped with it
            os.killpg(process.pid, 0)
            left = subprocess.run(["pgrep", "-a", "-g", str(process.pid)], capture_output=True, text=True)
            raise AssertionError(f"processes of the run left running: {left.stdout}")
        except ProcessLookupError:
            pass
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + sent, output
    # the config file is said again: without it the run is not found; before the run was stored
    # (while the flows are imported) there is nothing to resume
    resume = f"stopped; `hero run --resume cli-test --config {config}` continues where it stopped"
    said = " ".join(output.split())
    assert (resume if when == "running" else "stopped; the same command starts it") in said
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "command",
    [
        ["toy", "eval", "--task", "counting", "--seed", "-5"],
        ["toy", "eval", "--task", "counting", "--eta", "0"],
        ["toy", "eval", "--task", "counting", "--eta", "5"],
        ["toy", "eval", "--task", "counting", "--cfg", "-100"],
        ["toy", "pretrain", "--unet-steps", "-5", "--out", "unused"],
        ["toy", "pretrain", "--dataset-size", "0", "--out", "unused"],
        ["generate", "models:/m@champion", "--prompt", "a", "--out", "o", "--seed", str(2**63)],
        ["model", "build", "tiny", "out", "--seed", "-1"],
        ["serve-webhooks", "--port", "99999"],
    ],
)
def test_out_of_range_options_are_refused_before_any_work(command: list[str]) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "Invalid value for" in result.output, result.output


def test_serve_webhooks_says_an_address_it_cannot_listen_on_before_asking_for_prefect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "s" * 16)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # never reached: the address is said first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for options, says in (
            (["--host", "no host here"], "--host 'no host here': not an address or a known host name"),
            (["--host", "192.0.2.1"], "--host '192.0.2.1': not an address of this machine"),  # TEST-NET-1
            (["--port", str(port)], f"--port {port}: already in use on 127.0.0.1"),
        ):
            result = runner.invoke(app, ["serve-webhooks", *options])
            said = " ".join(result.output.split())
            assert result.exit_code == 1 and says in said and "PREFECT_API_URL" not in said, said
    free = runner.invoke(app, ["serve-webhooks", "--port", str(port)])  # bound, then the next check
    assert free.exit_code == 1 and "no Prefect server: set PREFECT_API_URL" in " ".join(free.output.split())


def test_labelstudio_status_of_a_run_without_rounds_asks_label_studio_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # finding the run's project would create it: a mistyped run id must not leave a project behind
    with socket.socket() as probe:  # nothing listens here: any request would fail
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HERO_LABEL_STUDIO__URL", f"http://127.0.0.1:{probe.getsockname()[1]}")
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")
    monkeypatch.setenv("HERO_STORAGE__LOCAL_ROOT", str(tmp_path))
    result = runner.invoke(app, ["labelstudio", "status", "typo"])
    assert result.exit_code == 1
    assert "run 'typo' has no committed round" in result.output and "cannot reach" not in result.output


def test_a_run_with_label_studio_unreachable_fails_before_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HERO_LABEL_STUDIO__URL", f"http://127.0.0.1:{probe.getsockname()[1]}")
    monkeypatch.setenv("HERO_LABEL_STUDIO__ENABLED", "true")
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")
    result = runner.invoke(app, ["run", "-c", str(small_config(tmp_path))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot reach Label Studio at" in result.output
    assert "start it (infra/label-studio.sh start) or set HERO_LABEL_STUDIO__URL" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "data" / "runs" / "cli-test").exists()  # nothing sampled, nothing stored


def test_labelstudio_setup_refuses_a_webhook_url_that_is_not_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")  # no server: the option is checked first
    result = runner.invoke(app, ["labelstudio", "setup", "--run-id", "r", "--webhook-url", "notaurl"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "--webhook-url 'notaurl' is not an http(s) URL (Input should be a valid URL, relative URL"
        in " ".join(result.output.split())
    )
    bad_port = (
        "http://hook:hunter2@hooks.example:99999/in"  # refused for its port, shown without its password
    )
    result = runner.invoke(app, ["labelstudio", "setup", "--run-id", "r", "--webhook-url", bad_port])
    assert result.exit_code == 1 and "hunter2" not in result.output
    assert (
        "'http://…@hooks.example:99999/in' is not an http(s) URL (Input should be a valid URL, invalid port"
        in (" ".join(result.output.split()))
    )
    # as the config's: no credentials in it (it is published), and the shared secret set
    for url, expected in (
        ("http://hooks.example/in?token=hunter2", "orchestration.webhook_url: holds credentials"),
        ("http://hooks.example/in", "webhook_url is set but webhook_secret is not"),
    ):
        result = runner.invoke(app, ["labelstudio", "setup", "--run-id", "r", "--webhook-url", url])
        assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output
        assert "hunter2" not in result.output


@pytest.mark.parametrize("cron", ["not a cron", "61 2 * * 1", "0 2 * *"])
def test_deploy_refuses_a_training_cron_before_asking_the_server(
    cron: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # checked before the server is looked for
    result = runner.invoke(app, ["deploy", "--training-cron", cron])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"--training-cron {cron!r}: Invalid cron string" in message and "'0 2 * * 1'" in message


def test_deploy_refuses_a_source_without_flows_before_asking_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["deploy", "--source", str(tmp_path / "app")])  # a worker image's path
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--source {tmp_path / 'app'}: no flows/ folder there" in " ".join(result.output.split())
    for remote in ("https://github.com/org/hero.git", "git@github.com:org/hero.git"):  # Prefect fetches it
        passed = runner.invoke(app, ["deploy", "--source", remote])  # on to the server, which is not there
        assert "no flows/ folder" not in passed.output


def test_storage_ls_of_a_local_root_that_does_not_exist_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERO_STORAGE__LOCAL_ROOT", str(tmp_path / "typo"))
    result = runner.invoke(app, ["storage", "ls"])
    assert result.exit_code == 0
    assert f"{tmp_path / 'typo'} does not exist: is storage.local_root" in " ".join(result.output.split())
    monkeypatch.setenv("HERO_STORAGE__LOCAL_ROOT", str(tmp_path))  # there, without runs: no warning
    assert "does not exist" not in runner.invoke(app, ["storage", "ls"]).output


def test_an_environment_variable_with_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_SAMPLING__ETA", "abc")
    monkeypatch.setenv("hero_sampling__num_steps", "0")  # the case is ignored, as pydantic-settings does
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 1
    problems = dict(p.split(":", 1) for p in " ".join(result.output.split()).split(" sampling.")[1:])
    assert problems["eta"].endswith("(got 'abc') [set by HERO_SAMPLING__ETA]")
    assert problems["num_steps"].endswith("(got '0') [set by hero_sampling__num_steps]")


def test_a_run_error_is_printed_once_and_a_wrong_prompt_is_refused_before_prefect_starts(
    tmp_path: Path,
) -> None:
    missing = small_config(tmp_path, source=str(tmp_path / "no-model"))
    result = subprocess.run([HERO, "run", "-c", str(missing)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    output = " ".join(result.stderr.split())
    assert output.count(f"model.source '{tmp_path / 'no-model'}': no such folder") == 1, (
        output
    )  # not Prefect's too
    assert "Traceback" not in output
    assert not (
        tmp_path / "data" / "runs" / "cli-test" / "config.json"
    ).exists()  # no run to resume: fix, rerun
    wrong_prompt = small_config(tmp_path)
    data = yaml.safe_load(wrong_prompt.read_text())
    data["sampling"]["prompt"] = "a purple elephant"
    data["storage"]["local_root"] = str(tmp_path / "second")
    wrong_prompt.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [HERO, "run", "-c", str(wrong_prompt)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "sampling.prompt 'a purple elephant' is not a prompt of task" in " ".join(result.stderr.split())
    assert not (tmp_path / "second").exists()  # refused before the ephemeral server's folder is made
    data["simulation"] = {**data.get("simulation", {}), "task": None}  # no toy task, nobody to label
    wrong_prompt.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [HERO, "run", "-c", str(wrong_prompt)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "simulation.task is null and label_studio.enabled is false" in " ".join(result.stderr.split())
    assert not (tmp_path / "second").exists()


def test_toy_pretrain_and_card_refuse_folders_they_cannot_use_before_any_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["toy", "pretrain"])  # no default: it would replace the shipped model
    assert result.exit_code == 2 and "Missing option '--out'" in result.output
    result = runner.invoke(app, ["toy", "pretrain", "--out", "/proc/hero-model"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--out /proc/hero-model: cannot create it (No such file or directory)" in result.output
    (tmp_path / "notes.txt").write_text("mine")  # a folder in use: not written over unless asked
    result = runner.invoke(app, ["toy", "pretrain", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "VAE" not in result.output
    said = " ".join(result.output.split())
    assert f"--out {tmp_path} already holds notes.txt; give a new or empty folder, or --overwrite" in said
    (tmp_path / "notes.txt").unlink()
    result = runner.invoke(app, ["toy", "card", "--model", str(tmp_path)])
    assert result.exit_code == 1 and "measuring" not in result.output
    assert f"--model {tmp_path}: no training.json" in " ".join(result.output.split())
    log = json.loads((PRETRAINED / "training.json").read_text())
    del log["vae"]["final_l1"]
    log["config"]["unet_steps"] = "many"
    (tmp_path / "training.json").write_text(json.dumps(log))  # an edited log: said before measuring
    result = runner.invoke(app, ["toy", "card", "--model", str(tmp_path)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "measuring" not in result.output and "Traceback" not in said
    assert "training.json is not a pretraining run's log (edited or damaged)" in said, said
    assert "vae.final_l1: Field required" in said
    assert "config.unet_steps: Input should be a valid integer" in said
    (tmp_path / "training.json").write_text("{")
    result = runner.invoke(app, ["toy", "card", "--model", str(tmp_path)])
    assert result.exit_code == 1 and "Invalid JSON" in " ".join(result.output.split())


def test_the_run_header_prints_the_derived_quantities_and_d3pos_as_a_bound() -> None:
    config = load_config().model_copy(update={"run_id": "r"})
    assert run_header(config) == (
        "[bold]run r[/]: method hero, task counting ('three purple squares'), 8 rounds x 64 feedbacks, "
        "32 optimiser steps a round"
    )
    # D3PO trains a round's preference pairs, max(#good, #bad) of them: at most one per image
    assert run_header(config.model_copy(update={"method": "d3po"})).endswith(
        "8 rounds x 64 feedbacks, up to 32 optimiser steps a round"
    )
    one = config.model_copy(update={"feedback": config.feedback.model_copy(update={"budget": 64})})
    assert ", 1 round x 64 feedbacks, 32 optimiser steps a round" in run_header(one)
    two = with_overrides(config, {"model": {"processes": 2}})
    assert run_header(two).endswith("32 optimiser steps a round, on 2 processes")


def test_the_version_is_printed_and_the_module_runs_as_the_command() -> None:
    from importlib.metadata import version

    assert runner.invoke(app, ["--version"]).output == f"hero {version('hero-pipeline')}\n"
    as_module = subprocess.run(
        [sys.executable, "-m", "hero_ml.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert as_module.returncode == 0 and as_module.stdout == f"hero {version('hero-pipeline')}\n"


def test_a_resume_says_which_settings_given_now_it_does_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the stored settings win on a resume: a budget raised in the environment would go unused unseen
    from hero_ml.cli import _ignored_on_resume
    from hero_ml.config import load_config

    stored = load_config(small_config(tmp_path)).to_public_dict()
    stored["sampling"]["prompt"] = "four red circles"  # the run's task, chosen at its start by --task
    monkeypatch.setenv("HERO_FEEDBACK__BUDGET", "128")
    monkeypatch.setenv("HERO_SAMPLING__ETA", "1.0")  # given, but as the run has it
    monkeypatch.setenv("HERO_ORCHESTRATION__POLL_INTERVAL_S", "45")  # a service setting: it is used
    monkeypatch.setenv("HERO_RUN_ID", "another")  # --resume names the run
    assert _ignored_on_resume(stored, load_config(small_config(tmp_path))) == ["feedback.budget"]


def test_resuming_a_run_that_is_not_there_names_the_folder_looked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hero-data/ is the current folder's: run from another folder, the message must say which one
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--resume", "demo-1"])
    said = "".join(result.output.split())  # rich wraps a long path anywhere, even inside a word
    assert result.exit_code == 1, result.output
    assert f"norun'demo-1'in{tmp_path / 'hero-data' / 'runs'}:pointthestoragesettingsat" in said


def test_a_check_across_settings_names_where_each_setting_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = runner.invoke(app, ["run", "--budget", "10"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "feedback.budget (10) is smaller than one round" in said
    assert said.endswith("[feedback.budget set by --budget]")
    monkeypatch.setenv("HERO_SAMPLING__IMAGES_PER_ROUND", "1024")
    shown = " ".join(runner.invoke(app, ["config", "show"]).output.split())
    assert "feedback.budget (512) is smaller than one round" in shown
    assert shown.endswith("[sampling.images_per_round set by HERO_SAMPLING__IMAGES_PER_ROUND]")
