"""The benchmark scripts' own arithmetic (their runs live in benchmarks/, not in the test suite)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import feedback_efficiency as fe


def test_curves_group_seeds_and_the_first_crossing_of_the_mean_is_found() -> None:
    points = [
        {"task": "t", "method": "m", "seed": s, "round": r, "feedbacks": 64 * r, "success_rate": v}
        for s, values in enumerate([(0.1, 0.3, 0.6), (0.2, 0.5, 0.6)])
        for r, v in enumerate(values)
    ]
    curve = fe.curves(points)[("t", "m")]
    assert curve == {0: [0.1, 0.2], 64: [0.3, 0.5], 128: [0.6, 0.6]}
    assert fe.feedbacks_to_reach(curve, 0.4) == 64  # the mean at 64 is exactly 0.4
    assert fe.feedbacks_to_reach(curve, 0.15) == 0
    assert fe.feedbacks_to_reach(curve, 0.7) is None


def test_points_round_trip_through_the_csv(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    point = {"task": "t", "method": "hero", "seed": 2, "round": 3, "feedbacks": 192, "success_rate": 0.25}
    fe.append_point(path, point)
    fe.append_point(path, {**point, "round": 4, "feedbacks": 256})
    assert fe.read_points(path) == [point, {**point, "round": 4, "feedbacks": 256}]
    assert path.read_text().splitlines()[0] == ",".join(fe.COLUMNS)
