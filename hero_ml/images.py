"""Image grids: one PNG that shows a round at a glance (for people and for MLflow)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, *, columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile uint8 images (B, H, W, 3) row-major on a white canvas; each tile numbered by its index."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, array in enumerate(images.numpy()):
        row, column = divmod(index, columns)
        x, y = pad + column * (width + pad), pad + row * (height + pad)
        grid.paste(Image.fromarray(array), (x, y))
        draw.text((x + 1, y), str(index), fill="white", stroke_width=1, stroke_fill="black")
    return grid
