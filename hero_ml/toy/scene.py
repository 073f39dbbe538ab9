"""Scenes of the toy world: flat shapes on a plain background, described exactly enough to redraw them.

A `Composition` is what a caption says (how many of which colour and kind, and where); a `Scene` is
one drawing of it (every shape's centre, size and defect). Both are pydantic models, so a scene is kept
as JSON beside its image and validated when read back.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fully saturated, well-separated hues: a pixel's colour name is its nearest palette entry.
Color = Literal["red", "orange", "yellow", "green", "blue", "purple"]
Kind = Literal["circle", "square", "triangle"]
Defect = Literal["bite", "crack", "smear"]
Region = Literal["left", "right", "top", "bottom"]
COLORS: tuple[Color, ...] = get_args(Color)
KINDS: tuple[Kind, ...] = get_args(Kind)
DEFECTS: tuple[Defect, ...] = get_args(Defect)
REGIONS: tuple[Region, ...] = get_args(Region)
MAX_COUNT = 4

PALETTE: dict[Color, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 25),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (145, 55, 190),
}
BACKGROUND = (245, 245, 245)

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class Group(BaseModel):
    """`count` shapes of one colour and kind: "three red circles". Colour None leaves it open
    ("three circles": any one colour), which a caption may say but a scene cannot draw."""

    model_config = _FROZEN
    count: int = Field(ge=1, le=MAX_COUNT)
    color: Color | None
    kind: Kind


class Composition(BaseModel):
    """What a caption says: groups of distinct (colour, kind), optionally all in one region."""

    model_config = _FROZEN
    groups: tuple[Group, ...] = Field(min_length=1)
    region: Region | None = None

    @model_validator(mode="after")
    def _distinct_groups(self) -> Composition:
        keys = [(g.color, g.kind) for g in self.groups]
        if len(set(keys)) != len(keys):
            raise ValueError(f"each (colour, kind) may appear in one group only, got {keys}")
        open_kinds = [g.kind for g in self.groups if g.color is None]
        if any(sum(g.kind == kind for g in self.groups) > 1 for kind in open_kinds):
            raise ValueError(
                f"a shape kind whose colour is left open may appear in one group only, got {keys}"
            )
        return self

    def without_colors(self, rng: np.random.Generator, rate: float) -> Composition:
        """The same composition with each group's colour left open with probability `rate`, where
        that stays unambiguous (no other group of the same kind)."""
        kinds = [g.kind for g in self.groups]
        groups = tuple(
            g.model_copy(update={"color": None}) if kinds.count(g.kind) == 1 and rng.random() < rate else g
            for g in self.groups
        )
        return self.model_copy(update={"groups": groups})

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    def counts(self) -> dict[tuple[Color | None, Kind], int]:
        return {(g.color, g.kind): g.count for g in self.groups}


class Shape(BaseModel):
    """One drawn shape, in pixel units of the canvas."""

    model_config = _FROZEN
    kind: Kind
    color: Color
    x: float = Field(description="centre, pixels from the left edge")
    y: float = Field(description="centre, pixels from the top edge")
    radius: float = Field(gt=0, description="half the side (square), circumradius-like half-extent")
    defect: Defect | None = None
    defect_angle: float = Field(0.0, description="radians; where a bite, crack or smear sits")


class Scene(BaseModel):
    model_config = _FROZEN
    size: int = Field(ge=16, description="canvas side in pixels")
    shapes: tuple[Shape, ...]

    def composition(self, region: Region | None = None) -> Composition:
        counts: dict[tuple[Color, Kind], int] = {}
        for shape in self.shapes:
            counts[(shape.color, shape.kind)] = counts.get((shape.color, shape.kind), 0) + 1
        groups = tuple(Group(count=n, color=c, kind=k) for (c, k), n in counts.items())
        return Composition(groups=groups, region=region)


def region_box(region: Region | None, size: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) that centres of shapes in `region` fall in: the half of the canvas it names."""
    half = size / 2
    return {
        None: (0.0, 0.0, size, size),
        "left": (0.0, 0.0, half, size),
        "right": (half, 0.0, size, size),
        "top": (0.0, 0.0, size, half),
        "bottom": (0.0, half, size, size),
    }[region]


