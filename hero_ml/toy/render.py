"""Draw a Scene: flat shapes on a plain background, anti-aliased by 4x supersampling.

Deterministic: the same scene gives the same pixels. Defects:
- bite: a disc of background bitten out of the outline at `defect_angle`;
- crack: a background-coloured line through the centre at `defect_angle` (the shape breaks in two);
- smear: a streak of the shape's colour dragged out from the centre at `defect_angle`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from hero_ml.toy.scene import BACKGROUND, PALETTE, Kind, Scene, Shape

SUPERSAMPLE = 4


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 RGB pixels of shape (size, size, 3)."""
    big = scene.size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, PALETTE[shape.color])
    return np.asarray(canvas.resize((scene.size, scene.size), Image.Resampling.BOX))


def shape_coverage(kind: Kind, x: float, y: float, radius: float, size: int) -> np.ndarray:
    """Fraction (size, size) of each pixel the ideal, defect-free shape covers: the judge's template."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(canvas), Shape(kind=kind, color="red", x=x, y=y, radius=radius), 255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, color: int | tuple[int, int, int]) -> None:
    s = SUPERSAMPLE
    x, y, r = shape.x * s, shape.y * s, shape.radius * s
    dx, dy = math.cos(shape.defect_angle), math.sin(shape.defect_angle)
    if shape.defect == "smear":  # drawn first, under the shape: a tail, not a second shape
        draw.line((x, y, x + 2 * r * dx, y + 2 * r * dy), fill=color, width=max(1, round(0.6 * r)))
    _draw_kind(draw, shape.kind, x - r, y - r, x + r, y + r, color)
    if shape.defect == "bite":
        bx, by, br = x + 0.8 * r * dx, y + 0.8 * r * dy, 0.6 * r
        draw.ellipse((bx - br, by - br, bx + br, by + br), fill=BACKGROUND)
    elif shape.defect == "crack":
        draw.line(
            (x - 1.5 * r * dx, y - 1.5 * r * dy, x + 1.5 * r * dx, y + 1.5 * r * dy),
            fill=BACKGROUND,
            width=round(1.3 * s),
        )


def _draw_kind(
    draw: ImageDraw.ImageDraw, kind: Kind, x0: float, y0: float, x1: float, y1: float, fill: int | tuple
) -> None:
    # PIL boxes include their last pixel; shrink by one supersampled pixel so a box of width w covers w.
    x1, y1 = x1 - 1, y1 - 1
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # an upright isosceles triangle: apex at the top centre
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
