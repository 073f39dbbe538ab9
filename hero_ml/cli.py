"""The `hero` command line."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from hero_ml.adapters.storage import open_store
from hero_ml.cli_support import (
    ConfigOption,
    console,
    err_console,
    fail,
    load,
    quiet_model_loading,
    reflow_help,
    writable_folder,
)
from hero_ml.config import MAX_GENERATED, SEED_MAX, ConfigError, HeroConfig, model_uri_problem
from hero_ml.errors import HeroError
from hero_ml.labelling_cli import labelstudio_app
from hero_ml.orchestration_cli import deploy, rounds_app, serve_webhooks
from hero_ml.registry_cli import registry_app
from hero_ml.toy.cli import toy_app

if TYPE_CHECKING:
    from hero_ml.training import TrainingSummary

# transformers warns at import about optional image backends the pipeline never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    help="HERO: fine-tune text-to-image diffusion models from online human feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check configuration files.", no_args_is_help=True)
model_app = typer.Typer(help="Build Stable Diffusion pipelines.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(toy_app, name="toy")
app.add_typer(labelstudio_app, name="labelstudio")
storage_app = typer.Typer(help="Inspect and verify a run's stored objects.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")
app.add_typer(rounds_app, name="rounds")
app.add_typer(registry_app, name="registry")
app.command("deploy")(deploy)
app.command("serve-webhooks")(serve_webhooks)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        console.print(f"hero {version('hero-pipeline')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the installed version and exit."
        ),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    # botocore's debug log carries each request's signature with the S3 access key id: never shown
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:  # HTTP calls to the ephemeral Prefect API, MLflow's schema checks: not news
        for name in ("httpx", "mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own level on import
        # a LoRA's logged pip requirements drop torch's "+cpu": a warning at every logged model, not news
        logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_hero_errors_without_traceback)


def _hero_errors_without_traceback(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task run with its traceback, and then the failed flow run: a HeroError's
    message already says what to fix and the command prints it (the one flow run in process is `hero
    run`'s), so a flow run's record is dropped and a task run's (a retry's reason) keeps its line
    without the traceback. --verbose keeps both whole."""
    if record.exc_info and isinstance(record.exc_info[1], HeroError):
        if record.name == "prefect.flow_runs":
            return False
        record.exc_info = None
    return True


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    comments: Annotated[bool, typer.Option(help="Precede every field with its description.")] = True,
) -> None:
    """Print the resolved configuration (defaults <- file <- environment) as YAML, secrets left out.

    The output is itself a valid config file: `hero config show > hero.yaml` starts a new one.
    """
    resolved = load(config)
    if comments:
        text = resolved.to_commented_yaml()
    else:
        text = yaml.safe_dump(resolved.to_file_dict(), sort_keys=False)
    typer.echo(text, nl=False)  # plain text, not rich: rich would wrap lines and break the YAML
    typer.echo(f"# derived: {json.dumps(resolved.derived())}")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="The YAML config file to check.", exists=True, dir_okay=False)],
) -> None:
    """Check a config file (with the current environment's overrides); exit 1 with every problem."""
    resolved = load(file)
    if (problem := resolved.budget_problem()) is not None:  # a new run would be refused
        raise fail(f"{file}: {problem}")
    derived = ", ".join(f"{k}={v}" for k, v in resolved.derived().items())
    console.print(f"[green]ok[/] {escape(str(file))}: {derived}", highlight=False)


