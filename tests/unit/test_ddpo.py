import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hero_ml.ddpo import UpdateStats, advantages, ddpo_objective, ppo_clipped_loss, update_pass
from hero_ml.diffusion.ddim import gaussian_kl
from hero_ml.diffusion.lora import adapters_disabled, add_lora
from hero_ml.diffusion.sampler import (
    per_image_generators,
    recompute_log_probs,
    recompute_step,
    sample_trajectories,
)


def test_advantages_normalise_with_the_population_std_and_clip() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population std sqrt(1.25)
    z = [(r - 2.5) / math.sqrt(1.25) for r in (1, 2, 3, 4)]
    assert advantages(rewards, clip=5.0).tolist() == pytest.approx(z)
    assert advantages(rewards, clip=1.0).tolist() == pytest.approx([-1.0, z[1], z[2], 1.0])
    assert advantages(torch.full((4,), 0.7), clip=5.0).tolist() == [0.0] * 4


def test_ppo_clipped_loss_on_a_hand_computed_case() -> None:
    old = torch.zeros(5)
    ratios = [1.0, 1.2, 0.7, 0.7, 1.3]
    new = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    advantage = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0])
    loss, approx_kl, clip_fraction = ppo_clipped_loss(new, old, advantage, clip_range=0.1)
    # max(-A r, -A clip(r)): max(-1, -1), max(-1.2, -1.1), max(0.7, 0.9) take the clipped term (flat
    # past the clip); max(-0.7, -0.9), max(1.3, 1.1) the unclipped one (a ratio moved against its
    # advantage keeps its gradient however far it went)
    assert loss.item() == pytest.approx((-1 - 1.1 + 0.9 - 0.7 + 1.3) / 5)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios) / 5)
    assert clip_fraction.item() == pytest.approx(4 / 5)
    loss.backward()
    # the unclipped term's gradient: d(-A r)/d log_prob = -A r / batch
    assert new.grad is not None and new.grad.tolist() == pytest.approx([-1 / 5, 0.0, 0.0, -0.7 / 5, 1.3 / 5])


@pytest.fixture
def round_of_six(tiny_pipe: StableDiffusionPipeline):
    torch.manual_seed(0)
    params = add_lora(tiny_pipe.unet, rank=4, alpha=4)
    with torch.no_grad():  # start from a non-identity adapter, as after some training
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    trajectory = sample_trajectories(
        tiny_pipe, ["a red circle"] * 6, per_image_generators(0, 6), num_steps=4, guidance_scale=5.0, eta=1.0
    )
    return tiny_pipe, params, trajectory


def test_update_pass_steps_the_optimiser_as_configured_and_trains_only_lora(round_of_six) -> None:
    pipe, params, trajectory = round_of_six
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if not p.requires_grad}
    lora_before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    stats = update_pass(
        ddpo_objective(pipe, trajectory, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), clip_range=1e-4),
        optimizer,
        units=6,
        num_steps=4,
        timesteps_per_unit=2,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        inner_epochs=2,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.optimizer_steps == 4  # 2 epochs x ceil(3 micro-batches / 2)
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, before) for p, before in zip(params, lora_before, strict=True))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, lora_before, strict=True)])
    assert stats.step_norm == pytest.approx(moved.norm().item(), rel=1e-6)


