"""Success rates on fixed seeds, from the generators' own noises or from given ones."""

from collections import Counter

import pytest
import torch

from hero_ml.config import ModelConfig
from hero_ml.diffusion.pipeline import load_configured_pipeline
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.toy.evaluate import success_rate
from hero_ml.toy.judge import judge
from hero_ml.toy.task import load_task


def test_given_initial_noises_are_sampled_batch_by_batch_each_image_from_its_own() -> None:
    pipe = load_configured_pipeline(ModelConfig())
    task = load_task("counting")
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    noise = torch.randn((8, *shape), generator=torch.Generator().manual_seed(2))
    # all 8 images in one batch, sampled and judged by hand
    images = sample_trajectories(
        pipe,
        [task.prompts[0]] * 8,
        per_image_generators(0, 8),
        num_steps=4,
        guidance_scale=5.0,
        eta=1.0,
        initial_noise=noise,
    ).images.numpy()
    verdicts = [judge(image, task.target) for image in images]

    def rate(initial_noise: torch.Tensor | None):  # two batches of 4: each takes its own slice
        return success_rate(
            pipe, task.prompts, task.target, 8, num_steps=4, batch_size=4, initial_noise=initial_noise
        )

    given = rate(noise)
    assert given.successes == sum(v.good for v in verdicts)
    assert given.violations == Counter(
        kind for v in verdicts for kind in {x.split(":")[0] for x in v.violations}
    )
    assert given != rate(None)  # the generators' own x_T: other images (else this test could not tell)
    with pytest.raises(ValueError, match="initial_noise holds 4 noises for 8 images"):
        rate(noise[:4])
