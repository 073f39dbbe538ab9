"""The toy model's card: how it was made and what it measures, written from measurements.

`hero toy card` reads the model folder's training.json, measures the judge's accuracy and the base
success rate of every shipped task, draws the training curves and a sample grid per task, and writes
README.md (the card) and card.json (every figure) into the model folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from diffusers import StableDiffusionPipeline
from pydantic import BaseModel, ValidationError

from hero_ml.config import format_validation_error
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.errors import HeroError
from hero_ml.images import image_grid
from hero_ml.toy.evaluate import judge_accuracy, success_rate
from hero_ml.toy.pretrain import TRAINING_LOG, PretrainConfig
from hero_ml.toy.scene import random_scene
from hero_ml.toy.task import load_task, task_names

BASE_RATE_RANGE = (0.05, 0.50)


class _DatasetLog(BaseModel):
    images: int
    seconds: float | None = None  # logs of older pretraining runs lack the phases' times


class _VaeLog(BaseModel):
    curve_l1: list[tuple[float, float]]  # (step, L1)
    final_l1: float
    scaling_factor: float
    seconds: float | None = None


class _UnetLog(BaseModel):
    curve_mse: list[tuple[float, float]]  # (step, noise MSE)
    final_mse: float
    seconds: float | None = None


class TrainingLog(BaseModel):
    """What the card reads of the pretraining run's training.json (the file holds more)."""

    config: PretrainConfig
    dataset: _DatasetLog
    vae: _VaeLog
    unet: _UnetLog
    seconds: float


def read_training_log(model: Path) -> TrainingLog:
    """The model folder's training.json, checked before minutes of measuring are spent on it."""
    path = model / TRAINING_LOG
    try:
        return TrainingLog.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise HeroError(
            f"{model}: no {TRAINING_LOG} (written by `hero toy pretrain --out {model}`)"
        ) from None
    except ValidationError as err:
        raise HeroError(
            f"{path} is not a pretraining run's log (edited or damaged):\n"
            f"{format_validation_error(err, root=TrainingLog)}\nrerun `hero toy pretrain --out {model}`"
        ) from None


