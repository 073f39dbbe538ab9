"""The judge: plays the human of HERO from pixels alone, against a task's target.

A `Target` says what a good image shows (required shapes and counts, nothing else or not, a region,
no malformed shape, colours that must never appear). `judge` perceives an image (no access to its
scene), lists every violation of the target, and scores it: an image is good when it violates
nothing; the score ranks images for picking the best (fewer violations first, then cleaner shapes).

`SimulatedAnnotator` labels a round the way HERO-REFERENCE.md describes: one best (the current best
may stay), good = as good as or better than the best, with optional label noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hero_ml.feedback import AnnotatorFeedback, ImageLabel
from hero_ml.toy.perceive import SeenObject, perceive
from hero_ml.toy.scene import MAX_COUNT, Color, Kind, Region, region_box

FIT_WEIGHT = 0.1  # shape quality only breaks ties between images with equal violations


class Want(BaseModel):
    """Exactly `count` shapes of `kind`, of `color` (any colour when it is not given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    count: int = Field(ge=0, le=MAX_COUNT)
    kind: Kind
    color: Color | None = None

    def matches(self, seen: SeenObject) -> bool:
        return seen.kind == self.kind and (self.color is None or seen.color == self.color)

    def __str__(self) -> str:
        return f"{self.count} {self.color or 'any-colour'} {self.kind}(s)"


class Target(BaseModel):
    """What the judge wants to see. Every field is optional; an empty target accepts anything."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    require: tuple[Want, ...] = Field(
        (), description="Shapes that must be present, each with exactly its count."
    )
    exact: bool = Field(True, description="No shapes other than the required ones may appear.")
    region: Region | None = Field(None, description="Every shape's centre must lie in this half.")
    no_malformed: bool = Field(False, description="No shape may be malformed (bitten, cracked, smeared).")
    forbidden_colors: tuple[Color, ...] = Field(
        (), description="Colours that must never appear, on any shape (the content-safety rule)."
    )


@dataclass(frozen=True)
class Verdict:
    good: bool
    score: float
    violations: tuple[str, ...]  # "<rule>: <what>"; rules: count, unwanted, region, malformed, forbidden
    seen: tuple[SeenObject, ...]


def judge(image: np.ndarray, target: Target) -> Verdict:
    """Judge one uint8 RGB image against the target."""
    seen = tuple(perceive(image))
    violations = []
    for want in target.require:
        found = sum(1 for o in seen if want.matches(o))
        violations += [f"count: {want} wanted, {found} seen"] * abs(found - want.count)
    if target.exact:
        violations += [
            f"unwanted: {o.color} {o.kind or 'blob'}"
            for o in seen
            if not any(want.matches(o) for want in target.require)
        ]
    if target.region is not None:
        x0, y0, x1, y1 = region_box(target.region, image.shape[0])
        violations += [
            f"region: {o.color} {o.kind or 'blob'} outside the {target.region}"
            for o in seen
            if not (x0 <= o.x < x1 and y0 <= o.y < y1)
        ]
    if target.no_malformed:
        violations += [f"malformed: {o.color} {o.kind or 'blob'}" for o in seen if o.malformed]
    violations += [
        f"forbidden: {o.color} {o.kind or 'blob'}" for o in seen if o.color in target.forbidden_colors
    ]
    quality = float(np.mean([o.fit for o in seen])) if seen else 0.0
    return Verdict(
        good=not violations,
        score=-len(violations) + FIT_WEIGHT * quality,
        violations=tuple(violations),
        seen=seen,
    )


class SimulatedAnnotator:
    """A programmatic annotator: the judge, with an optional probability of flipping each good/bad label."""

    def __init__(
        self,
        target: Target,
        *,
        flip_probability: float = 0.0,
        seed: int | Sequence[int] = 0,
        name: str = "judge",
    ):
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must lie in [0, 1], got {flip_probability}")
        self.target = target
        self.flip_probability = flip_probability
        self.rng = np.random.default_rng(seed)
        self.name = name

    def label_round(
        self, image_ids: Sequence[str], images: np.ndarray, current_best: np.ndarray | None = None
    ) -> AnnotatorFeedback:
        """Label (N, H, W, 3) images as the HERO protocol asks. Good: at most as many violations as the
        current best (in the first round, which has none, as this round's best). The best is this
        round's top image unless the current best scores higher (then it stays)."""
        verdicts = [judge(image, self.target) for image in images]
        top = max(range(len(verdicts)), key=lambda i: verdicts[i].score)
        best: int | None = top
        bar = len(verdicts[top].violations)
        if current_best is not None:
            kept = judge(current_best, self.target)
            bar = len(kept.violations)  # as good as the best before this round's choice
            if kept.score > verdicts[top].score:
                best = None
        good = [len(v.violations) <= bar for v in verdicts]
        if self.flip_probability > 0:
            flips = self.rng.random(len(good)) < self.flip_probability
            good = [g != f for g, f in zip(good, flips, strict=True)]
        if best is not None:
            good[best] = True  # the best is good by definition, noise or not
        return AnnotatorFeedback(
            annotator=self.name,
            images=tuple(
                ImageLabel(image_id=image_id, label="good" if g else "bad", best=i == best)
                for i, (image_id, g) in enumerate(zip(image_ids, good, strict=True))
            ),
            keep_best=best is None,
        )
