import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.distributions import Normal, kl_divergence

from hero_ml.diffusion.ddim import check_scheduler, ddim_step_mean_std, gaussian_kl, gaussian_log_prob

SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def make_scheduler(num_steps: int = 10, **overrides: object) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, **overrides})
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_gaussian_log_prob_hand_computed() -> None:
    # Two samples of two elements. Sample 0: x = mean (z = 0) and z = 1 with std 1:
    # mean of [-log sqrt(2 pi), -0.5 - log sqrt(2 pi)] = -0.25 - 0.9189385...
    # Sample 1: std 2, x - mean = 2 and 0: mean of [-0.5 - log 2 - c, -log 2 - c].
    c = 0.5 * math.log(2 * math.pi)
    x = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([[1.0], [2.0]])
    expected = torch.tensor([-0.25 - c, -0.25 - math.log(2) - c])
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_gaussian_log_prob_equals_torch_normal_mean_over_elements() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=gen)
    mean = torch.randn(3, 4, 5, 5, generator=gen)
    std = torch.rand(3, 1, 1, 1, generator=gen) + 0.1
    expected = Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


@pytest.mark.parametrize("eta", [0.3, 1.0])  # below 1 the std and diffusers' variance differ
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_mean_and_std_reproduce_diffusers_ddim_step(prediction_type: str, eta: float) -> None:
    scheduler = make_scheduler(prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:  # includes the last step, where alpha_prev is final_alpha_cumprod
        sample = torch.randn(2, 4, 8, 8, generator=gen)
        model_output = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        mean, std = ddim_step_mean_std(scheduler, model_output, t.expand(2), sample, eta=eta)
        torch.testing.assert_close(mean + std * noise, expected, rtol=1e-5, atol=1e-5)


def test_std_is_eta_times_ddim_sigma_hand_computed() -> None:
    scheduler = make_scheduler(num_steps=10)
    t, prev_t = 901, 801  # leading spacing with steps_offset 1: 901, 801, ..., 1
    a_t, a_prev = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[prev_t].item()
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    sample = torch.zeros(1, 4, 2, 2)
    _, std = ddim_step_mean_std(scheduler, sample, torch.tensor([t]), sample, eta=0.5)
    assert std.item() == pytest.approx(0.5 * sigma, rel=1e-5)


def step_log_prob(scheduler, output, timesteps, sample, prev) -> torch.Tensor:
    mean, std = ddim_step_mean_std(scheduler, output, timesteps, sample, eta=1.0)
    return gaussian_log_prob(prev, mean, std)


def test_mixed_timesteps_in_one_batch_equal_one_at_a_time() -> None:
    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(2)
    timesteps = scheduler.timesteps[torch.tensor([0, 4, 9])]
    sample, output, prev = (torch.randn(3, 4, 6, 6, generator=gen) for _ in range(3))
    together = step_log_prob(scheduler, output, timesteps, sample, prev)
    alone = torch.cat(
        [
            step_log_prob(
                scheduler, output[i : i + 1], timesteps[i : i + 1], sample[i : i + 1], prev[i : i + 1]
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(together, alone)
    assert together.shape == (3,)


def test_gaussian_kl_is_the_normal_kl_averaged_over_elements() -> None:
    mean_p = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -1.0]]]])
    mean_q = torch.tensor([[[[0.5, 1.0]]], [[[0.0, 0.0]]]])
    std = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    # (0.25 / 0.5 + 0) / 2 = 0.25; (4 / 8 + 1 / 8) / 2 = 0.3125
    assert gaussian_kl(mean_p, mean_q, std).tolist() == [0.25, 0.3125]
    expected = kl_divergence(Normal(mean_p, std.expand_as(mean_p)), Normal(mean_q, std.expand_as(mean_q)))
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), expected.mean(dim=(1, 2, 3)))


def test_scheduler_settings_outside_the_math_are_refused() -> None:
    with pytest.raises(ValueError, match="clip_sample=False"):
        check_scheduler(make_scheduler(clip_sample=True))
    with pytest.raises(ValueError, match="prediction_type"):
        check_scheduler(make_scheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="set_alpha_to_one=True makes the last DDIM step deterministic"):
        check_scheduler(make_scheduler(set_alpha_to_one=True))
    with pytest.raises(ValueError, match="zero terminal SNR needs prediction_type 'v_prediction'"):
        check_scheduler(make_scheduler(rescale_betas_zero_snr=True))
    check_scheduler(make_scheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="thresholding=False"):
        check_scheduler(make_scheduler(thresholding=True))
    with pytest.raises(TypeError, match="HERO samples with DDIMScheduler, got DDPMScheduler"):
        check_scheduler(DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}))
    unset = DDIMScheduler(**SD_SCHEDULER)
    with pytest.raises(ValueError, match="set_timesteps"):
        check_scheduler(unset)