def measure(
    pipe: StableDiffusionPipeline,
    *,
    n: int,
    judge_scenes: int,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Judge accuracy on rendered scenes and base success rates of every shipped task."""
    rng = np.random.default_rng(seed)
    accuracy = {}
    for label, defect_rate in (("clean", 0.0), ("with_defects", 0.5)):
        scenes = [random_scene(rng, defect_rate=defect_rate)[1] for _ in range(judge_scenes)]
        accuracy[label] = round(judge_accuracy(scenes), 4)
    rates = {}
    for name in task_names():
        task = load_task(name)
        runs = [("training prompts", task.prompts, task.target)]
        if task.eval_prompts:
            runs.append(("unseen prompts", task.eval_prompts, task.eval_target or task.target))
        for label, prompts, target in runs:
            if on_step is not None:
                on_step(f"{name} ({label})")
            result = success_rate(
                pipe, prompts, target, n, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale
            )
            rates[f"{name}/{label}"] = {
                "task": name,
                "category": task.category,
                "prompts": list(prompts),
                "rate": round(result.rate, 4),
                "successes": result.successes,
                "n": result.n,
                "violations": result.violations,
            }
    return {
        "judge_accuracy": accuracy,
        "judge_scenes": judge_scenes,
        "base_rates": rates,
        "eval": {"n": n, "seed": seed, "num_steps": num_steps, "guidance_scale": guidance_scale, "eta": 1.0},
    }


def draw_curves(log: TrainingLog, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    vae = np.array(log.vae.curve_l1)
    unet = np.array(log.unet.curve_mse)
    axes[0].plot(vae[:, 0], vae[:, 1])
    axes[0].set(title="VAE reconstruction (L1)", xlabel="step", yscale="log")
    axes[1].plot(unet[:, 0], unet[:, 1], alpha=0.4)
    window = max(1, len(unet) // 20)
    axes[1].plot(unet[window - 1 :, 0], np.convolve(unet[:, 1], np.ones(window) / window, mode="valid"))
    axes[1].set(title="text encoder + UNet (noise MSE)", xlabel="step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_samples(
    pipe: StableDiffusionPipeline, folder: Path, *, seed: int = 0, per_prompt: int = 16, num_steps: int = 50
) -> list[str]:
    names = []
    for name in task_names():
        prompt = load_task(name).prompts[0]
        trajectory = sample_trajectories(
            pipe,
            [prompt] * per_prompt,
            per_image_generators(seed, per_prompt),
            num_steps=num_steps,
            guidance_scale=5.0,
            eta=1.0,
        )
        grid = image_grid(trajectory.images, columns=8)
        path = folder / f"samples-{name}.png"
        grid.resize((grid.width * 2, grid.height * 2)).save(path)
        names.append(path.name)
    return names


def write_card(model: Path, log: TrainingLog, figures: dict, samples: list[str]) -> None:
    config = log.config
    lo, hi = BASE_RATE_RANGE
    rows = "\n".join(
        f"| {r['task']} | {r['category']} | {key.split('/')[1]} | {'; '.join(r['prompts'])} | "
        f"**{r['rate']:.3f}** ({r['successes']}/{r['n']}) | "
        f"{'yes' if lo <= r['rate'] <= hi or key.endswith('unseen prompts') else 'NO'} |"
        for key, r in figures["base_rates"].items()
    )
    size_mb = sum(p.stat().st_size for p in model.rglob("*.safetensors")) / 2**20
    phases = (
        f" (data {log.dataset.seconds:.0f} s, VAE {log.vae.seconds:.0f} s, text encoder + UNet "
        f"{log.unet.seconds:.0f} s)"
        if log.dataset.seconds is not None and log.vae.seconds is not None and log.unet.seconds is not None
        else ""
    )
    acc = figures["judge_accuracy"]
    ev = figures["eval"]
    text = f"""# The toy Stable Diffusion

A tiny model of the real Stable Diffusion classes (`AutoencoderKL`, `UNet2DConditionModel`,
`CLIPTextModel` with a `CLIPTokenizer`, `DDIMScheduler`), trained from nothing on procedurally drawn
shapes, so that the whole HERO loop runs, is tested and is benchmarked on a CPU. Plain diffusers loads
it: `StableDiffusionPipeline.from_pretrained("hero_ml/toy/pretrained")`. 32x32 px images, 4x16x16
latents, {size_mb:.1f} MB of safetensors.

## How it was made

```
hero toy pretrain --seed {config.seed} --dataset-size {config.dataset_size} \\
    --vae-steps {config.vae_steps} --unet-steps {config.unet_steps} --out hero_ml/toy/pretrained --overwrite
```

{log.seconds / 60:.1f} minutes on the 2-core CPU it was made on{phases}. Every figure of the run is in `training.json`.

- **Data:** {log.dataset.images} random scenes rendered with `hero_ml.toy` (1-2 groups of 1-4 shapes, at most 4
  in all, 6 colours, 3 kinds; {config.region_rate:.0%} of captions name a half of the picture, which then holds at most
  2 shapes; each shape malformed with probability {config.defect_rate}), each with one paraphrased caption of the grammar
  in docs/TASKS.md, {config.colorless_rate:.0%} of groups with their colour left open. Seed {config.seed}.
- **Tokenizer:** word-level BPE over the grammar's words (merges learned deterministically), 20 tokens.
- **VAE:** {config.vae_steps} steps, batch {config.vae_batch}, AdamW {config.vae_lr}, L1 + {config.kl_weight} KL; final L1
  {log.vae.final_l1}; latent scaling factor {log.vae.scaling_factor:.4f} (1 / std of the latents).
- **Text encoder + UNet:** {config.unet_steps} steps, batch {config.unet_batch}, AdamW {config.unet_lr}, epsilon
  prediction on SD's noise schedule, captions dropped {config.caption_dropout:.0%} for guidance, EMA {config.ema_decay};
  final noise MSE {log.unet.final_mse}.

![training curves](training-curves.png)

## What it measures

Judge accuracy on rendered ground-truth scenes ({figures["judge_scenes"]} of each; `hero toy judge-accuracy --n {figures["judge_scenes"]}`):
**{acc["clean"]:.2%}** clean, **{acc["with_defects"]:.2%}** with defects (colours read and a malformed shape flagged).

Base success rates of the shipped tasks: {ev["n"]} images each, seed {ev["seed"]}, DDIM {ev["num_steps"]} steps, eta 1,
CFG {ev["guidance_scale"]} (`hero toy eval --task TASK --n {ev["n"]}`, `--unseen` for the transfer prompts). The training
prompts' rates must lie in [{lo:.0%}, {hi:.0%}]: the model follows the prompt often but not always, and that gap is
what HERO closes.

| task | category | prompt set | prompts | base success rate | in range |
|---|---|---|---|---|---|
{rows}

## Samples (seed 0, the first 16 images of each task's prompt)

{chr(10).join(f"![{name}]({name})" for name in samples)}

Card written {datetime.now(UTC).date()} by `hero toy card --n {ev["n"]} --judge-scenes {figures["judge_scenes"]} --steps {ev["num_steps"]}`.
"""
    (model / "README.md").write_text(text)
    (model / "card.json").write_text(json.dumps(figures, indent=1))