@model_app.command("build")
def model_build(
    arch: Annotated[str, typer.Argument(help="Architecture: 'tiny' or 'sd15'.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline to.", file_okay=False)],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.", min=0, max=SEED_MAX)] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Write into OUT although it holds files (a model there is replaced).")
    ] = False,
) -> None:
    """Write an SD-shaped pipeline with random weights as a standard diffusers folder."""
    from hero_ml.diffusion.architectures import ARCHITECTURES
    from hero_ml.diffusion.pipeline import build_random_pipeline

    if arch not in ARCHITECTURES:
        raise fail(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    writable_folder(out, "OUT", overwrite)  # before the build, which takes minutes for sd15
    quiet_model_loading()  # transformers' "Writing model shards" bar under our own
    with console.status(f"building {arch} with random weights"):
        build_random_pipeline(arch, seed=seed).save_pretrained(out)
    console.print(f"[green]wrote[/] {escape(str(out))} (random weights, seed {seed})", highlight=False)


@app.command("sample")
def sample(config: ConfigOption = None) -> None:
    """Sample one round with the configured model; write images, grid, trajectory and manifest.

    On the embedded defaults the model is the committed toy SD (the toy world's shapes); with
    model.source random:<arch> the images are noise, and the manifest says so. This shows the sampler
    and the storage layout end to end, without learning.
    """
    from hero_ml.sample_round import sample_round

    resolved = load(config)
    quiet_model_loading()
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    with progress:
        task = progress.add_task(f"loading {resolved.model.source}", total=None)

        def model_loaded() -> None:
            progress.update(
                task, description="denoising steps", total=resolved.sampling.denoising_steps_per_round()
            )

        try:
            result = sample_round(
                resolved, on_model_loaded=model_loaded, on_step=lambda: progress.advance(task)
            )
        except HeroError as err:  # a missing model or device, a committed round, a run written elsewhere
            progress.remove_task(task)  # no bar left standing under the error
            raise fail(str(err)) from None

    manifest = result.manifest
    console.print(
        f"[green]round {manifest['round']} committed[/] at {escape(result.folder)}: "
        f"{manifest['images']} images in {manifest['sampling_seconds']} s",
        highlight=False,
    )
    console.print(f"  grid: {result.folder}/grid.png", highlight=False, markup=False)
    console.print(f"  note: {manifest['note']}", highlight=False, markup=False)


def run_header(config: HeroConfig) -> str:
    """`hero run`'s first line: the run, its method and task, and its derived quantities."""
    derived = config.derived()
    task = config.simulation.task
    # D3PO's units are a round's preference pairs, max(#good, #bad) of them: fewer than its images
    at_most = "up to " if config.method == "d3po" else ""
    return (
        f"[bold]run {config.run_id}[/]: method {config.method}, "
        f"{f'task {escape(task)}' if task else 'no toy task'} ({escape(repr(config.sampling.prompt))}), "
        f"{_count(derived['rounds'], 'round')} x {_count(derived['feedbacks_per_round'], 'feedback')}, "
        f"{at_most}{_count(derived['ddpo_optimizer_steps_per_round'], 'optimiser step')} a round"
        + (f", on {config.model.processes} processes" if config.model.processes > 1 else "")
    )


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


# The settings `hero run`'s flags override, and the flag that gives each: a refused value names it.
RUN_FLAGS = {
    "run_id": "--run-id",
    "method": "--method",
    "feedback.budget": "--budget",
    "simulation.task": "--task",
    "sampling.prompt": "--task",
}


@app.command("run")
def run(
    config: ConfigOption = None,
    task: Annotated[
        str | None, typer.Option(help="Toy task the simulated annotators judge; sets its prompt too.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="hero | hero-noguide | ddpo-binary | d3po (default: the config's).")
    ] = None,
    budget: Annotated[int | None, typer.Option(help="Feedbacks to spend (default: the config's).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Name of a new run (default: the config's).")] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue the stored run RUN_ID from its latest checkpoint.")
    ] = None,
) -> None:
    """Run a whole HERO training, register its LoRA, and print where to look.

    By default: toy model, simulated annotators, local storage, MLflow on a local SQLite file and a
    Prefect flow in ephemeral mode (no server): nothing to set up. storage.backend=s3 and an MLflow
    server URI (tracking.tracking_uri) run the same against production services. With
    label_studio.enabled, rounds go to Label Studio and this process waits for the annotators (a
    deployment suspends instead: see docs/OPERATIONS.md). Each round is committed as it finishes; a
    stopped run continues with --resume RUN_ID.

    Examples: hero run --task counting --budget 256 --run-id counting-1; hero run --resume counting-1
    """
    from hero_ml.config import with_overrides
    from hero_ml.training import multi_process_launch

    if (problem := multi_process_launch()) is not None:  # before two processes store the run
        raise fail(problem)
    resolved = loaded = load(config)
    if resume is not None:
        if task is not None or method is not None or budget is not None or run_id is not None:
            raise fail(
                "--resume continues a run with its own settings: drop --task/--method/--budget/--run-id"
            )
        try:
            resolved = with_overrides(resolved, {"run_id": resume}, given_by={"run_id": "--resume"})
        except ConfigError as err:
            raise fail(str(err)) from None
    else:
        overrides: dict = {}
        if run_id is not None:  # "" too: refused by the config's check, not taken for "not given"
            overrides["run_id"] = run_id
        if method is not None:
            overrides["method"] = method
        if budget is not None:
            overrides["feedback"] = {"budget": budget}
        if task is not None:
            from hero_ml.toy.task import TaskError, load_task

            try:
                spec = load_task(task)
            except TaskError as err:
                raise fail(str(err)) from None
            overrides["simulation"] = {"task": task}
            overrides["sampling"] = {"prompt": spec.prompts[0]}
        try:
            resolved = with_overrides(resolved, overrides, given_by=RUN_FLAGS)
        except ConfigError as err:
            raise fail(str(err)) from None
    from hero_ml.run_store import RunStore

    store = open_store(resolved.storage)
    runs = RunStore(store, resolved.run_id)
    try:
        stored = runs.load_config()
    except HeroError as err:  # a damaged config.json, a store that cannot be read
        raise fail(str(err)) from None
    if resume is not None:
        if stored is None:
            raise fail(
                f"no run {resume!r} in {store.where('runs')}: point the storage settings at the store it "
                "was started in (a relative storage.local_root is the current folder's), or start it with "
                f"`hero run --run-id {resume}`"
            )
        try:
            resolved = _stored_run_config(store.where(f"runs/{resume}/config.json"), stored, resolved, resume)
        except ConfigError as err:
            raise fail(str(err)) from None
        if ignored := _ignored_on_resume(stored, loaded):
            err_console.print(
                f"note: run {resume!r} continues with its own settings; {', '.join(ignored)} as the config "
                "file or environment give it now is not used (a new run takes it: --run-id NAME)",
                markup=False,
                highlight=False,
            )
    elif stored is not None:
        raise fail(
            f"run {resolved.run_id!r} already exists in {store.where('runs')}: continue "
            f"it with `hero run --resume {resolved.run_id}` or start a new one with --run-id NAME"
        )
    elif (problem := resolved.budget_problem()) is not None:  # said now, not after the flows' start
        raise fail(problem + (" (--budget)" if budget is not None else ""))
    # the command that continues it, as this one found the run (its config file said again)
    given = f" --config {shlex.quote(str(config))}" if config is not None else ""
    _run_embedded(resolved, given, resuming=resume is not None)


def _ignored_on_resume(stored: dict, given: HeroConfig) -> list[str]:
    """The learning settings the config file or environment set (not defaults) to other values than
    the run's stored ones: a resume keeps the stored ones, and says so. given: the config as loaded
    (with_overrides marks every field set)."""
    from pydantic import BaseModel

    from hero_ml.training import changed_settings

    set_now = set()
    for section in given.model_fields_set:
        value = getattr(given, section)
        if isinstance(value, BaseModel):
            set_now |= {f"{section}.{name}" for name in value.model_fields_set}
        else:
            set_now.add(section)
    set_now.discard("run_id")  # --resume names the run
    return [setting for setting in changed_settings(stored, given) if setting in set_now]


def _stored_run_config(where: str, stored: dict, current: HeroConfig, run_id: str) -> HeroConfig:
    """Run `run_id`'s stored config.json (found at `where`) as the config it resumes with; a
    ConfigError naming the file when it no longer validates or names another run (edited or copied)."""
    from hero_ml.config import restore_config

    try:
        restored = restore_config(stored, current)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if restored.run_id != run_id:  # it would start another run
        raise ConfigError(
            f"{where} names run {restored.run_id!r}, not {run_id!r}: restore the run's own config.json"
        )
    return restored


def _run_embedded(config: HeroConfig, config_hint: str, resuming: bool) -> None:
    """The training flow on embedded defaults, with progress and a closing summary; config_hint: the
    config file's option (" --config FILE", or ""), for the commands it says: the one that continues
    the run when it is stopped (once it is stored, or when resuming), the one that promotes its LoRA."""
    from rich.table import Table

    resume_hint = f"hero run --resume {config.run_id}{config_hint}"

    from hero_ml.training import run_task

    try:
        run_task(config)  # a prompt not of the task fails now, not after the ephemeral server's start
    except HeroError as err:
        raise fail(str(err)) from None

    if config.label_studio.enabled:  # a wrong URL or key fails now, not minutes after round 0 is sampled
        from hero_ml.labelling import LabelStudioError, open_projects

        try:
            open_projects(config).check()
        except LabelStudioError as err:
            raise fail(str(err)) from None

    quiet_model_loading()

    from hero_ml.adapters.tracking import TrackingError, sqlite_folder

    try:
        sqlite_folder(config.tracking.tracking_uri)  # before the run is stored: a run it stops never began
    except TrackingError as err:
        raise fail(str(err)) from None
    prefect_home = (config.storage.local_root / "prefect").resolve()
    try:
        prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level itself
    except OSError as err:
        root = config.storage.local_root
        raise fail(f"storage.local_root {root}: cannot create folders there ({err})") from None
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the client's side of the same (and its first-run notice)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # our own lines say what a round did
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    stop_server: list[Callable[[], None]] = []  # set once imported: a signal handler must never import
    began = [resuming]  # whether the run is (being) stored: what the hint says
    stopping: list[int] = []

    def stop_at_once(signum: int, frame: object) -> None:
        # A run is crash-safe at every point (docs/RELIABILITY.md), so Ctrl+C ends the process here:
        # left to Prefect, the flow would spend minutes reporting its cancellation to the ephemeral
        # API server, which the same Ctrl+C is shutting down, and print hundreds of lines of tracebacks.
        # A SIGTERM (kill, timeout, a supervisor) reaches this after the flow engine's own handler,
        # which marks the flow run crashed and then hands the signal on. Installed before the flows'
        # imports (seconds); the server is stopped first, and whatever fails or hangs after (rich's
        # clean-up waits on locks the interrupted code may hold), the process ends: a second signal
        # ends it at once.
        if stopping:
            os._exit(128 + signum)
        stopping.append(signum)
        try:
            for stop in stop_server:
                stop()  # a signal to this process alone would leave the ephemeral server running
            for task in progress.task_ids:  # no bar left standing above the last line
                progress.remove_task(task)
            progress.stop()  # the terminal's cursor back
        finally:
            hint = f"`{resume_hint}` continues where it stopped" if began[0] else "the same command starts it"
            os.write(2, f"stopped; {hint}\n".encode())
            os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop_at_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    console.print(run_header(config), highlight=False)  # from here on, Ctrl+C stops the run at once
    try:
        if not os.environ.get("PREFECT_API_URL"):  # an ephemeral server (seconds to import), not a real one
            from flows import ephemeral_server_stopper

            stop_server.append(ephemeral_server_stopper())
        # the CLI hands off to flows/; the library never imports Prefect
        from flows.training import hero_training

        summary = _train_with_progress(config, hero_training, progress, began)
    except (HeroError, FileNotFoundError) as err:
        from hero_ml.run_processes import ProcessesError

        if isinstance(err, ProcessesError) and began[0]:
            raise fail(f"{err}: `{resume_hint}`") from None
        raise fail(str(err)) from None
    finally:
        for sig, handler in previous.items():  # the run is over: a signal means what it meant before
            signal.signal(sig, handler)

    table = Table("", "value", title=f"run {config.run_id}")
    table.add_row("method", config.method)
    table.add_row("rounds (this call)", f"{summary.rounds} ({len(summary.rounds_now)})")
    table.add_row("feedbacks spent", str(summary.feedbacks))
    if summary.before is not None and summary.after is not None:
        table.add_row(
            f"success rate before ({summary.before.images} images)", f"{summary.before.success_rate:.3f}"
        )
        table.add_row(
            f"success rate after ({summary.after.images} images)", f"{summary.after.success_rate:.3f}"
        )
    if summary.after_guided is not None:
        table.add_row(
            f"success rate after, from the run's noise pool ({summary.after_guided.images} images; "
            "hero generate --guided)",
            f"{summary.after_guided.success_rate:.3f}",
        )
    console.print(table)
    console.print(
        f"run objects: {open_store(config.storage).where(f'runs/{config.run_id}')}",
        highlight=False,
        markup=False,
    )
    if summary.registered_version is not None:
        console.print(
            f"registered {config.tracking.registered_model} version {summary.registered_version}: "
            f"compare it with the champion by `hero promote --version {summary.registered_version}"
            f"{config_hint}`",
            highlight=False,
            markup=False,
        )
    uri = config.tracking.tracking_uri
    where = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    console.print(f"MLflow: {where}", highlight=False, markup=False)


def _train_with_progress(
    config: HeroConfig, hero_training: Callable[..., TrainingSummary], progress: Progress, began: list[bool]
) -> TrainingSummary:
    """The training flow with a bar of its own for each phase (denoising, evaluating, learning: its
    count, its time) and a line for each round; no bar is left standing under an error or the summary.
    began[0] turns True when the model is loaded (TrainingRun's LOADING phase done): the run is being
    stored, and a stop from then on wants --resume."""
    from hero_ml.engine import RoundStats
    from hero_ml.training import LOADING

    bar: list[TaskID] = []
    # from the round's first denoising step; for a round read back from storage (sampled before a
    # stop), from the end of the loading or evaluation before it
    round_started = [time.perf_counter()]

    def on_progress(phase: str, done: int, total: int) -> None:
        began[0] = began[0] or phase != LOADING or done == total
        before_rounds = phase == LOADING or phase.startswith("evaluating")
        if (phase == "denoising" and done == 1) or (before_rounds and done == total):
            round_started[0] = time.perf_counter()
        if phase == "denoising":  # its count is UNet calls: every step of every sub-batch
            steps, sub_batches = config.sampling.num_steps, total // config.sampling.num_steps
            processes = config.model.processes
            each = f", on each of {processes} processes" if processes > 1 else ""
            batches = f"{sub_batches} sub-batch{'es' if sub_batches > 1 else ''}"
            phase = f"denoising ({batches} x {steps} steps{each})"
        if progress.tasks[0].description != phase:
            progress.remove_task(bar[0])
            bar[0] = progress.add_task(phase, total=total)
            if not err_console.is_terminal:  # piped or logged: no live bars, a line per phase
                err_console.print(f"{phase}: {total}", highlight=False, markup=False)
        progress.update(bar[0], completed=done)

    def on_round(stats: RoundStats) -> None:
        now = time.perf_counter()
        seconds, round_started[0] = now - round_started[0], now
        reward = (
            ""
            if stats.reward_good_mean is None
            else f", reward good {stats.reward_good_mean:.3f} / bad {stats.reward_bad_mean or 0:.3f}"
        )
        moved = "" if stats.lora_step_norm is None else f" (LoRA moved {stats.lora_step_norm:.3g})"
        if stats.skipped_steps:
            moved += f", {stats.skipped_steps} skipped (gradient not finite)"
        if stats.non_finite_images:
            moved += f", {stats.non_finite_images} images' latents not finite (float16 overflow?)"
        progress.console.print(
            f"round {stats.round} ({seconds:.1f} s): {stats.good} good / {stats.bad} bad{reward}, "
            f"{stats.optimizer_steps} optimiser steps{moved}, {stats.feedbacks} feedbacks spent",
            highlight=False,
        )

    def on_wait(round_index: int, reason: str) -> None:
        progress.console.print(
            f"round {round_index} is in Label Studio: {reason}; checking every "
            f"{config.orchestration.poll_interval_s} s (Ctrl+C stops; --resume continues)",
            highlight=False,
            markup=False,  # the reason may quote annotators' or Label Studio's text
        )

    with progress:
        bar.append(progress.add_task("starting", total=None))
        try:
            return hero_training(config=config, on_progress=on_progress, on_round=on_round, on_wait=on_wait)
        finally:
            progress.remove_task(bar[0])


RunIdArgument = Annotated[str | None, typer.Argument(help="The run (default: list the stored runs).")]


def _check_run_id(config: HeroConfig, run_id: str) -> None:
    """A run id from the command line, checked as the config's run_id is (it becomes storage keys)."""
    from hero_ml.config import with_overrides

    try:
        with_overrides(config, {"run_id": run_id}, given_by={"run_id": "RUN_ID"})
    except ConfigError as err:
        raise fail(str(err)) from None


@storage_app.command("ls")
def storage_ls(run_id: RunIdArgument = None, config: ConfigOption = None) -> None:
    """List the stored runs, or one run's rounds (committed or not, images, feedback, checkpoint) and
    the process that writes it now."""
    from rich.table import Table

    from hero_ml.run_lease import RunLease
    from hero_ml.run_store import RunStore

    resolved = load(config)
    if run_id is not None:
        _check_run_id(resolved, run_id)
    store = open_store(resolved.storage)
    try:
        if run_id is None:
            runs = sorted({key.split("/")[1] for key in store.list("runs")})
            console.print(f"{len(runs)} runs in {store.where('runs')}", highlight=False, markup=False)
            local_root = resolved.storage.local_root
            if resolved.storage.backend == "local" and not local_root.exists():  # a typo, or elsewhere
                console.print(
                    f"[yellow]{escape(str(local_root))} does not exist[/]: is storage.local_root "
                    "(HERO_STORAGE__LOCAL_ROOT) the folder your runs write to?"
                )
            for name in runs:
                console.print(f"  {name}", highlight=False)
            return
        runs_store = RunStore(store, run_id)
        rounds = runs_store.list_rounds()
        latest = runs_store.latest_checkpoint()
        writer = RunLease(store, run_id).holder()
        if not rounds and runs_store.load_config() is None:
            raise fail(f"no run {run_id!r} in {store.where('runs')}")
    except (HeroError, ValueError) as err:
        raise fail(str(err)) from None
    table = Table("round", "committed", "images", "MB", "good", "bad", "checkpoint", title=f"run {run_id}")
    for row in rounds:
        table.add_row(
            str(row.round),
            "yes" if row.committed else "[yellow]no (interrupted)[/]",
            str(row.images),
            f"{row.bytes / 1e6:.2f}",
            "—" if row.good is None else str(row.good),
            "—" if row.bad is None else str(row.bad),
            "yes" if row.checkpoint else "—",
        )
    console.print(table)
    console.print(
        f"latest checkpoint: {'none yet' if latest is None else f'round {latest}'}; objects in "
        f"{store.where(runs_store.prefix)}",
        highlight=False,
        markup=False,
    )
    console.print(
        f"being written: {writer}" if writer else "no process writes it now", highlight=False, markup=False
    )


@storage_app.command("verify")
def storage_verify(
    run_id: Annotated[str, typer.Argument(help="The run to verify.")], config: ConfigOption = None
) -> None:
    """Check every committed object of a run against its recorded size and sha256 (exit 1 on a problem)."""
    from hero_ml.run_store import RunStore

    resolved = load(config)
    _check_run_id(resolved, run_id)
    store = open_store(resolved.storage)
    runs_store = RunStore(store, run_id)
    try:
        stored = runs_store.load_config()
        if stored is None:
            raise fail(f"no run {run_id!r} in {store.where('runs')}")
        report = runs_store.verify()
    except (HeroError, ValueError) as err:  # a store that cannot be read, a damaged config.json
        raise fail(str(err)) from None
    try:  # what a resume would refuse: a field this release lacks, another run's config
        _stored_run_config(store.where(f"{runs_store.prefix}/config.json"), stored, resolved, run_id)
    except ConfigError as err:
        report.problems.append(str(err))
    for line in report.incomplete:
        console.print(f"[yellow]uncommitted[/] {escape(line)}", highlight=False)
    for line in report.problems:
        err_console.print(f"[bold red]corrupt[/] {escape(line)}", highlight=False)
    verdict = "[green]ok[/]" if report.ok else f"[bold red]{_count(len(report.problems), 'problem')}[/]"
    console.print(
        f"{verdict}: {report.objects} objects ({report.bytes / 1e6:.2f} MB) checked against their "
        f"recorded size and sha256; {len(report.incomplete)} uncommitted",
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("promote")
def promote(
    version: Annotated[
        int | None,
        typer.Option(
            min=1, help="Registry version to evaluate (default: the latest; `hero registry ls` lists them)."
        ),
    ] = None,
    allow_base_change: Annotated[
        bool,
        typer.Option(
            help="Judge a version trained on another base model than the champion (each on its own "
            "base); a win changes the model the alias serves."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Evaluate a LoRA version against the champion and move the champion alias only on a win.

    Both models generate promotion.eval_images images from the same fixed noises, judged by the
    version's toy task; with no champion yet the challenger must beat the base model. The decision
    and its figures are recorded as tags of the version. A version of another toy task, or of no task,
    is refused: point the alias by hand (`hero registry alias VERSION`), which is also how a promotion
    is rolled back.

    Example: hero promote --version 4 -c production.yaml
    """
    from hero_ml.promotion import promote_version

    resolved = load(config)
    quiet_model_loading()
    total = 2 * resolved.promotion.eval_images
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("evaluating challenger and champion (images)", total=total)
        try:
            decision = promote_version(
                resolved,
                None if version is None else str(version),
                on_images=lambda n: progress.advance(bar, n),
                allow_base_change=allow_base_change,
            )
        except HeroError as err:  # the registry's, a base model that cannot load
            progress.remove_task(bar)  # no bar left standing under the error
            raise fail(str(err)) from None
    alias = resolved.tracking.champion_alias
    against = "the base model" if decision.incumbent == "base" else f"version {decision.incumbent}"
    console.print(
        f"version {decision.challenger}: {decision.challenger_rate:.3f} vs {against}: "
        f"{decision.incumbent_rate:.3f} (gain {decision.gain:+.3f}, margin {decision.margin:.3f}, "
        f"{decision.images} images each)",
        highlight=False,
    )
    if decision.promoted:
        console.print(
            f"[green]promoted[/]: @{escape(alias)} -> version {decision.challenger}", highlight=False
        )
    else:
        console.print(f"[yellow]not promoted[/]: @{escape(alias)} stays on {against}", highlight=False)


@app.command("generate")
def generate(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    prompt: Annotated[str, typer.Option(help="What to draw.")],
    out: Annotated[Path, typer.Option(help="Folder the PNGs and grid.png are written to.")],
    count: Annotated[int, typer.Option(min=1, max=MAX_GENERATED, help="Images to generate.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the images' noises.", min=0, max=SEED_MAX)] = 0,
    guided: Annotated[
        bool,
        typer.Option(
            help="Start from the noises the run's annotators liked last (its noise pool, as HERO samples "
            "its rounds) instead of plain N(0, I): near what the LoRA was trained on; best with the "
            "run's own prompt."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Write into --out although it holds files (an earlier generate's images go)."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Generate images from a registered LoRA, e.g. the production one: models:/hero-lora@champion."""
    if (problem := model_uri_problem(model)) is not None:  # before the seconds of importing the models
        raise fail(problem)
    from hero_ml.adapters.tracking.registry import RegistryError
    from hero_ml.diffusion.pipeline import ModelNotFoundError
    from hero_ml.promotion import generate_from_registry

    resolved = load(config)
    made = writable_folder(out, "--out", overwrite)
    quiet_model_loading()
    with console.status(f"loading {model} and generating {count} images"):
        try:
            version, paths, pool = generate_from_registry(
                resolved, model, prompt, count, out, seed=seed, guided=guided
            )
        except (RegistryError, ModelNotFoundError, ConfigError) as err:
            if made:
                out.rmdir()  # nothing generated: nothing left behind
            raise fail(str(err)) from None
    if pool is not None and pool.prompt != prompt:
        console.print(
            f"note: the noise pool was liked for the prompt {pool.prompt!r}, not {prompt!r}",
            highlight=False,
            markup=False,
        )
    start = (
        "plain N(0, I) noises"
        if pool is None
        else f"the run's noise pool (its best and {len(pool.good)} good images' noises, eps {pool.eps:g})"
    )
    console.print(
        f"{len(paths)} images of {version.name} version {version.version} from {start} in {out} "
        "(grid.png: all of them)",
        highlight=False,
        markup=False,
    )


reflow_help(app)  # last: after every command above is registered


def run_cli() -> None:
    """The `hero` command: the app, with HERO's own errors (HeroError: the message says what to fix)
    printed as one line instead of a traceback, wherever in a command they arise."""
    try:
        app()
    except HeroError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":  # python -m hero_ml.cli, as the `hero` command
    run_cli()
