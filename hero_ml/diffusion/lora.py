"""LoRA on the UNet's attention projections, through peft, saved in the standard diffusers format.

A saved folder holds `pytorch_lora_weights.safetensors`, loadable by plain diffusers with
`pipe.load_lora_weights(folder)`; rank and alpha travel in the file's metadata so the scale is exact.
The base policy (DDPO's and D3PO's reference) is the same UNet with its adapters disabled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ADAPTER_NAME = "hero"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


# config model.lora_init -> peft's init_lora_weights: Kaiming-uniform A (peft's default), or N(0, 1/rank^2)
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}


def add_lora(
    unet: UNet2DConditionModel, *, rank: int, alpha: float, init: str = "kaiming"
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a LoRA adapter to every attention projection, return its parameters.

    The adapter starts as the identity (B = 0; `init` draws A). Its parameters are float32 whatever
    the UNet's dtype, so that small updates are not lost to fp16/bf16 rounding.
    """
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, init_lora_weights=LORA_INITS[init]
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def remove_lora(unet: UNet2DConditionModel) -> None:
    """Take the adapter off again (an engine that failed to load: the UNet takes another one)."""
    unet.delete_adapters(ADAPTER_NAME)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' key names (without the 'unet.' prefix)."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return convert_state_dict_to_diffusers(state)


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write the adapter as `folder/pytorch_lora_weights.safetensors` (diffusers format)."""
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
        safe_serialization=True,
    )
    return folder / LORA_WEIGHTS_FILE


def load_lora(pipe: StableDiffusionPipeline, folder: Path) -> None:
    """Load a saved adapter into the pipeline's UNet, and check that something was loaded.

    diffusers loads nothing, silently, from a file whose keys lack the 'unet.' prefix; that is an error here.
    """
    weights = folder / LORA_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"no LoRA weights at {weights}: a run's LoRA is its MLflow artifact lora/adapter_weights "
            "(under mlartifacts/ beside a SQLite tracking store), or a folder save_lora wrote"
        )
    try:  # the UNet's part of pipe.load_lora_weights: the text encoder has none, and would say so
        state_dict, network_alphas, metadata = pipe.lora_state_dict(
            folder, weight_name=LORA_WEIGHTS_FILE, return_lora_metadata=True
        )
        pipe.load_lora_into_unet(
            state_dict,
            network_alphas,
            pipe.unet,
            adapter_name=ADAPTER_NAME,
            metadata=metadata,
            _pipeline=pipe,
        )
    except OSError:  # diffusers' "Unable to load weights from checkpoint file": damaged or not safetensors
        raise ValueError(f"{weights} is not a readable safetensors file (damaged or truncated?)") from None
    if ADAPTER_NAME not in pipe.get_list_adapters().get("unet", []):
        raise ValueError(f"{weights} holds no UNet LoRA weights that diffusers recognises")


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[None]:
    """Run the base model: the UNet with its LoRA adapters switched off, re-enabled on exit."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
