from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from hero_ml.diffusion.pipeline import load_pipeline
from hero_ml.diffusion.sampler import (
    Trajectory,
    guided_noise_pred,
    per_image_generators,
    recompute_log_probs,
    recompute_step,
    sample_trajectories,
)

PROMPTS = ["three red circles", "a blue square", "two green triangles", "a yellow circle"]
STEPS = 6
CFG = 5.0


def sample(pipe: StableDiffusionPipeline, **kwargs: object) -> Trajectory:
    options: dict = {"num_steps": STEPS, "guidance_scale": CFG, "eta": 1.0, "sub_batch_size": 4}
    options.update(kwargs)
    return sample_trajectories(pipe, PROMPTS, per_image_generators(7, len(PROMPTS)), **options)


def test_matches_plain_diffusers_pipeline_with_same_noises(tiny_pipe: StableDiffusionPipeline) -> None:
    x_T = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trajectory = sample(tiny_pipe, initial_noise=x_T, sub_batch_size=3)

    reference = dict(num_inference_steps=STEPS, guidance_scale=CFG, eta=1.0, latents=x_T)
    latents = tiny_pipe(PROMPTS, generator=per_image_generators(7, 4), output_type="latent", **reference)
    images = tiny_pipe(PROMPTS, generator=per_image_generators(7, 4), output_type="np", **reference)

    torch.testing.assert_close(trajectory.latents[:, -1], latents.images, rtol=1e-4, atol=1e-4)
    expected_images = torch.from_numpy(images.images * 255).round()
    assert (trajectory.images.float() - expected_images).abs().max() <= 1  # uint8 rounding
    torch.testing.assert_close(trajectory.initial_noise, x_T)


def test_drawn_initial_noise_matches_the_pipeline_drawing_it(tiny_pipe: StableDiffusionPipeline) -> None:
    trajectory = sample(tiny_pipe)
    plain = tiny_pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        eta=1.0,
        generator=per_image_generators(7, 4),
        output_type="latent",
    )
    torch.testing.assert_close(trajectory.latents[:, -1], plain.images, rtol=1e-4, atol=1e-4)


def test_trajectory_shapes_and_contents(tiny_pipe: StableDiffusionPipeline) -> None:
    trajectory = sample(tiny_pipe)
    assert len(trajectory) == 4 and trajectory.num_steps == STEPS
    assert trajectory.latents.shape == (4, STEPS + 1, 4, 16, 16)
    assert trajectory.log_probs.shape == (4, STEPS) and trajectory.log_probs.isfinite().all()
    assert trajectory.images.shape == (4, 32, 32, 3) and trajectory.images.dtype == torch.uint8
    assert trajectory.prompt_embeds.shape == trajectory.negative_prompt_embeds.shape == (4, 77, 32)
    assert trajectory.timesteps.tolist() == tiny_pipe.scheduler.timesteps.tolist()
    assert torch.equal(trajectory.final_step_input, trajectory.latents[:, STEPS - 1])
    assert trajectory.latents.device.type == "cpu"


# (eta, CFG scale): HERO's, and others: training must use the trajectory's own, not the defaults
SETTINGS = [(1.0, CFG), (0.5, 3.0)]


@pytest.mark.parametrize(("eta", "scale"), SETTINGS)
def test_recorded_log_probs_equal_recomputed_on_a_mixed_timestep_batch(
    tiny_pipe: StableDiffusionPipeline, eta: float, scale: float
) -> None:
    trajectory = sample(tiny_pipe, eta=eta, guidance_scale=scale)
    # Every sample at a different step, as in a DDPO training batch.
    rows, steps = torch.arange(4), torch.tensor([0, 2, 4, STEPS - 1])
    with torch.no_grad():
        recomputed = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
    torch.testing.assert_close(recomputed, trajectory.log_probs[rows, steps], rtol=1e-5, atol=1e-5)


