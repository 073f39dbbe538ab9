"""`hero labelstudio …`: set up a run's Label Studio project and watch its rounds' labelling."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import HttpUrl, TypeAdapter, ValidationError
from rich.markup import escape
from rich.table import Table

from hero_ml.adapters.storage import StorageError, open_store
from hero_ml.cli_support import ConfigOption, console, fail
from hero_ml.config import ConfigError, HeroConfig, load_config, restore_config, with_overrides
from hero_ml.errors import HeroError
from hero_ml.redact import redact

if TYPE_CHECKING:
    from hero_ml.labelling import LabelStudioRounds

labelstudio_app = typer.Typer(
    help="Human feedback in Label Studio: a project per run, round progress.", no_args_is_help=True
)


def _rounds(
    config_path: Path | None, run_id: str | None, run_id_source: str
) -> tuple[HeroConfig, LabelStudioRounds]:
    from hero_ml.labelling import LabelStudioRounds, open_projects
    from hero_ml.run_store import RunStore

    try:
        config: HeroConfig = load_config(config_path)
        if run_id is not None:
            # validated, as a config's run_id is
            config = with_overrides(config, {"run_id": run_id}, given_by={"run_id": run_id_source})
        runs = RunStore(open_store(config.storage), config.run_id)
        stored = runs.load_config()
        if stored is not None:  # what the run needs is its own (a flow run's overrides, say), not this file's
            config = restore_config(stored, config)
        projects = open_projects(config)
    except HeroError as err:  # the config, the store, the stored run config, Label Studio's token
        raise fail(str(err)) from None
    return config, LabelStudioRounds(config, runs, projects)


@labelstudio_app.command("setup")
def setup(
    run_id: Annotated[str | None, typer.Option(help="The run (default: the config's run_id).")] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            help="Where Label Studio posts annotation events (hero serve-webhooks); none: no webhook."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create (or find) the run's project with HERO's labeling interface, connect it to the S3 images,
    register the annotation webhook, and print the project's URL."""
    from hero_ml.labelling import LabelStudioError

    if webhook_url is not None:
        try:  # Label Studio would take any string and post to nowhere
            TypeAdapter(HttpUrl).validate_python(webhook_url)
        except ValidationError as err:
            raise fail(
                f"--webhook-url {redact(webhook_url)!r} is not an http(s) URL ({err.errors()[0]['msg']}): "
                "give where `hero serve-webhooks` listens, e.g. http://hero-webhooks:8765/webhooks/label-studio"
            ) from None
    resolved, rounds = _rounds(config, run_id, "--run-id")
    hook = None
    if webhook_url is not None:
        try:  # checked as the config's: no credentials in it, and the secret set
            hook = with_overrides(resolved, {"orchestration": {"webhook_url": webhook_url}}).orchestration
        except ConfigError as err:
            raise fail(f"--webhook-url: {err}") from None
    try:
        rounds.projects.check()  # Label Studio's, and it takes the key: before a project is made
        project_id = rounds.project()
        hooked = (
            rounds.projects.ensure_webhook(project_id, str(hook.webhook_url), hook.webhook_secret)
            if hook is not None
            else None
        )
    except (LabelStudioError, StorageError) as err:
        raise fail(str(err)) from None
    console.print(
        f"project {rounds.projects.title(resolved.run_id)!r}: {rounds.projects.project_url(project_id)}",
        markup=False,
    )
    if hook is not None:
        console.print(
            f"webhook {hooked}: {hook.webhook_url} (with the shared secret header)",
            highlight=False,
            markup=False,
        )


@labelstudio_app.command("status")
def status(
    run_id: Annotated[str, typer.Argument(help="The run.")],
    config: ConfigOption = None,
) -> None:
    """Each committed round's labelling: labels and best votes against what it needs, skips, problems,
    and the labels of each annotator."""
    from hero_ml.labelling import LabelStudioError
    from hero_ml.run_store import CorruptObjectError

    _, rounds = _rounds(config, run_id, "RUN_ID")
    try:
        committed = [r.round for r in rounds.runs.list_rounds() if r.committed]
        if not committed:  # before Label Studio is asked: finding the project would create it
            raise fail(f"run {run_id!r} has no committed round in {rounds.runs.store.where('runs')}")
        rounds.projects.check()
        progress = rounds.progress(committed)
    except (LabelStudioError, StorageError, CorruptObjectError) as err:  # a damaged record: named
        raise fail(str(err)) from None
    table = Table("round", "state", "labels", "best votes", "skipped", "problems", title=f"run {run_id}")
    annotators: dict[str, int] = {}
    for k, collected in progress.items():
        if isinstance(collected, str):  # no tasks to read: why
            table.add_row(str(k), collected, "", "", "", "")
            continue
        p = collected.progress
        closed = rounds.runs.load_feedback(k) is not None  # as collected; its unfinished tasks withdrawn
        table.add_row(
            str(k),
            "collected" if closed else "[green]complete[/]" if p.complete else "open",
            f"{p.labels}/{p.labels_required}",
            f"{p.best_votes}/{p.best_votes_required}",
            str(collected.cancelled),
            str(len(collected.problems) + len(collected.missing_tasks)),
        )
        for who, count in collected.labels_by_annotator.items():
            annotators[who] = annotators.get(who, 0) + count
    console.print(table)
    for who, count in sorted(annotators.items(), key=lambda item: -item[1]):
        console.print(f"  annotator {who}: {count} labels", highlight=False, markup=False)
    for k, collected in progress.items():
        for missing in [] if isinstance(collected, str) else collected.missing_tasks:
            console.print(
                f"  [yellow]round {k}[/]: {escape(missing)} has no task in Label Studio", highlight=False
            )
        for problem in [] if isinstance(collected, str) else collected.problems:
            console.print(f"  [yellow]round {k}[/]: {escape(problem)}", highlight=False)  # annotators' text