def test_a_group_steps_on_the_mean_over_its_units_whatever_the_micro_batch_sizes() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    c = torch.tensor([1.0, 2.0, 6.0])  # unit u's loss is c[u] * w
    calls: list[tuple[list[int], list[int]]] = []

    def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append((units.tolist(), steps.tolist()))
        return w.sum() * c[units].mean(), steps.float().mean(), torch.tensor(len(units) / 2)

    stats = update_pass(
        objective,
        torch.optim.SGD([w], lr=0.1),
        units=3,
        num_steps=2,
        timesteps_per_unit=2,
        train_batch_size=2,  # micro-batches of 2 units and 1 unit, accumulated into one group
        gradient_accumulation_steps=2,
        inner_epochs=1,
        max_grad_norm=100.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert sorted(len(units) for units, _ in calls) == [1, 1, 2, 2]  # each micro-batch at both timesteps
    for unit in range(3):  # every unit trains each of its steps once
        assert sorted(
            s for units, steps in calls for u, s in zip(units, steps, strict=True) if u == unit
        ) == [0, 1]
    # one step on the mean over the 3 units' losses, d/dw = (1 + 2 + 6) / 3 = 3: a mean of the two
    # micro-batches' means would give 3.75, 2.75 or 2.5 whichever units share a micro-batch
    assert stats.optimizer_steps == 1 and w.item() == pytest.approx(1 - 0.1 * 3.0)
    assert stats.step_norm == pytest.approx(0.3)
    # the figures are means over the trained (unit, timestep) pairs, each call's weighted by its units
    # (w was 1 throughout the group): the same however the units fall into micro-batches or processes
    assert stats.loss == pytest.approx(3.0)  # (1 + 2 + 6) / 3 at both timesteps
    assert stats.approx_kl == pytest.approx(0.5)  # each unit's steps 0 and 1
    assert stats.clip_fraction == pytest.approx((1.0 * 2 + 1.0 * 2 + 0.5 + 0.5) / 6)


def test_each_unit_trains_its_own_steps_drawn_afresh_every_pass() -> None:
    # 6 steps a trajectory, 2 trained a pass, 2 passes: which (unit, step) pairs train is the generator's
    # draw per unit and pass, whatever position a unit takes in its micro-batch
    w = torch.nn.Parameter(torch.tensor([1.0]))
    trained: list[list[tuple[int, int]]] = [[], []]

    def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trained[len(trained[0]) >= 5 * 2].extend(zip(units.tolist(), steps.tolist(), strict=True))
        return w.sum(), torch.tensor(0.0), torch.tensor(0.0)

    update_pass(
        objective,
        torch.optim.SGD([w], lr=0.0),
        units=5,
        num_steps=6,
        timesteps_per_unit=2,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        inner_epochs=2,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    replay = torch.Generator().manual_seed(3)  # the draws update_pass makes, in its order
    for epoch in range(2):
        torch.randperm(5, generator=replay)  # the units' order
        drawn = [torch.randperm(6, generator=replay)[:2].tolist() for _ in range(5)]
        assert sorted(trained[epoch]) == sorted((u, s) for u in range(5) for s in drawn[u]), epoch
    assert sorted(trained[0]) != sorted(trained[1])  # drawn again for the second pass


def test_a_step_whose_gradient_is_not_finite_is_skipped_not_taken() -> None:
    # an fp16 overflow in one accumulation group must not write inf/NaN into the LoRA for good
    w = torch.nn.Parameter(torch.ones(3))

    def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale = float("inf") if bool((units == 0).any()) else 1.0  # the group holding unit 0 overflows
        return (w * scale).sum(), torch.tensor(0.0), torch.tensor(0.0)

    stats = update_pass(
        objective,
        torch.optim.SGD([w], lr=0.1),
        units=4,
        num_steps=1,
        timesteps_per_unit=1,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        inner_epochs=1,
        max_grad_norm=10.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (stats.optimizer_steps, stats.skipped_steps) == (1, 1)
    # the finite group's step alone: gradient 1 per element (norm sqrt(3) < 10, unclipped), lr 0.1
    assert torch.equal(w.detach(), torch.full((3,), 1.0) - 0.1)


def test_a_float16_backward_keeps_a_small_gradient_only_with_the_loss_scaler() -> None:
    # A float32 master weight through a float16 op, as the LoRA through a float16 UNet: the gradient
    # reaching the op's output is 1e-9, which float16 rounds to 0 (its smallest subnormal is 6e-8).
    def step(scaler: torch.amp.GradScaler | None) -> tuple[float, UpdateStats]:
        w = torch.nn.Parameter(torch.tensor([1.0]))

        def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = w.to(torch.float16) * torch.tensor([1.0], dtype=torch.float16)
            return out.float().sum() * 1e-9, torch.tensor(0.0), torch.tensor(0.0)

        stats = update_pass(
            objective,
            torch.optim.SGD([w], lr=1e6),  # a step of 1e-3 for a gradient of 1e-9
            units=1,
            num_steps=1,
            timesteps_per_unit=1,
            train_batch_size=1,
            gradient_accumulation_steps=1,
            inner_epochs=1,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(0),
            scaler=scaler,
        )
        return 1.0 - w.item(), stats

    moved, stats = step(None)
    assert moved == 0.0 and stats.optimizer_steps == 1  # a step on a gradient of exactly 0
    scaler = torch.amp.GradScaler("cpu")  # scale 65536: 6.6e-5 in float16, unscaled in float32
    moved, stats = step(scaler)
    assert moved == pytest.approx(1e-3, rel=1e-3) and stats.optimizer_steps == 1
    assert scaler.get_scale() == 65536.0


def test_an_overflowing_scaled_step_is_skipped_and_the_scale_lowered() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0]))

    def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # 1e4 * 65536 overflows float16 (max 65504) in the backward pass
        out = w.to(torch.float16) * torch.tensor([1.0], dtype=torch.float16)
        return out.float().sum() * 1e4, torch.tensor(0.0), torch.tensor(0.0)

    scaler = torch.amp.GradScaler("cpu")
    seen: list[tuple[int, int]] = []
    stats = update_pass(
        objective,
        torch.optim.SGD([w], lr=1.0),
        units=2,
        num_steps=1,
        timesteps_per_unit=1,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        inner_epochs=1,
        max_grad_norm=1e9,
        generator=torch.Generator().manual_seed(0),
        scaler=scaler,
        on_step=lambda done, total: seen.append((done, total)),
    )
    assert (stats.optimizer_steps, stats.skipped_steps) == (0, 2)
    assert seen == [(0, 2), (1, 2), (2, 2)]  # a skipped step is progress too
    assert w.item() == 1.0 and scaler.get_scale() == 65536.0 / 4  # halved at each overflow


