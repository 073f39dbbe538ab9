"""The benchmark scripts' own arithmetic (their runs live in benchmarks/, not in the test suite)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import feedback_efficiency as fe
import hyperparameter_probe as hp


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


def test_reward_auc_counts_the_good_bad_pairs_ordered_right() -> None:
    good = (True, True, False, False)
    assert hp.reward_auc([0.9, 0.8, 0.1, 0.2], good) == 1.0
    # good 0.1 and 0.8 against bad 0.9 and 0.2: only 0.8 > 0.2 of the four pairs
    assert hp.reward_auc([0.1, 0.8, 0.9, 0.2], good) == 0.25
    assert hp.reward_auc([0.5, 0.7, 0.5, 0.1], good) == 0.875  # the tie 0.5 = 0.5 counts half
    assert hp.reward_auc([0.5, 0.5], (True, True)) is None  # nothing bad to rank against
    assert hp.reward_auc(None, (True, False)) is None
