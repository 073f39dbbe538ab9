import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hero_ml.d3po import d3po_loss, d3po_objective, preference_pairs
from hero_ml.ddpo import update_pass
from hero_ml.diffusion.lora import adapters_disabled, add_lora
from hero_ml.diffusion.sampler import per_image_generators, recompute_log_probs, sample_trajectories


def test_d3po_loss_on_a_hand_computed_case() -> None:
    ref = torch.zeros(2)
    winner = torch.tensor([math.log(1.05), math.log(1.3)], requires_grad=True)
    loser = torch.tensor([math.log(0.98), math.log(0.5)])
    loss, approx_kl, clip_fraction = d3po_loss(winner, ref, loser, ref, beta=0.1, eps=0.1)

    def nll(x: float) -> float:
        return -math.log(1 / (1 + math.exp(-x)))

    # pair 1 inside the clip; pair 2 clipped to 1.1 over 0.9
    expected = (nll(0.1 * (math.log(1.05) - math.log(0.98))) + nll(0.1 * (math.log(1.1) - math.log(0.9)))) / 2
    assert loss.item() == pytest.approx(expected)
    squares = [math.log(r) ** 2 for r in (1.05, 1.3, 0.98, 0.5)]
    assert approx_kl.item() == pytest.approx(0.5 * sum(squares) / 4)
    assert clip_fraction.item() == 0.5
    loss.backward()
    assert winner.grad is not None
    # d/dw of -log sigmoid(beta (w - l)) / 2 pairs = -beta (1 - sigmoid(beta (w - l))) / 2 for the
    # unclipped winner (log clip(exp w) = w); the clipped one is flat
    diff = math.log(1.05) - math.log(0.98)
    assert winner.grad.tolist() == pytest.approx([-0.1 * (1 - 1 / (1 + math.exp(-0.1 * diff))) / 2, 0.0])


def test_preference_pairs_cover_every_labelled_image() -> None:
    pairs = preference_pairs([0, 1, 2], [5], torch.Generator().manual_seed(0))
    assert (
        pairs.shape == (3, 2)
        and sorted(pairs[:, 0].tolist()) == [0, 1, 2]
        and set(pairs[:, 1].tolist()) == {5}
    )
    pairs = preference_pairs([4], [0, 1, 2, 3, 5], torch.Generator().manual_seed(0))
    assert pairs.shape == (5, 2) and sorted(pairs[:, 1].tolist()) == [0, 1, 2, 3, 5]
    for good, bad in (([3, 7], [0, 1, 2]), ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9]), ([0, 1, 2], [3, 4, 5])):
        pairs = preference_pairs(good, bad, torch.Generator().manual_seed(1))
        count = max(len(good), len(bad))
        winners, losers = pairs[:, 0].tolist(), pairs[:, 1].tolist()
        assert pairs.shape == (count, 2) and set(winners) == set(good) and set(losers) == set(bad)
        # the shorter side cycles whole: no image appears twice before every one has appeared once
        for side, images in ((winners, good), (losers, bad)):
            assert max(side.count(i) for i in images) - min(side.count(i) for i in images) <= 1
        assert torch.equal(pairs, preference_pairs(good, bad, torch.Generator().manual_seed(1)))
    assert preference_pairs([], [1, 2], torch.Generator()).shape == (0, 2)
    assert preference_pairs([1, 2], [], torch.Generator()).shape == (0, 2)


def test_d3po_starts_at_the_reference_and_learns_the_preference(tiny_pipe: StableDiffusionPipeline) -> None:
    torch.manual_seed(0)
    params = add_lora(tiny_pipe.unet, rank=4, alpha=4)
    trajectory = sample_trajectories(
        tiny_pipe, ["a red circle"] * 4, per_image_generators(0, 4), num_steps=4, guidance_scale=5.0, eta=1.0
    )
    pairs = torch.tensor([[0, 1], [2, 3]])
    objective = d3po_objective(tiny_pipe, trajectory, pairs, beta=0.1, eps=0.1)
    loss, approx_kl, _ = objective(torch.tensor([0, 1]), torch.tensor([0, 3]))
    assert approx_kl.item() == 0.0  # a fresh LoRA is the identity: the policy is the reference
    assert loss.item() == pytest.approx(math.log(2))

    rows, steps = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)

    def log_ratio() -> torch.Tensor:
        with torch.no_grad():
            policy = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
            with adapters_disabled(tiny_pipe.unet):
                reference = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
        return (policy - reference).view(4, 4).mean(dim=1)

    update_pass(
        objective,
        torch.optim.SGD(params, lr=0.5),
        units=2,
        num_steps=4,
        timesteps_per_unit=4,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        inner_epochs=1,
        max_grad_norm=1e9,
        generator=torch.Generator().manual_seed(0),
    )
    after = log_ratio()
    assert after[[0, 2]].mean() > after[[1, 3]].mean()  # winners now likelier, relative to the reference


def test_d3po_objective_scores_each_pair_at_one_step_against_the_frozen_base(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    torch.manual_seed(0)
    params = add_lora(tiny_pipe.unet, rank=4, alpha=4)
    with torch.no_grad():  # a trained LoRA: the policy is not the reference any more
        for param in params:
            param.add_(0.2 * torch.randn_like(param))
    trajectory = sample_trajectories(
        tiny_pipe, ["a red circle"] * 4, per_image_generators(0, 4), num_steps=4, guidance_scale=5.0, eta=1.0
    )
    pairs = torch.tensor([[0, 1], [2, 3], [3, 0]])
    units, steps = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 1])
    loss, approx_kl, clip_fraction = d3po_objective(tiny_pipe, trajectory, pairs, beta=0.1, eps=0.1)(
        units, steps
    )

    # each side scored independently: a pair's winner and loser at the pair's own step
    with torch.no_grad():
        policy = [recompute_log_probs(tiny_pipe, trajectory, pairs[:, side], steps) for side in (0, 1)]
        with adapters_disabled(tiny_pipe.unet):
            base = [recompute_log_probs(tiny_pipe, trajectory, pairs[:, side], steps) for side in (0, 1)]
    expected = d3po_loss(policy[0], base[0], policy[1], base[1], beta=0.1, eps=0.1)
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(approx_kl, expected[1])
    torch.testing.assert_close(clip_fraction, expected[2])
    assert approx_kl.item() > 0  # measured against the base, not against itself
