"""The `hero` command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hero_ml.config import ConfigError, HeroConfig, load_config
from hero_ml.toy.cli import toy_app

# transformers warns at import about optional image backends the pipeline never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    help="HERO: fine-tune text-to-image diffusion models from online human feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check configuration files.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect Stable Diffusion pipelines.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(toy_app, name="toy")

console = Console()
err_console = Console(stderr=True)

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


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


def _load(path: Path | None) -> HeroConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        raise _fail(str(err)) from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    comments: Annotated[bool, typer.Option(help="Precede every field with its description.")] = True,
) -> None:
    """Print the resolved configuration (defaults <- file <- environment) as YAML, secrets masked.

    The output is itself a valid config file: `hero config show > hero.yaml` starts a new one.
    """
    resolved = _load(config)
    if comments:
        text = resolved.to_commented_yaml()
    else:
        text = yaml.safe_dump(resolved.to_public_dict(), sort_keys=False)
    typer.echo(text, nl=False)  # plain text, not rich: rich would wrap lines and break the YAML
    typer.echo(f"# derived: {json.dumps(resolved.derived())}")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="The YAML config file to check.", exists=True, dir_okay=False)],
) -> None:
    """Check a config file (with the current environment's overrides); exit 1 with every problem."""
    resolved = _load(file)
    derived = ", ".join(f"{k}={v}" for k, v in resolved.derived().items())
    console.print(f"[green]ok[/] {file}: {derived}", highlight=False)


@model_app.command("build")
def model_build(
    arch: Annotated[str, typer.Argument(help="Architecture: 'tiny' or 'sd15'.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline to.", file_okay=False)],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write an SD-shaped pipeline with random weights as a standard diffusers folder."""
    from hero_ml.diffusion.architectures import ARCHITECTURES
    from hero_ml.diffusion.pipeline import build_random_pipeline

    if arch not in ARCHITECTURES:
        raise _fail(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    with console.status(f"building {arch} with random weights"):
        build_random_pipeline(arch, seed=seed).save_pretrained(out)
    console.print(f"[green]wrote[/] {out} (random weights, seed {seed})", highlight=False)


@app.command("sample")
def sample(config: ConfigOption = None) -> None:
    """Sample one round with the configured model; write images, grid, trajectory and manifest.

    On the embedded defaults the model is a tiny SD with random weights: the images are noise, and
    the manifest says so. This shows the sampler and the storage layout end to end.
    """
    from hero_ml.diffusion.pipeline import DeviceUnavailableError, ModelNotFoundError
    from hero_ml.sample_round import RoundExistsError, sample_round

    resolved = _load(config)
    steps = resolved.sampling.num_steps
    sub_batches = -(-resolved.sampling.images_per_round // resolved.sampling.sub_batch_size)
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
            progress.update(task, description="denoising steps", total=sub_batches * steps)

        try:
            result = sample_round(
                resolved, on_model_loaded=model_loaded, on_step=lambda: progress.advance(task)
            )
        except (ModelNotFoundError, DeviceUnavailableError, RoundExistsError, NotImplementedError) as err:
            raise _fail(str(err)) from None

    manifest = result.manifest
    console.print(
        f"[green]round {manifest['round']} committed[/] at {result.folder}: {manifest['images']} images "
        f"in {manifest['sampling_seconds']} s",
        highlight=False,
    )
    console.print(f"  grid: {result.folder / 'grid.png'}", highlight=False)
    console.print(f"  note: {manifest['note']}", highlight=False)