def test_an_adam_step_moves_every_parameter_by_lr_whatever_the_loss_scale(round_of_six) -> None:
    # Adam's first step is lr * g / (|g| + eps): the step's size does not follow the gradient's, so a
    # round's movement is set by lr and the number of steps (what lora_step_norm shows in tracking).
    pipe, params, trajectory = round_of_six
    norms = []
    for scale in (1.0, 1e-3):
        with torch.no_grad():
            start = [p.detach().clone() for p in params]
        stats = update_pass(
            ddpo_objective(pipe, trajectory, scale * torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), 10.0),
            torch.optim.Adam(params, lr=1e-4, eps=1e-12),
            units=6,
            num_steps=4,
            timesteps_per_unit=1,
            train_batch_size=6,
            gradient_accumulation_steps=1,
            inner_epochs=1,
            max_grad_norm=1e9,
            generator=torch.Generator().manual_seed(0),
        )
        assert stats.optimizer_steps == 1
        norms.append(stats.step_norm)
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    count = sum(p.numel() for p in params)
    assert norms == pytest.approx([1e-4 * count**0.5] * 2, rel=1e-3)


def _pass(pipe, params, trajectory, target_kl):
    """Two passes of 2 optimiser steps at a large lr; the parameters after, the stats, and the
    progress reported."""
    with torch.no_grad():
        start = [p.detach().clone() for p in params]
    seen: list[tuple[int, int]] = []
    stats = update_pass(
        ddpo_objective(pipe, trajectory, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), clip_range=10.0),
        torch.optim.SGD(params, lr=0.5),
        units=6,
        num_steps=4,
        timesteps_per_unit=2,
        train_batch_size=3,
        gradient_accumulation_steps=1,
        inner_epochs=2,
        max_grad_norm=1e9,
        generator=torch.Generator().manual_seed(0),
        target_kl=target_kl,
        on_step=lambda done, total: seen.append((done, total)),
    )
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    return after, stats, seen


def test_update_stops_before_the_step_whose_kl_to_the_sampling_policy_exceeds_target_kl(round_of_six) -> None:
    pipe, params, trajectory = round_of_six
    unbounded, all_steps, seen = _pass(pipe, params, trajectory, target_kl=None)
    assert all_steps.optimizer_steps == 4 and all_steps.approx_kl > 0
    assert seen == [(done, 4) for done in range(5)]  # 2 passes of 6 units in groups of 3
    loose, loose_stats, _ = _pass(pipe, params, trajectory, target_kl=1e9)  # never reached: the same update
    assert loose_stats.optimizer_steps == 4
    assert all(torch.equal(a, b) for a, b in zip(loose, unbounded, strict=True))
    # The first step sees the sampling policy itself (KL exactly 0 on a CPU) and is taken; the second
    # sees the moved policy and is not, nor anything after it in this pass or the next.
    one_step, stats, seen = _pass(pipe, params, trajectory, target_kl=1e-12)
    assert stats.optimizer_steps == 1 and seen == [(0, 4), (1, 4)]  # the bar ends where the update stops
    assert all(p.grad is None for p in params)  # the refused step's gradients are dropped
    start = [p.detach().clone() for p in params]
    assert not any(torch.equal(a, b) for a, b in zip(one_step, start, strict=True))  # it moved...
    assert not all(torch.equal(a, b) for a, b in zip(one_step, unbounded, strict=True))  # ...less far