def place(
    composition: Composition,
    rng: np.random.Generator,
    *,
    size: int = 32,
    radius_range: tuple[float, float] = (3.5, 6.0),
    defect_rate: float = 0.0,
    gap: float = 3.0,
    attempts: int = 50,
    restarts: int = 20,
) -> Scene:
    """Draw a scene of the composition: random sizes and non-overlapping positions (centres in its region).

    Each shape is malformed with probability defect_rate (defect drawn uniformly). Raises ValueError
    when the shapes do not fit, so that a caller never gets a scene that contradicts its caption.
    """
    if any(g.color is None for g in composition.groups):
        raise ValueError(f"cannot draw a group whose colour is left open: {composition}")
    x0, y0, x1, y1 = region_box(composition.region, size)
    wanted = [(g.color, g.kind) for g in composition.groups for _ in range(g.count)]
    for _ in range(restarts):  # a crowded first layout is no reason to give up: start over
        shapes: list[Shape] = []
        for index in rng.permutation(len(wanted)):
            color, kind = wanted[index]
            assert color is not None  # checked above
            for _ in range(attempts):
                radius = float(rng.uniform(*radius_range))
                lo_x, hi_x = max(x0, radius + 1), min(x1, size - radius - 1)
                lo_y, hi_y = max(y0, radius + 1), min(y1, size - radius - 1)
                if lo_x >= hi_x or lo_y >= hi_y:
                    continue
                x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
                if all(
                    max(abs(x - s.x), abs(y - s.y)) > radius + s.radius + gap + _smear_room(s) for s in shapes
                ):
                    defect = DEFECTS[int(rng.integers(len(DEFECTS)))] if rng.random() < defect_rate else None
                    angle = float(rng.uniform(0, 2 * np.pi))
                    shapes.append(
                        Shape(
                            kind=kind, color=color, x=x, y=y, radius=radius, defect=defect, defect_angle=angle
                        )
                    )
                    break
            else:
                break
        if len(shapes) == len(wanted):
            return Scene(size=size, shapes=tuple(shapes))
    raise ValueError(f"cannot fit {composition.total} shapes on a {size}px canvas ({composition})")


def _smear_room(shape: Shape) -> float:
    """A smear trails beyond its shape: keep neighbours clear of it."""
    return shape.radius if shape.defect == "smear" else 0.0


def random_composition(
    rng: np.random.Generator,
    *,
    max_groups: int = 2,
    max_total: int = 4,
    region_rate: float = 0.25,
    max_in_region: int = 2,
) -> Composition:
    """A random caption-able composition: 1..max_groups groups, at most max_total shapes in all.

    A region holds at most max_in_region shapes: half a 32 px canvas has room for two shapes with
    the gaps the judge needs to tell them apart, rarely more.
    """
    region = REGIONS[int(rng.integers(len(REGIONS)))] if rng.random() < region_rate else None
    if region is not None:
        max_total = min(max_total, max_in_region)
    n_groups = int(rng.integers(1, min(max_groups, max_total) + 1))
    keys = rng.choice(len(COLORS) * len(KINDS), size=n_groups, replace=False)
    groups = []
    remaining = max_total
    for index, key in enumerate(keys):
        groups_after = n_groups - index - 1
        count = int(rng.integers(1, min(MAX_COUNT, remaining - groups_after) + 1))
        remaining -= count
        groups.append(Group(count=count, color=COLORS[key // len(KINDS)], kind=KINDS[key % len(KINDS)]))
    return Composition(groups=tuple(groups), region=region)


def random_scene(
    rng: np.random.Generator, *, size: int = 32, defect_rate: float = 0.0, region_rate: float = 0.25
) -> tuple[Composition, Scene]:
    """A random composition and a drawing of it; a composition that does not fit is drawn again."""
    while True:
        composition = random_composition(rng, region_rate=region_rate)
        try:
            return composition, place(composition, rng, size=size, defect_rate=defect_rate)
        except ValueError:
            continue
