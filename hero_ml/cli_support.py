"""What every `hero` command module shares: the consoles, the --config option, failing readably."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from hero_ml.config import ConfigError, HeroConfig, load_config

# a line stays one line, whatever the width: piped or logged, a command it names is not cut in two
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file; HERO_<SECTION>__<FIELD> environment variables override it.",
        exists=True,
        dir_okay=False,
    ),
]


def quiet_model_loading() -> None:
    """The libraries' own bars (diffusers' and transformers' "Loading …", MLflow's artifact downloads)
    off for a command that loads a model: its own progress says more. Called by those commands only:
    importing the two libraries takes seconds."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # [a-z] is not markup
    return typer.Exit(code=1)


def writable_folder(folder: Path, option: str, overwrite: bool = True) -> bool:
    """Make `folder` (and its parents) before the work whose results it would hold, or fail readably;
    True when it did not exist before (so a command that produced nothing can remove it again).

    overwrite False: a folder that holds anything is refused (its files would be mixed with the new
    ones, or replaced); the message names the --overwrite flag that allows it."""
    made = not folder.exists()
    if not overwrite and folder.is_dir():
        try:
            held = sorted(entry.name for entry in folder.iterdir())
        except OSError as err:
            raise fail(f"{option} {folder}: cannot read it ({err.strerror})") from None
        if held:
            raise fail(
                f"{option} {folder} already holds {held[0]}"
                + (f" and {len(held) - 1} more" if len(held) > 1 else "")
                + "; give a new or empty folder, or --overwrite to write over it"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise fail(f"{option} {folder}: cannot create it ({err.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise fail(f"{option} {folder}: not writable")
    return made


def load(path: Path | None) -> HeroConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        raise fail(str(err)) from None


def reflow_help(app: typer.Typer) -> None:
    """Join each help paragraph's lines, in `app` and all its groups. Typer prints a docstring's line
    breaks as they are: a paragraph wrapped at the source's 110 columns broke mid-sentence in an
    80-column terminal, and a command's summary broke in its group's table."""
    for command in app.registered_commands:
        command.help = _joined_paragraphs(command.help or inspect.getdoc(command.callback) or "")
    for group in app.registered_groups:
        group_app = group.typer_instance
        if group_app is not None:
            group_app.info.help = _joined_paragraphs(str(group.help or group_app.info.help or ""))
            reflow_help(group_app)


def _joined_paragraphs(text: str) -> str:
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))
