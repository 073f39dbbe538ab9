"""Success rates: how often a model's images satisfy a task's judge, on fixed seeds.

Images are sampled exactly as HERO samples them (the trajectory sampler, DDIM with eta), prompts
taken in turn, image i drawing from generator (seed, i): two evaluations with the same arguments see
the same initial noises, so a LoRA's rate is comparable to its base model's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline

from hero_ml.config import SamplingConfig
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.toy.judge import Target, judge
from hero_ml.toy.perceive import perceive
from hero_ml.toy.render import render
from hero_ml.toy.scene import Scene
from hero_ml.toy.task import Task


@dataclass(frozen=True)
class EvalResult:
    n: int
    successes: int
    violations: dict[str, int] = field(default_factory=dict)  # violation kind -> images showing it

    @property
    def rate(self) -> float:
        return self.successes / self.n


def success_rate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    target: Target,
    n: int,
    *,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
    initial_noise: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Sample n images (prompts in turn) and count those the judge finds good.

    initial_noise: the n images' x_T (n, C, h, w), e.g. feedback-guided ones; by default each image's
    own generator draws it. The generators draw the denoising steps' noise either way."""
    if initial_noise is not None and len(initial_noise) != n:
        raise ValueError(f"initial_noise holds {len(initial_noise)} noises for {n} images")
    successes = 0
    violations: Counter[str] = Counter()
    generators = per_image_generators(seed, n)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        trajectory = sample_trajectories(
            pipe,
            [prompts[(start + i) % len(prompts)] for i in range(count)],
            generators[start : start + count],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            sub_batch_size=batch_size,
            initial_noise=None if initial_noise is None else initial_noise[start : start + count],
        )
        for image in trajectory.images.numpy():
            verdict = judge(image, target)
            successes += verdict.good
            violations.update({v.split(":")[0] for v in verdict.violations})
        if on_batch is not None:
            on_batch(count)
    return EvalResult(n=n, successes=successes, violations=dict(violations))


def task_success_rate(
    pipe: StableDiffusionPipeline,
    task: Task,
    n: int,
    sampling: SamplingConfig,
    *,
    seed: int,
    batch_size: int | None = None,
    initial_noise: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """The success rate on a task's prompts, images sampled as a run samples them (DDIM steps, CFG
    and eta of `sampling`; batch_size defaults to its sub-batch size), from plain noise or the n
    images' `initial_noise`."""
    return success_rate(
        pipe,
        task.prompts,
        task.target,
        n,
        seed=seed,
        num_steps=sampling.num_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        batch_size=batch_size or sampling.sub_batch_size,
        initial_noise=initial_noise,
        on_batch=on_batch,
    ).rate


def judge_accuracy(scenes: Sequence[Scene]) -> float:
    """Share of rendered scenes the judge reads right. A clean scene: every shape's colour and kind,
    and nothing malformed. A scene with defects: every shape's colour, and a malformed one flagged
    (the kind of a smeared or broken shape is not a fact to get right)."""
    right = 0
    for scene in scenes:
        seen = perceive(render(scene))
        if any(s.defect is not None for s in scene.shapes):
            colours_right = sorted(s.color for s in scene.shapes) == sorted(o.color for o in seen)
            right += colours_right and any(o.malformed for o in seen)
        else:
            kinds_right = sorted((s.color, s.kind) for s in scene.shapes) == sorted(
                (o.color, str(o.kind)) for o in seen
            )
            right += kinds_right and not any(o.malformed for o in seen)
    return right / len(scenes)
