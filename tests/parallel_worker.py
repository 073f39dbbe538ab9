"""One process of the data-parallel test (tests/test_parallel.py launches two with torchrun, gloo on
the CPU): the same round and LoRA as the single-process reference, one update pass over this
process's share, then the LoRA parameters written to OUT/rank<k>.safetensors."""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from hero_ml.ddpo import ddpo_objective, update_pass
from hero_ml.diffusion.lora import add_lora
from hero_ml.diffusion.pipeline import build_random_pipeline
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.parallel import DataParallel

ADVANTAGE = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])


def setting() -> tuple[list[torch.nn.Parameter], object, object]:
    """The tiny pipeline with a non-identity LoRA and a sampled round of six: identical in every process."""
    pipe = build_random_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, rank=4, alpha=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    trajectory = sample_trajectories(
        pipe, ["a red circle"] * 6, per_image_generators(0, 6), num_steps=4, guidance_scale=5.0, eta=1.0
    )
    return params, pipe, trajectory


def train(parallel: DataParallel | None) -> list[torch.nn.Parameter]:
    params, pipe, trajectory = setting()
    update_pass(
        ddpo_objective(pipe, trajectory, ADVANTAGE, clip_range=10.0),  # type: ignore[arg-type]
        torch.optim.SGD(params, lr=0.5),  # plain SGD: the step is the gradient, nothing hides a wrong sum
        units=6,
        num_steps=4,
        timesteps_per_unit=2,
        train_batch_size=3,
        gradient_accumulation_steps=2,
        inner_epochs=1,
        max_grad_norm=1e6,  # no clipping: compare raw gradients
        generator=torch.Generator().manual_seed(0),
        parallel=parallel,
    )
    return params


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-sum", action="store_true", help="skip the all-reduce (the test's control)")
    args = parser.parse_args()
    parallel = DataParallel()
    if args.no_sum:
        parallel.sum_gradients = lambda params: None  # type: ignore[method-assign]
    trained = train(parallel)
    save_file(
        {f"p{i}": p.detach().contiguous() for i, p in enumerate(trained)},
        args.out / f"rank{parallel.rank}.safetensors",
    )
