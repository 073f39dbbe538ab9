import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from hero_ml.config import ModelConfig
from hero_ml.diffusion.architectures import architecture_dir
from hero_ml.diffusion.pipeline import (
    DeviceUnavailableError,
    ModelNotFoundError,
    build_random_pipeline,
    load_configured_pipeline,
    load_pipeline,
)
from hero_ml.diffusion.sampler import guided_noise_pred, per_image_generators, sample_trajectories


def test_sd15_configs_have_the_published_parameter_counts() -> None:
    folder = architecture_dir("sd15")
    with init_empty_weights():  # meta tensors: counts without allocating 4 GB
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig(**json.loads((folder / "text_encoder.json").read_text())))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_random_pipeline_is_seeded_and_uses_ddim(tiny_pipe: StableDiffusionPipeline) -> None:
    again = build_random_pipeline("tiny", seed=0)
    other = build_random_pipeline("tiny", seed=1)
    weight = "conv_in.weight"
    assert torch.equal(tiny_pipe.unet.state_dict()[weight], again.unet.state_dict()[weight])
    assert not torch.equal(tiny_pipe.unet.state_dict()[weight], other.unet.state_dict()[weight])
    assert isinstance(tiny_pipe.scheduler, DDIMScheduler)
    assert tiny_pipe.safety_checker is None


def test_byte_level_tokenizer_fits_the_text_encoder(tiny_pipe: StableDiffusionPipeline) -> None:
    ids = tiny_pipe.tokenizer("three red circles").input_ids
    assert ids[0] == tiny_pipe.tokenizer.bos_token_id and ids[-1] == tiny_pipe.tokenizer.eos_token_id
    assert len(ids) == len("threeredcircles") + 2  # one token per character (spaces split words)
    assert max(ids) < tiny_pipe.text_encoder.config.vocab_size


def test_saved_folder_loads_with_plain_diffusers_and_ours(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    tiny_pipe.save_pretrained(tmp_path)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    ours = load_pipeline(str(tmp_path))
    for loaded in (plain, ours):
        for name, tensor in tiny_pipe.unet.state_dict().items():
            assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert isinstance(ours.scheduler, DDIMScheduler)


def test_a_non_ddim_scheduler_is_replaced_with_ddim_of_the_same_config(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    tiny_pipe.scheduler = PNDMScheduler.from_config(tiny_pipe.scheduler.config)
    tiny_pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"


def test_load_random_architecture_in_a_dtype() -> None:
    pipe = load_pipeline("random:tiny", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16


def test_a_hub_id_missing_offline_says_how_to_provide_it() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_pipeline("nobody-here/no-such-model")
    message = str(caught.value)
    assert "not in the local Hugging Face cache" in message
    assert "HERO_MODEL__ALLOW_DOWNLOAD=true" in message and "hf download" in message


def test_a_missing_local_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=f"model.source '{tmp_path / 'nope'}': no such folder"):
        load_pipeline(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match=f"--model '{tmp_path}' is not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path), given_by="--model")  # the flag it came from, not a setting


@pytest.mark.parametrize("damage", ["unet weights removed", "unet weights truncated", "model_index broken"])
def test_a_damaged_pipeline_folder_is_named(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path, damage: str
) -> None:
    tiny_pipe.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "unet weights removed":
        weights.unlink()
    elif damage == "unet weights truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(
        ModelNotFoundError,
        match=f"model.source '{tmp_path}': cannot load the pipeline folder: .*Write it again",
    ):
        load_pipeline(str(tmp_path))


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model_index\.json"):
        load_pipeline(str(tmp_path))


def test_an_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'sdxl'"):
        load_pipeline("random:sdxl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_gpu_says_what_to_set() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"HERO_MODEL__DEVICE=cpu"):
        load_pipeline("random:tiny", device="cuda")
    if not torch.backends.mps.is_available():  # this machine's (CPU) build; a Mac with MPS skips this
        with pytest.raises(DeviceUnavailableError, match=r"no usable MPS backend.*HERO_MODEL__DEVICE=cpu"):
            load_pipeline("random:tiny", device="mps")


def test_sd15_builds_from_real_classes_and_runs_a_guided_step() -> None:
    # About 30 s and 5 GB on a 2-core CPU: the real published configs, not only their counts.
    pipe = build_random_pipeline("sd15", seed=0)
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 512
    prompt_embeds, negative_embeds = pipe.encode_prompt(["a blue rose"], "cpu", 1, True, negative_prompt=[""])
    assert prompt_embeds.shape == (1, 77, 768)
    # any multiple of 8 runs; 64x64 latents would cost minutes here
    small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([981])
    with torch.no_grad():
        out = guided_noise_pred(pipe.unet, small, t, prompt_embeds, negative_embeds, 5.0)
        cond = pipe.unet(small, t, encoder_hidden_states=prompt_embeds).sample
        uncond = pipe.unet(small, t, encoder_hidden_states=negative_embeds).sample
    assert out.isfinite().all()
    torch.testing.assert_close(out, uncond + 5.0 * (cond - uncond), rtol=1e-4, atol=1e-4)  # one batch vs two


def test_a_failed_download_says_so() -> None:
    # HF_HUB_OFFLINE=1 (set for every test) makes the download fail as a closed network would.
    with pytest.raises(ModelNotFoundError, match="the download failed"):
        load_pipeline("nobody-here/no-such-model", allow_download=True)


def test_channels_last_changes_the_layout_not_the_samples() -> None:
    plain = load_configured_pipeline(ModelConfig(source="random:tiny"))
    fast = load_configured_pipeline(ModelConfig(source="random:tiny", channels_last=True))
    for pipe, expected in ((plain, False), (fast, True)):
        for conv in (pipe.unet.conv_in.weight, pipe.vae.decoder.conv_in.weight):
            assert conv.is_contiguous(memory_format=torch.channels_last) is expected

    def sample(pipe: StableDiffusionPipeline) -> torch.Tensor:
        return sample_trajectories(
            pipe, ["a red circle"] * 2, per_image_generators(0, 2), num_steps=3, guidance_scale=5.0, eta=1.0
        ).latents

    torch.testing.assert_close(sample(fast), sample(plain), rtol=1e-4, atol=1e-4)
