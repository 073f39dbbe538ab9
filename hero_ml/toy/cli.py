"""`hero toy …`: pretrain the toy model, list tasks, evaluate a model on a task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from hero_ml.cli_support import fail, quiet_model_loading, writable_folder
from hero_ml.config import SEED_MAX
from hero_ml.errors import HeroError

toy_app = typer.Typer(
    help="The toy world: pretrain the tiny SD, list tasks, evaluate success rates.", no_args_is_help=True
)
console = Console()

PRETRAINED = Path(__file__).parent / "pretrained"


@toy_app.command("pretrain")
def pretrain_command(
    out: Annotated[
        Path,
        typer.Option(
            help="Folder to write the diffusers pipeline to (hero_ml/toy/pretrained: the shipped one).",
            file_okay=False,
        ),
    ],
    seed: Annotated[int, typer.Option(help="Seeds data, init and training.", min=0, max=SEED_MAX)] = 0,
    dataset_size: Annotated[int, typer.Option(help="Rendered (image, caption) pairs.", min=8)] = 20_000,
    vae_steps: Annotated[int, typer.Option(help="VAE optimiser steps.", min=1)] = 800,
    unet_steps: Annotated[int, typer.Option(help="Text-encoder + UNet optimiser steps.", min=1)] = 3000,
    overwrite: Annotated[
        bool, typer.Option(help="Write into --out although it holds files (a model there is replaced).")
    ] = False,
) -> None:
    """Train the toy Stable Diffusion from nothing (VAE, then text encoder + UNet) and save it."""
    from hero_ml.toy.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(seed=seed, dataset_size=dataset_size, vae_steps=vae_steps, unet_steps=unet_steps)
    writable_folder(out, "--out", overwrite)
    quiet_model_loading()  # transformers' "Writing model shards" bar under our own
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        bars = {
            # started when their phase starts, so each bar's elapsed time is its own phase's
            "vae": progress.add_task("VAE", total=config.vae_steps, loss=float("nan"), start=False),
            "unet": progress.add_task(
                "text encoder + UNet", total=config.unet_steps, loss=float("nan"), start=False
            ),
        }

        started: set[str] = set()

        def report(phase: str, step: int, total: int, loss: float) -> None:
            if phase not in started:
                started.add(phase)
                progress.start_task(bars[phase])
            progress.update(bars[phase], completed=step, loss=loss)

        log = pretrain(config, out, on_progress=report)
    console.print(
        f"[green]saved[/] {out}: VAE L1 {log['vae']['final_l1']}, denoiser MSE {log['unet']['final_mse']}, "
        f"{log['seconds']} s in all",
        highlight=False,
    )


@toy_app.command("tasks")
def tasks_command() -> None:
    """List the shipped tasks."""
    from hero_ml.toy.task import load_task, task_names

    table = Table("task", "category", "prompts", "description")
    for name in task_names():
        task = load_task(name)
        table.add_row(name, task.category, Text("; ".join(task.prompts)), Text(task.description.strip()))
    console.print(table)


@toy_app.command("eval")
def eval_command(
    task: Annotated[str, typer.Option(help="A shipped task name or a task file.")],
    n: Annotated[int, typer.Option(help="Images to sample and judge.", min=1)] = 512,
    model: Annotated[
        Path, typer.Option(help="Diffusers pipeline folder.", exists=True, file_okay=False)
    ] = PRETRAINED,
    lora: Annotated[
        Path | None,
        typer.Option(
            help="A LoRA folder to apply (diffusers format): a run's MLflow artifact lora/ or its "
            "adapter_weights/."
        ),
    ] = None,
    unseen: Annotated[bool, typer.Option(help="Use the task's eval_prompts (transfer) instead.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the fixed initial noises.", min=0, max=SEED_MAX)] = 0,
    steps: Annotated[
        int,
        typer.Option(
            help="DDIM steps. 50: as the model card; `hero run` evaluates at sampling.num_steps (20).",
            min=1,
        ),
    ] = 50,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (>= 1).", min=1.0)] = 5.0,
    eta: Annotated[float, typer.Option(help="DDIM eta, in (0, 1].", min=1e-6, max=1.0)] = 1.0,
) -> None:
    """Print a model's success rate on a task: the share of images its judge finds good."""
    from hero_ml.diffusion.lora import load_lora
    from hero_ml.diffusion.pipeline import ModelNotFoundError, load_pipeline
    from hero_ml.toy.evaluate import success_rate
    from hero_ml.toy.task import TaskError, load_task

    quiet_model_loading()
    try:
        spec = load_task(task)
        pipe = load_pipeline(str(model), given_by="--model")
        if lora is not None:  # the MLflow artifact lora/ holds the weights in adapter_weights/
            load_lora(pipe, lora / "adapter_weights" if (lora / "adapter_weights").is_dir() else lora)
    except (TaskError, ModelNotFoundError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    prompts, target = spec.prompts, spec.target
    if unseen:
        if not spec.eval_prompts:
            raise fail(f"task {spec.name} has no eval_prompts")
        prompts, target = spec.eval_prompts, spec.eval_target or spec.target
    with Progress(
        TextColumn("sampling and judging"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("eval", total=n)
        result = success_rate(
            pipe,
            prompts,
            target,
            n,
            seed=seed,
            num_steps=steps,
            guidance_scale=cfg,
            eta=eta,
            on_batch=lambda count: progress.advance(bar, count),
        )
    detail = ", ".join(f"{rule} in {count}" for rule, count in sorted(result.violations.items()))
    console.print(
        f"{spec.name}{' (unseen prompts)' if unseen else ''}: success rate {result.rate:.3f} "
        f"({result.successes}/{result.n}){'; violations: ' + detail if detail else ''}",
        highlight=False,
    )


@toy_app.command("judge-accuracy")
def judge_accuracy_command(
    n: Annotated[int, typer.Option(help="Rendered scenes of each kind (clean, with defects).", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the scenes.", min=0, max=SEED_MAX)] = 0,
) -> None:
    """Measure how often the judge reads rendered ground-truth scenes right, clean and with defects."""
    import numpy as np

    from hero_ml.toy.evaluate import judge_accuracy
    from hero_ml.toy.scene import random_scene

    rng = np.random.default_rng(seed)
    for label, defect_rate in (("clean", 0.0), ("with defects", 0.5)):
        scenes = [random_scene(rng, defect_rate=defect_rate)[1] for _ in range(n)]
        console.print(f"judge accuracy, {label}: {judge_accuracy(scenes):.4f} on {n} scenes", highlight=False)


@toy_app.command("card")
def card_command(
    model: Annotated[
        Path,
        typer.Option(
            help="The pretrained model folder; its card (README.md, card.json, sample images) is written "
            "into it, the shipped model's by default.",
            file_okay=False,
        ),
    ] = PRETRAINED,
    n: Annotated[int, typer.Option(help="Images per task for the base rates.", min=1)] = 512,
    judge_scenes: Annotated[int, typer.Option(help="Rendered scenes for the judge accuracy.", min=1)] = 1000,
    steps: Annotated[int, typer.Option(help="DDIM steps.", min=1)] = 50,
) -> None:
    """Measure the model (judge accuracy, base rates of every task) and write its model card."""
    from hero_ml.diffusion.pipeline import ModelNotFoundError, load_pipeline
    from hero_ml.toy.card import draw_curves, draw_samples, measure, read_training_log, write_card

    try:  # the card needs it after minutes of measuring
        log = read_training_log(model)
    except HeroError as err:
        raise fail(f"--model {err}") from None
    writable_folder(model, "--model")
    quiet_model_loading()
    try:
        pipe = load_pipeline(str(model), given_by="--model")
    except (ModelNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    with console.status("measuring") as status:
        figures = measure(
            pipe,
            n=n,
            judge_scenes=judge_scenes,
            num_steps=steps,
            on_step=lambda what: status.update(f"evaluating {what}"),
        )
        draw_curves(log, model / "training-curves.png")
        samples = draw_samples(pipe, model, num_steps=steps)
    write_card(model, log, figures, samples)
    for key, result in figures["base_rates"].items():
        console.print(f"{key}: {result['rate']:.3f}", highlight=False)
    console.print(f"[green]wrote[/] {model / 'README.md'}", highlight=False)
