from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hero_ml.diffusion.lora import (
    ADAPTER_NAME,
    LORA_WEIGHTS_FILE,
    TARGET_MODULES,
    adapters_disabled,
    add_lora,
    load_lora,
    save_lora,
)
from hero_ml.diffusion.pipeline import build_random_pipeline


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    states = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([981, 21]), encoder_hidden_states=states).sample


def train_like_update(params: list[torch.nn.Parameter]) -> None:
    """Give the adapter non-trivial weights (it starts as the identity), as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_lora_sits_on_every_attention_projection_only(tiny_pipe: StableDiffusionPipeline) -> None:
    projections = {
        name
        for name, _ in tiny_pipe.unet.named_modules()
        if any(name.endswith("." + target) for target in TARGET_MODULES)
    }
    params = add_lora(tiny_pipe.unet, rank=4, alpha=4)
    adapted = {
        name.rsplit(".lora_", 1)[0] for name, p in tiny_pipe.unet.named_parameters() if p.requires_grad
    }
    assert adapted == projections and len(projections) > 0
    assert len(params) == 2 * len(projections)  # lora_A and lora_B each
    assert all(p.dtype == torch.float32 for p in params)


def test_new_adapter_is_the_identity(tiny_pipe: StableDiffusionPipeline) -> None:
    before = unet_output(tiny_pipe)
    add_lora(tiny_pipe.unet, rank=4, alpha=4)
    assert torch.equal(unet_output(tiny_pipe), before)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_lora_init_draws_a_at_its_scale_and_starts_as_the_identity(
    tiny_pipe: StableDiffusionPipeline, init: str
) -> None:
    before = unet_output(tiny_pipe)
    torch.manual_seed(0)
    add_lora(tiny_pipe.unet, rank=4, alpha=4, init=init)
    named = dict(tiny_pipe.unet.named_parameters())
    a_weights = [p.detach() for name, p in named.items() if ".lora_A." in name]
    assert all(torch.count_nonzero(p) == 0 for name, p in named.items() if ".lora_B." in name)
    if init == "gaussian":  # the reference's N(0, 1/rank^2)
        scaled = torch.cat([a.flatten() for a in a_weights])
        assert scaled.std().item() == pytest.approx(1 / 4, rel=0.05)
    else:  # peft's Kaiming-uniform (a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert all(a.abs().max() <= a.shape[1] ** -0.5 for a in a_weights)
        scaled = torch.cat([(a * (3 * a.shape[1]) ** 0.5).flatten() for a in a_weights])
        assert scaled.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(unet_output(tiny_pipe), before)


def test_adapter_params_stay_float32_on_a_half_precision_unet(tiny_pipe: StableDiffusionPipeline) -> None:
    tiny_pipe.unet.to(torch.bfloat16)
    params = add_lora(tiny_pipe.unet, rank=2, alpha=2)
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in tiny_pipe.unet.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("alpha", [4.0, 16.0])  # alpha != rank: the scale must survive the round trip
def test_saved_lora_loads_into_a_fresh_pipeline_with_identical_outputs(tmp_path: Path, alpha: float) -> None:
    trained = build_random_pipeline("tiny", seed=0)
    train_like_update(add_lora(trained.unet, rank=4, alpha=alpha))
    expected = unet_output(trained)
    assert not torch.equal(expected, unet_output(build_random_pipeline("tiny", seed=0)))

    save_lora(trained.unet, tmp_path)
    assert (tmp_path / LORA_WEIGHTS_FILE).is_file()

    ours = build_random_pipeline("tiny", seed=0)
    load_lora(ours, tmp_path)
    torch.testing.assert_close(unet_output(ours), expected, rtol=0, atol=1e-6)

    plain = build_random_pipeline("tiny", seed=0)
    plain.load_lora_weights(tmp_path)  # plain diffusers, no hero code
    torch.testing.assert_close(unet_output(plain), expected, rtol=0, atol=1e-6)


def test_disabled_adapters_give_the_base_model_exactly(tiny_pipe: StableDiffusionPipeline) -> None:
    base = unet_output(tiny_pipe)
    train_like_update(add_lora(tiny_pipe.unet, rank=4, alpha=4))
    adapted = unet_output(tiny_pipe)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(tiny_pipe.unet):
        assert torch.equal(unet_output(tiny_pipe), base)
    assert torch.equal(unet_output(tiny_pipe), adapted)  # re-enabled on exit


def test_a_file_diffusers_would_silently_ignore_is_an_error(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    # unet.save_lora_adapter writes keys without the 'unet.' prefix: pipe.load_lora_weights loads nothing.
    trained = build_random_pipeline("tiny", seed=0)
    add_lora(trained.unet, rank=4, alpha=4)
    trained.unet.save_lora_adapter(tmp_path, adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="no UNet LoRA weights"):
        load_lora(tiny_pipe, tmp_path)


def test_a_missing_or_damaged_weights_file_is_named(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=f"no LoRA weights at {tmp_path / LORA_WEIGHTS_FILE}"):
        load_lora(tiny_pipe, tmp_path)
    trained = build_random_pipeline("tiny", seed=0)
    add_lora(trained.unet, rank=4, alpha=4)
    weights = save_lora(trained.unet, tmp_path)
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(
        ValueError, match=r"pytorch_lora_weights.safetensors is not a readable safetensors file"
    ):
        load_lora(tiny_pipe, tmp_path)