def test_update_pass_raises_the_likelihood_of_advantaged_samples(round_of_six) -> None:
    pipe, params, trajectory = round_of_six
    advantage = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    rows = torch.arange(6).repeat_interleave(4)
    steps = torch.arange(4).repeat(6)
    with torch.no_grad():
        before = recompute_log_probs(pipe, trajectory, rows, steps).view(6, 4)
    assert torch.allclose(before, trajectory.log_probs, atol=1e-5)  # nothing trained yet: new == old
    update_pass(
        ddpo_objective(pipe, trajectory, advantage, clip_range=10.0),  # no clipping: a plain policy gradient
        torch.optim.SGD(params, lr=2e-3),
        units=6,
        num_steps=4,
        timesteps_per_unit=4,
        train_batch_size=6,
        gradient_accumulation_steps=1,
        inner_epochs=1,
        max_grad_norm=1e9,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        change = (recompute_log_probs(pipe, trajectory, rows, steps).view(6, 4) - before).mean(dim=1)
    assert change[advantage > 0].mean() > change[advantage < 0].mean()


def test_update_pass_refuses_more_timesteps_than_the_trajectory_has(round_of_six) -> None:
    pipe, params, trajectory = round_of_six
    with pytest.raises(ValueError, match="5 timesteps per unit exceed the 4 steps of a trajectory"):
        update_pass(
            ddpo_objective(pipe, trajectory, torch.zeros(6), clip_range=1e-4),
            torch.optim.SGD(params, lr=1e-3),
            units=6,
            num_steps=4,
            timesteps_per_unit=5,
            train_batch_size=2,
            gradient_accumulation_steps=1,
            inner_epochs=1,
            max_grad_norm=1.0,
            generator=torch.Generator(),
        )


def test_the_kl_to_base_penalty_pulls_the_policy_back_to_the_base_model(round_of_six) -> None:
    pipe, params, trajectory = round_of_six
    rows, steps = torch.arange(6).repeat_interleave(4), torch.arange(4).repeat(6)

    def kl_to_base() -> float:
        with torch.no_grad():
            mean, std, _ = recompute_step(pipe, trajectory, rows, steps)
            with adapters_disabled(pipe.unet):
                base, _, _ = recompute_step(pipe, trajectory, rows, steps)
        return gaussian_kl(mean, base, std).mean().item()

    before = kl_to_base()
    assert before > 0  # the fixture's LoRA is not the identity
    no_advantage = torch.zeros(6)
    assert ddpo_objective(pipe, trajectory, no_advantage, clip_range=1e-4)(rows, steps)[0].item() == 0.0
    loss, _, _ = ddpo_objective(pipe, trajectory, no_advantage, clip_range=1e-4, kl_to_base=2.0)(rows, steps)
    assert loss.item() == pytest.approx(2.0 * before, rel=1e-5)  # the penalty alone
    loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert kl_to_base() < before


def test_equal_rewards_give_zero_advantages_even_when_their_float_mean_is_not_them() -> None:
    rewards = torch.full((3,), 0.4900934100151062)  # mean() is 3e-8 off: (r - mean) / (std + 1e-8) = 0.75
    assert advantages(rewards, clip=5.0).tolist() == [0.0] * 3
    # one float32 step apart is no signal either (normalised, it was an advantage of 1.2)
    last_bits = torch.tensor([0.49009341, 0.49009341, 0.49009344, 0.49009341])
    assert advantages(last_bits, clip=5.0).tolist() == [0.0] * 4
    assert advantages(torch.tensor([0.49, 0.49, 0.4901, 0.49]), clip=5.0).abs().max() > 1  # a real spread
    # a reward that is not finite is left out, with advantage 0
    assert advantages(torch.tensor([1.0, float("nan"), 3.0]), clip=5.0).tolist() == [-1.0, 0.0, 1.0]


def test_the_gradient_norm_is_clipped_before_each_step() -> None:
    w = torch.nn.Parameter(torch.zeros(2))

    def objective(units: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return w @ torch.tensor([30.0, 40.0]), torch.tensor(0.0), torch.tensor(0.0)  # gradient norm 50

    update_pass(
        objective,
        torch.optim.SGD([w], lr=1.0),
        units=1,
        num_steps=1,
        timesteps_per_unit=1,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        inner_epochs=1,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8])  # the unit step along -g, not -g
