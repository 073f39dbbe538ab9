"""Loading Stable Diffusion pipelines: from a local folder, a hub id, or random weights of a named shape.

Every pipeline leaves here with a DDIMScheduler (HERO samples with DDIM, eta > 0) and no safety checker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub.errors import HFValidationError
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hero_ml.diffusion.architectures import architecture_dir
from hero_ml.errors import HeroError

if TYPE_CHECKING:
    from hero_ml.config import ModelConfig

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
TOY_SOURCE = "toy"  # the committed toy model (hero_ml/toy/pretrained), the embedded default
TOY_FOLDER = Path(__file__).parent.parent / "toy" / "pretrained"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(HeroError, FileNotFoundError):
    """The requested pipeline is neither a local folder nor available offline."""


class DeviceUnavailableError(HeroError, RuntimeError):
    """The configured torch device does not exist on this machine."""


def load_pipeline(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    compile_unet: bool = False,
    given_by: str = "model.source",
) -> StableDiffusionPipeline:
    """Load an SD-family pipeline.

    source: a local diffusers folder, a hub id ('org/name', looked up in the local Hugging Face cache
    unless allow_download: model.allow_download, which the error of a missing one offers), 'toy' for
    the committed toy model, or 'random:<arch>' for random weights of a named architecture.
    channels_last and compile_unet: see ModelConfig. given_by: the setting or flag `source` came from,
    which an error tells the user to change.
    """
    pipe = _load(
        source, dtype=dtype, device=device, allow_download=allow_download, seed=seed, given_by=given_by
    )
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet.compile()  # in place: parameter names (and so checkpoints) stay those of the UNet
    return pipe


def load_configured_pipeline(model: ModelConfig) -> StableDiffusionPipeline:
    """The pipeline a run's `model` config section describes, progress bars off."""
    pipe = load_pipeline(
        model.source,
        dtype=DTYPES[model.dtype],
        device=model.device,
        allow_download=model.allow_download,
        seed=model.seed,
        channels_last=model.channels_last,
        compile_unet=model.compile,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_sha256(pipe: StableDiffusionPipeline) -> dict[str, str]:
    """sha256 of each model's weights as loaded (names, dtypes, shapes and bytes, in name order): the
    fingerprint a resumed run compares, so that it never learns rounds sampled by one model on another.
    Independent of the device and of an in-place compile; taken before a LoRA is added."""
    digests = {}
    for name in ("unet", "text_encoder", "vae"):
        digest = hashlib.sha256()
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        digests[name] = digest.hexdigest()
    return digests


def _load(
    source: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    allow_download: bool,
    seed: int,
    given_by: str,
) -> StableDiffusionPipeline:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device} was asked for but torch sees no CUDA GPU (torch {torch.__version__}); "
            "set model.device=cpu (HERO_MODEL__DEVICE=cpu) or install a CUDA build of torch"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {device} was asked for but torch sees {torch.cuda.device_count()} CUDA GPUs "
            "(cuda:0 ...); set model.device to one of them"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(
            f"device {device} was asked for but this torch has no usable MPS backend; set model.device=cpu "
            "(HERO_MODEL__DEVICE=cpu)"
        )
    if source.startswith(RANDOM_PREFIX):
        pipe = build_random_pipeline(source.removeprefix(RANDOM_PREFIX), seed=seed, device=device)
        if dtype != torch.float32:  # built in float32; casting a float32 model to itself only warns
            pipe = pipe.to(dtype=dtype)
        return pipe

    path = TOY_FOLDER if source == TOY_SOURCE else Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{given_by} {str(path)!r} is not a diffusers pipeline folder (no model_index.json): "
                "give a folder written by StableDiffusionPipeline.save_pretrained"
            )
        try:
            pipe = _from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as err:  # a component's weights missing or truncated, a broken JSON
            raise ModelNotFoundError(
                f"{given_by} {str(path)!r}: cannot load the pipeline folder: {str(err).rstrip('.')}. "
                f"Write it again (StableDiffusionPipeline.save_pretrained) or point {given_by} elsewhere."
            ) from None
    elif source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise ModelNotFoundError(
            f"{given_by} {source!r}: no such folder. Give an existing diffusers folder, a hub id like "
            "'runwayml/stable-diffusion-v1-5', or 'random:tiny'."
        )
    else:
        try:
            pipe = _from_pretrained(source, dtype=dtype, local_files_only=not allow_download)
        except HFValidationError:  # a ValueError: e.g. 'models:/x@y' given where a model is loaded
            raise ModelNotFoundError(
                f"{given_by} {source!r} is neither a folder nor a hub id (owner/name of letters, digits, "
                "'-', '_', '.'): a registered LoRA is generated from with `hero generate models:/…`"
            ) from None
        except OSError as err:
            how = (
                "the download failed; check the network and the id"
                if allow_download
                else "it is not in the local Hugging Face cache and downloads are off. Download it "
                f"once (`hf download {source}`), point {given_by} at a local folder, or set "
                "model.allow_download=true (HERO_MODEL__ALLOW_DOWNLOAD=true)"
            )
            raise ModelNotFoundError(f"{given_by} {source!r}: cannot load the model: {how}.") from err
    return pipe.to(device)


def _from_pretrained(
    name_or_path: str, *, dtype: torch.dtype, local_files_only: bool
) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        name_or_path,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=local_files_only,
    )
    if not isinstance(pipe.scheduler, DDIMScheduler):
        log.info("replacing %s with DDIMScheduler (same config)", type(pipe.scheduler).__name__)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_random_pipeline(
    arch: str, *, seed: int = 0, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """An SD pipeline of the named architecture with seeded random weights, from real diffusers classes.

    Weights are initialised on `device` (seconds on a GPU instead of half a minute on a CPU for sd15),
    so the same seed gives different weights on different device types.
    The tokenizer is byte-level with no merges (one token per character): random weights need no
    learned vocabulary, and nothing has to be downloaded.
    """
    folder = architecture_dir(arch)
    configs = {name: json.loads((folder / f"{name}.json").read_text()) for name in _COMPONENTS}
    tokenizer = byte_level_tokenizer(configs["text_encoder"]["max_position_embeddings"])
    text_config = CLIPTextConfig(**configs["text_encoder"])
    if text_config.vocab_size < len(tokenizer):
        raise ValueError(f"{arch}: text encoder vocab_size is smaller than the tokenizer's {len(tokenizer)}")

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel.from_config(configs["unet"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def byte_level_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer over the 256 byte-level symbols (plus their end-of-word forms) and BOS/EOS."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
