"""One process of the data-parallel tests (tests/test_parallel.py launches two with torchrun, gloo on
the CPU), writing what it ends with to OUT/rank<k>.safetensors:
- default: the same round and LoRA as the single-process reference, one update pass over this
  process's share, then the LoRA parameters and the optimiser steps taken (--target-kl: two passes
  under that KL bound, which every process must stop at together; --loss-scale: through a GradScaler,
  one unit a micro-batch);
- --engine: two whole HERO rounds of the engine (sampling shared, encoder, DDPO), then the rounds'
  latents and images, the LoRA and the encoder."""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from hero_ml.config import with_overrides
from hero_ml.ddpo import ddpo_objective, update_pass
from hero_ml.diffusion.lora import add_lora
from hero_ml.diffusion.pipeline import build_random_pipeline
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories
from hero_ml.engine import Engine
from hero_ml.parallel import DataParallel
from tests.unit.test_engine import run_rounds, small_config

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


def train(
    parallel: DataParallel | None, target_kl: float | None = None, loss_scale: bool = False
) -> tuple[list[torch.nn.Parameter], int, torch.Tensor]:
    """One pass (two with target_kl, which may stop them); the LoRA parameters, the steps taken and
    the pass's loss, approx-KL and clip fraction.
    loss_scale: through a GradScaler (a float16 model's) in groups of one unit, fewer than the processes:
    a process with no unit in a group trains nothing and still unscales its (zero) gradients."""
    params, pipe, trajectory = setting()
    stats = update_pass(
        ddpo_objective(pipe, trajectory, ADVANTAGE, clip_range=10.0),  # type: ignore[arg-type]
        torch.optim.SGD(params, lr=0.5),  # plain SGD: the step is the gradient, nothing hides a wrong sum
        units=6,
        num_steps=4,
        timesteps_per_unit=2,
        train_batch_size=1 if loss_scale else 3,
        gradient_accumulation_steps=1 if loss_scale else 2,
        inner_epochs=1 if target_kl is None else 2,
        max_grad_norm=1e6,  # no clipping: compare raw gradients
        generator=torch.Generator().manual_seed(0),
        target_kl=target_kl,
        parallel=parallel,
        scaler=torch.amp.GradScaler("cpu") if loss_scale else None,
    )
    figures = torch.tensor([stats.loss, stats.approx_kl, stats.clip_fraction], dtype=torch.float64)
    return params, stats.optimizer_steps, figures


def engine_rounds(parallel: DataParallel | None, rounds: int = 2) -> dict[str, torch.Tensor]:
    """`rounds` HERO rounds of the unit tests' small engine; what they sampled and what it learned."""
    # A clip range no ratio reaches: a ratio rounded to either side of the clip's edge would switch
    # its sample's gradient on or off, and the comparison is of summed gradients, not of rounding.
    config = with_overrides(small_config("hero"), {"ddpo": {"clip_range": 10.0}})
    engine = Engine(config, build_random_pipeline("tiny", seed=0), parallel=parallel)
    batches = run_rounds(engine, rounds)
    assert engine.encoder is not None
    return {
        **{f"latents.{b.round}": b.trajectory.latents for b in batches},
        **{f"images.{b.round}": b.trajectory.images for b in batches},
        **{f"lora.{i}": p.detach() for i, p in enumerate(engine.lora_params)},
        **{f"encoder.{k}": v for k, v in engine.encoder.state_dict().items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-sum", action="store_true", help="skip the all-reduce (the test's control)")
    parser.add_argument("--engine", action="store_true", help="two engine rounds instead of one pass")
    parser.add_argument("--target-kl", type=float, default=None, help="two passes under this KL bound")
    parser.add_argument("--loss-scale", action="store_true", help="a GradScaler, micro-batches of one")
    parser.add_argument("--uneven", action="store_true", help="an engine whose round 2 cannot share")
    args = parser.parse_args()
    parallel = DataParallel.launched()
    if args.no_sum:
        parallel.sum_gradients = lambda params: None  # type: ignore[method-assign]
    if args.uneven:  # 3 images for 2 processes: refused as the engine is built, nothing sampled
        uneven = with_overrides(
            small_config("hero"), {"sampling": {"images_per_round": 3, "sub_batch_size": 3}}
        )
        try:
            Engine(uneven, build_random_pipeline("tiny", seed=0), parallel=parallel)
            result = {"refused": torch.tensor(0)}
        except ValueError as err:
            (args.out / f"rank{parallel.rank}.txt").write_text(str(err))
            result = {"refused": torch.tensor(1)}
    elif args.engine:
        result = engine_rounds(parallel)
    else:
        params, steps, figures = train(parallel, args.target_kl, args.loss_scale)
        result = {f"p{i}": p.detach() for i, p in enumerate(params)}
        result |= {"steps": torch.tensor(steps), "figures": figures}
    save_file({k: v.contiguous() for k, v in result.items()}, args.out / f"rank{parallel.rank}.safetensors")
    parallel.close()
