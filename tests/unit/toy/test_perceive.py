import numpy as np
import pytest

from hero_ml.toy.perceive import _centroid, colour_coverage
from hero_ml.toy.scene import COLORS


def test_a_pixel_is_read_as_a_blend_of_the_background_and_one_palette_colour() -> None:
    # the background; pure blue; 40% red over the background: 245 + 0.4 * (220 - 245), 245 + 0.4 * (40 - 245)
    image = np.array([[[245, 245, 245], [40, 80, 220], [235, 163, 163]]], dtype=np.uint8)
    best, coverage = colour_coverage(image)
    assert coverage[0, 0] == 0.0
    assert (COLORS[best[0, 1]], COLORS[best[0, 2]]) == ("blue", "red")
    assert coverage[0, 1] == pytest.approx(1.0) and coverage[0, 2] == pytest.approx(0.4)


def test_the_centroid_weighs_pixel_centres_by_coverage() -> None:
    weights = np.zeros((2, 3), dtype=np.float32)
    weights[0, 0], weights[1, 2] = 1.0, 3.0  # centres (0.5, 0.5) and (2.5, 1.5)
    assert _centroid(weights) == pytest.approx(((0.5 + 3 * 2.5) / 4, (0.5 + 3 * 1.5) / 4))
