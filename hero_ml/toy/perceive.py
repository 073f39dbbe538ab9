"""Seeing shapes in pixels, with no access to the scene: what the judge believes an image shows.

1. Each pixel is explained as a blend of the background and one palette colour (anti-aliased edges
   are such blends): the colour with the smallest residual names it, the blend weight is its coverage.
2. Pixels mostly covered by one colour form objects: connected components, where parts a pixel or two
   apart count as one broken object (a crack splits a shape; it does not make two shapes).
3. For each kind, the ideal shape with the object's area and centroid is drawn; the best soft
   intersection-over-union names the kind, and a poor fit or a break marks the object malformed.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from hero_ml.toy.render import shape_coverage
from hero_ml.toy.scene import BACKGROUND, COLORS, KINDS, PALETTE, Color, Kind

_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array([PALETTE[c] for c in COLORS], dtype=np.float32) - _BACKGROUND  # (C, 3)

MIN_AREA = 6.0  # covered pixels; smaller specks are noise, not objects
MIN_FIT = 0.86  # soft IoU with the best ideal shape below which an object is malformed
RECOGNISABLE_FIT = 0.5  # below this the object has no kind at all

# Ideal shapes by half-extent r: area, and centroid offset below the centre (the triangle's apex is up).
_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}


class SeenObject(BaseModel):
    model_config = ConfigDict(frozen=True)
    color: Color
    kind: Kind | None  # None: a blob that matches no shape
    x: float  # centroid, pixels from the left
    y: float  # centroid, pixels from the top
    area: float  # covered pixels
    fit: float  # soft IoU with the ideal shape of `kind`
    malformed: bool


def colour_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index that best explains it, and how much of the pixel it covers (0..1)."""
    offset = image.astype(np.float32) - _BACKGROUND  # (H, W, 3)
    weights = np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS**2).sum(-1), 0, 1)  # (H, W, C)
    residual = ((offset[..., None, :] - weights[..., None] * _DIRECTIONS) ** 2).sum(-1)
    best = residual.argmin(-1)
    return best, np.take_along_axis(weights, best[..., None], -1)[..., 0]


def perceive(image: np.ndarray) -> list[SeenObject]:
    """The objects an RGB uint8 image (H, W, 3) shows, in reading order (top to bottom, left to right)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    size = image.shape[0]
    best, coverage = colour_coverage(image)
    seen = []
    for index, color in enumerate(COLORS):
        soft = np.where(best == index, coverage, 0.0)
        mask = soft >= 0.5
        if not mask.any():
            continue
        parts, _ = ndimage.label(mask)
        groups, n_groups = ndimage.label(ndimage.binary_dilation(mask))  # parts a crack apart join up
        for group in range(1, n_groups + 1):
            region = groups == group
            pixels = np.where(region, soft, 0.0)
            if pixels.sum() < MIN_AREA:
                continue
            broken = len(np.unique(parts[region & mask])) > 1
            seen.append(_describe(pixels, color, broken, size))
    return sorted(seen, key=lambda o: (round(o.y), o.x))


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(weights.shape, dtype=np.float32) + 0.5  # pixel centres
    total = weights.sum()
    return float((weights * xs).sum() / total), float((weights * ys).sum() / total)


def _describe(pixels: np.ndarray, color: Color, broken: bool, size: int) -> SeenObject:
    area = float(pixels.sum())
    cx, cy = _centroid(pixels)
    fits = {}
    for kind in KINDS:
        radius = math.sqrt(area / _AREA[kind])
        x, y = cx, cy - _CENTROID_DROP[kind] * radius
        # Drawing snaps to the supersampling grid; move the template until its centroid is the object's.
        tx, ty = _centroid(shape_coverage(kind, x, y, radius, size))
        template = shape_coverage(kind, x + cx - tx, y + cy - ty, radius, size)
        fits[kind] = float(np.minimum(pixels, template).sum() / np.maximum(pixels, template).sum())
    kind = max(fits, key=lambda k: fits[k])
    fit = fits[kind]
    return SeenObject(
        color=color,
        kind=kind if fit >= RECOGNISABLE_FIT else None,
        x=round(cx, 3),
        y=round(cy, 3),
        area=round(area, 3),
        fit=round(fit, 4),
        malformed=broken or fit < MIN_FIT,
    )
