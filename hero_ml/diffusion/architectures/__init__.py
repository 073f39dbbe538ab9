"""Named SD-shaped architectures, as diffusers/transformers config files.

`sd15` holds the published Stable Diffusion 1.5 configs (UNet 859.5 M, VAE 83.7 M, CLIP ViT-L text
encoder 123.1 M parameters): with random weights it costs exactly what the real model costs.
`tiny` is a few-hundred-thousand-parameter model of the same classes, for CPU tests.
"""

from pathlib import Path

ARCHITECTURES = ("tiny", "sd15")


def architecture_dir(name: str) -> Path:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    return Path(__file__).parent / name