def cfg_prediction_by_hand(
    pipe: StableDiffusionPipeline, trajectory: Trajectory, rows: torch.Tensor, step: int, scale: float
) -> torch.Tensor:
    """The guided epsilon as diffusers' pipeline forms it: one UNet call per branch, then CFG."""
    x_t, t = trajectory.latents[rows, step], trajectory.timesteps[step]
    uncond = pipe.unet(x_t, t, encoder_hidden_states=trajectory.negative_prompt_embeds[rows]).sample
    cond = pipe.unet(x_t, t, encoder_hidden_states=trajectory.prompt_embeds[rows]).sample
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize(("eta", "scale"), SETTINGS)
def test_recompute_is_diffusers_step_of_the_guided_prediction(
    tiny_pipe: StableDiffusionPipeline, eta: float, scale: float
) -> None:
    trajectory = sample(tiny_pipe, eta=eta, guidance_scale=scale)
    rows, steps = torch.tensor([3, 1]), torch.tensor([2, 2])
    x_t, x_prev = trajectory.latents[rows, 2], trajectory.latents[rows, 3]
    t = trajectory.timesteps[2]
    scheduler = tiny_pipe.scheduler
    with torch.no_grad():
        eps = cfg_prediction_by_hand(tiny_pipe, trajectory, rows, 2, scale)
        # diffusers' own step with the noise switched off is the mean; eta^2 x its variance the std's square
        expected_mean = scheduler.step(eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
        expected_std = eta * scheduler._get_variance(t, t - 1000 // STEPS).sqrt()
        mean, std, target = recompute_step(tiny_pipe, trajectory, rows, steps)
        log_probs = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std.flatten(), expected_std.expand(2), rtol=1e-5, atol=0)
    assert torch.equal(target, x_prev)
    expected = torch.distributions.Normal(expected_mean, expected_std).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_probs, expected, rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_is_the_conditional_prediction(tiny_pipe: StableDiffusionPipeline) -> None:
    trajectory = sample(tiny_pipe)
    rows, t = torch.arange(4), trajectory.timesteps[1].repeat(4)
    with torch.no_grad():
        shortcut = guided_noise_pred(
            tiny_pipe.unet,
            trajectory.latents[rows, 1],
            t,
            trajectory.prompt_embeds,
            trajectory.negative_prompt_embeds,
            1.0,
        )
        full = cfg_prediction_by_hand(tiny_pipe, trajectory, rows, 1, 1.0)
    torch.testing.assert_close(shortcut, full, rtol=1e-4, atol=1e-5)


def test_low_precision_storage_keeps_log_probs_exact(tiny_pipe: StableDiffusionPipeline) -> None:
    trajectory = sample(tiny_pipe, storage_dtype=torch.bfloat16)
    assert trajectory.latents.dtype == torch.bfloat16
    rows, steps = torch.arange(4), torch.full((4,), 2)
    with torch.no_grad():
        recomputed = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
    torch.testing.assert_close(recomputed, trajectory.log_probs[rows, steps], rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_sub_batch_size(tiny_pipe: StableDiffusionPipeline) -> None:
    whole = sample(tiny_pipe, sub_batch_size=4)
    split = sample(tiny_pipe, sub_batch_size=1)
    torch.testing.assert_close(whole.latents, split.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole.log_probs, split.log_probs, rtol=1e-4, atol=1e-4)


def test_same_seed_same_trajectory_other_seed_other(tiny_pipe: StableDiffusionPipeline) -> None:
    first, second = sample(tiny_pipe), sample(tiny_pipe)
    assert torch.equal(first.latents, second.latents)
    other = sample_trajectories(
        tiny_pipe, PROMPTS, per_image_generators(8, 4), num_steps=STEPS, guidance_scale=CFG, eta=1.0
    )
    assert not torch.allclose(first.latents[:, 0], other.latents[:, 0])


def test_eta_zero_is_refused_with_the_reason(tiny_pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="eta = 0 is deterministic"):
        sample(tiny_pipe, eta=0.0)


def test_wrong_initial_noise_shape_is_refused(tiny_pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match=r"expected \(4, 4, 16, 16\)"):
        sample(tiny_pipe, initial_noise=torch.zeros(4, 4, 8, 8))


def test_one_generator_per_image_is_required(tiny_pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="one generator per image"):
        sample_trajectories(
            tiny_pipe, PROMPTS, per_image_generators(0, 3), num_steps=2, guidance_scale=1, eta=1
        )


def test_save_and_load_round_trip(tiny_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    trajectory = sample(tiny_pipe, num_steps=2)
    trajectory.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    assert loaded.prompts == trajectory.prompts
    assert (loaded.eta, loaded.guidance_scale) == (trajectory.eta, trajectory.guidance_scale)
    for name in ("latents", "log_probs", "timesteps", "prompt_embeds", "negative_prompt_embeds", "images"):
        assert torch.equal(getattr(loaded, name), getattr(trajectory, name)), name


def test_loading_a_foreign_safetensors_file_fails_clearly(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a hero-trajectory/1 file"):
        Trajectory.load(tmp_path / "other.safetensors")


def test_per_image_generators_are_independent_and_reproducible() -> None:
    a = [torch.randn(3, generator=g) for g in per_image_generators(1, 3)]
    b = [torch.randn(3, generator=g) for g in per_image_generators(1, 3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    # (seed, index) streams do not collide across neighbouring seeds, unlike seed + index would.
    c = [torch.randn(3, generator=g) for g in per_image_generators(2, 3)]
    assert not any(torch.equal(x, y) for x in a for y in c)


def test_loading_an_incomplete_trajectory_names_what_is_missing(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    trajectory = sample(tiny_pipe, num_steps=2)
    metadata = {"format": "hero-trajectory/1", "prompts": "[]", "eta": "1.0", "guidance_scale": "5.0"}
    save_file({"latents": trajectory.latents}, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"missing \['images', 'log_probs'"):
        Trajectory.load(tmp_path / "cut.safetensors")


def test_recomputed_log_probs_carry_gradients_to_the_lora_only(tiny_pipe: StableDiffusionPipeline) -> None:
    from hero_ml.diffusion.lora import add_lora

    trajectory = sample(tiny_pipe)
    params = add_lora(tiny_pipe.unet, rank=4, alpha=4)  # identity at start: the ratio new/old is 1
    rows, steps = torch.arange(4), torch.tensor([1, 3, 0, 5])
    log_prob = recompute_log_probs(tiny_pipe, trajectory, rows, steps)
    torch.testing.assert_close(log_prob.detach(), trajectory.log_probs[rows, steps], rtol=1e-5, atol=1e-5)
    log_prob.sum().backward()
    lora_b_grads = [p.grad for name, p in tiny_pipe.unet.named_parameters() if "lora_B" in name]
    assert lora_b_grads and all(g is not None for g in lora_b_grads)
    assert sum(g.abs().sum() for g in lora_b_grads) > 0
    assert all(p.grad is None for p in tiny_pipe.unet.parameters() if not p.requires_grad)
    assert len(params) == 2 * len(lora_b_grads)


def test_half_precision_model_samples_with_float32_log_probs() -> None:
    # The GPU configuration in miniature: bf16 weights, float32 step math and stored trajectory.
    pipe = load_pipeline("random:tiny", dtype=torch.bfloat16)
    trajectory = sample_trajectories(
        pipe, PROMPTS[:2], per_image_generators(0, 2), num_steps=2, guidance_scale=CFG, eta=1.0
    )
    assert trajectory.latents.dtype == torch.float32 and trajectory.log_probs.dtype == torch.float32
    assert trajectory.log_probs.isfinite().all()
    with torch.no_grad():
        recomputed = recompute_log_probs(pipe, trajectory, torch.arange(2), torch.tensor([0, 1]))
    torch.testing.assert_close(recomputed, trajectory.log_probs[torch.arange(2), torch.tensor([0, 1])])
