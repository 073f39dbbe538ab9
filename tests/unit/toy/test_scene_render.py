import numpy as np
import pytest
from pydantic import ValidationError

from hero_ml.toy.render import render, shape_coverage
from hero_ml.toy.scene import (
    BACKGROUND,
    PALETTE,
    Composition,
    Group,
    Scene,
    Shape,
    place,
    random_composition,
    region_box,
)


def test_rendering_is_deterministic_and_seeded_placement_reproducible() -> None:
    composition = Composition(groups=(Group(count=3, color="red", kind="circle"),))
    first = place(composition, np.random.default_rng(5))
    again = place(composition, np.random.default_rng(5))
    assert first == again
    assert np.array_equal(render(first), render(again))
    assert first != place(composition, np.random.default_rng(6))


def test_scene_survives_a_json_round_trip() -> None:
    scene = place(random_composition(np.random.default_rng(1)), np.random.default_rng(2), defect_rate=1.0)
    assert Scene.model_validate_json(scene.model_dump_json()) == scene
    assert all(shape.defect is not None for shape in scene.shapes)


def test_a_square_fills_exactly_its_box_in_its_colour() -> None:
    scene = Scene(size=32, shapes=(Shape(kind="square", color="blue", x=10.0, y=20.0, radius=4.0),))
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert tuple(image[20, 10]) == PALETTE["blue"]  # inside: pure colour
    assert tuple(image[20, 16]) == BACKGROUND and tuple(image[0, 0]) == BACKGROUND
    blue = np.all(image == PALETTE["blue"], axis=-1)
    assert blue.sum() == 8 * 8  # side 2 * radius, on whole pixels


def test_template_coverage_has_the_ideal_area() -> None:
    for kind, area in (("circle", np.pi * 25), ("square", 100.0), ("triangle", 50.0)):
        assert shape_coverage(kind, 16.0, 16.0, 5.0, 32).sum() == pytest.approx(
            area, rel=0.03
        )  # rasterised edges


def test_placed_shapes_keep_their_region_and_their_distance() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        composition = random_composition(rng, region_rate=0.5)
        scene = place(composition, rng)
        assert scene.composition(composition.region).counts() == composition.counts()
        x0, y0, x1, y1 = region_box(composition.region, 32)
        for a in scene.shapes:
            assert x0 <= a.x <= x1 and y0 <= a.y <= y1
            for b in scene.shapes:
                if a is not b:
                    assert max(abs(a.x - b.x), abs(a.y - b.y)) > a.radius + b.radius + 3


def test_a_composition_that_cannot_fit_is_an_error_not_a_wrong_scene() -> None:
    crowded = Composition(groups=(Group(count=4, color="red", kind="square"),), region="left")
    with pytest.raises(ValueError, match="cannot fit 4 shapes"):
        place(crowded, np.random.default_rng(0), radius_range=(7.0, 8.0), restarts=2)


def test_a_composition_with_an_open_colour_cannot_be_drawn() -> None:
    with pytest.raises(ValueError, match="colour is left open"):
        place(Composition(groups=(Group(count=2, color=None, kind="circle"),)), np.random.default_rng(0))


def test_compositions_are_validated() -> None:
    with pytest.raises(ValidationError, match="one group only"):
        Composition(
            groups=(Group(count=1, color="red", kind="circle"), Group(count=2, color="red", kind="circle"))
        )
    with pytest.raises(ValidationError):
        Group(count=5, color="red", kind="circle")
    with pytest.raises(ValidationError):
        Group(count=1, color="pink", kind="circle")  # type: ignore[arg-type]
