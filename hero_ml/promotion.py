"""Jobs on the model registry: promote a LoRA version to champion on a measured win, and generate
images from a registered version (`models:/NAME@champion`).

A toy version is judged on its task (recorded as the version's `hero.task` tag) by the task's judge,
every model on the same fixed noises. Production versions need a human-evaluated or held-out
evaluation in place of the judge.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hero_ml.adapters.tracking.registry import (
    BASE_MODEL_TAG,
    ModelVersion,
    PromotionDecision,
    Registry,
    RegistryError,
)
from hero_ml.config import MAX_GENERATED, SEED_MAX, ConfigError, HeroConfig
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.guidance import NoisePool
from hero_ml.images import image_grid
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.toy.task import load_task


def open_registry(config: HeroConfig) -> Registry:
    tracking = config.tracking
    return Registry(tracking.tracking_uri, tracking.registered_model, tracking.champion_alias)


class BaseModelChangeError(RegistryError):
    """A promotion would move the champion alias to a LoRA of another base model."""


def promote_version(
    config: HeroConfig,
    version: str | None = None,
    on_images: Callable[[int], None] | None = None,
    allow_base_change: bool = False,
) -> PromotionDecision:
    """Compare `version` (default: the latest) against the champion, or the base model when there is
    none, on config.promotion's fixed evaluation; move the champion alias on a win by the margin.

    allow_base_change: judge a challenger trained on another base model than the champion (each is
    evaluated on its own base; a win changes the model the alias serves), refused without it."""
    registry = open_registry(config)
    challenger = registry.version(version)
    task_name = challenger.tags.get("hero.task")
    if task_name is None:
        raise RegistryError(
            f"version {challenger.version} has no hero.task tag: only toy-task versions have an "
            f"automatic judge; evaluate it with people and point the alias at it by hand (`hero registry "
            f"alias {challenger.version}`)"
        )

    def comparable(current: ModelVersion | None) -> None:
        """Refuse a champion of another task (no judge compares them) or, unless allowed, of another
        base model (a win would change the model the alias serves)."""
        if current is None:
            return
        if current.tags.get("hero.task") != task_name:
            champion_task = current.tags.get("hero.task")
            trained_on = "a real prompt (no toy task)" if champion_task is None else f"task {champion_task!r}"
            raise RegistryError(
                f"the champion (version {current.version}) was trained on {trained_on}, the challenger "
                f"for task {task_name!r}: the judge cannot compare them. Promote within one task (a "
                "registered model per task, tracking.registered_model), or compare them with people and "
                f"point the alias by hand (`hero registry alias {challenger.version}`)"
            )
        bases = (challenger.tags.get(BASE_MODEL_TAG), current.tags.get(BASE_MODEL_TAG))
        if bases[0] != bases[1] and not allow_base_change:
            raise BaseModelChangeError(
                f"version {challenger.version} was trained on the base model {bases[0]!r}, the champion "
                f"(version {current.version}) on {bases[1]!r}: a win would change the model "
                f"@{config.tracking.champion_alias} serves. Judge them anyway with --allow-base-change "
                "(the promotion flow's allow_base_change), each on its own base"
            )

    task = load_task(task_name)
    promotion = config.promotion

    def evaluate(candidate: ModelVersion | None) -> float:
        # no champion: the challenger's base model, as it was trained on, is the incumbent
        pipe = registry.load(
            challenger if candidate is None else candidate,
            device=config.model.device,
            allow_download=config.model.allow_download,
            lora=candidate is not None,
        )
        return task_success_rate(
            pipe, task, promotion.eval_images, config.sampling, seed=promotion.eval_seed, on_batch=on_images
        )

    return registry.promote(
        challenger,
        margin=promotion.margin,
        images=promotion.eval_images,
        evaluate=evaluate,
        comparable=comparable,
    )


def generate_from_registry(
    config: HeroConfig,
    model_uri: str,
    prompt: str,
    count: int,
    out: Path,
    seed: int = 0,
    guided: bool = False,
) -> tuple[ModelVersion, list[Path], NoisePool | None]:
    """`count` images of `prompt` from the registered version `model_uri`, written as PNGs (and a
    grid) to `out`; sampled as HERO samples (config.sampling: DDIM steps, CFG, eta). Numbered PNGs
    of an earlier, larger generation in `out` are removed: the folder holds this one's images only.

    guided: start from the noise pool the version's run left (as HERO samples its training batches),
    returned too (its prompt may not be `prompt`), instead of plain N(0, I). Its arguments are
    checked before anything loads (a deployment's flow run passes them unvalidated)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"prompt: give the text to draw, got {prompt!r}")
    if type(count) is not int or not 1 <= count <= MAX_GENERATED:
        raise ConfigError(f"count: the images to generate, 1 to {MAX_GENERATED}, got {count!r}")
    if type(seed) is not int or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed: a whole number 0 to {SEED_MAX}, got {seed!r}")
    registry = open_registry(config)
    version = registry.resolve(model_uri)
    pool = registry.noise_pool(version) if guided else None
    initial_noise = None if pool is None else pool.sample(count, torch.Generator().manual_seed(seed))
    pipe: StableDiffusionPipeline = registry.load(
        version, device=config.model.device, allow_download=config.model.allow_download
    )
    sampling = config.sampling
    with torch.no_grad():
        images = sample_trajectories(
            pipe,
            [prompt] * count,
            per_image_generators(seed, count),
            num_steps=sampling.num_steps,
            guidance_scale=sampling.guidance_scale,
            eta=sampling.eta,
            initial_noise=initial_noise,
            negative_prompt=sampling.negative_prompt,
            sub_batch_size=sampling.sub_batch_size,
        ).images
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images.numpy()):
        path = out / f"{index:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    image_grid(images).save(out / "grid.png")
    for earlier in out.glob("*.png"):  # a larger earlier --count's images would read as this one's
        if re.fullmatch(r"\d{3,}\.png", earlier.name) and earlier not in paths:
            earlier.unlink()
    return version, paths, pool
