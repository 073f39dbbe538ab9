import numpy as np
import pytest

from hero_ml.feedback import aggregate
from hero_ml.toy.evaluate import judge_accuracy
from hero_ml.toy.judge import SimulatedAnnotator, Target, Want, judge
from hero_ml.toy.perceive import perceive
from hero_ml.toy.render import render
from hero_ml.toy.scene import Scene, Shape, place, random_composition

CLEAN_SCENES = 300


def clean_scenes(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [place(random_composition(rng, region_rate=0.3), rng) for _ in range(count)]


def test_judge_reads_clean_renders_at_least_98_percent_right() -> None:
    assert judge_accuracy(clean_scenes(seed=11, count=CLEAN_SCENES)) >= 0.98


def test_judge_accuracy_counts_a_scene_right_only_when_every_shape_is_read() -> None:
    circle = Shape(kind="circle", color="red", x=8, y=8, radius=4)
    square = Shape(kind="square", color="blue", x=24, y=24, radius=4)
    bitten = Shape(kind="triangle", color="green", x=24, y=8, radius=5, defect="bite")
    read = [Scene(size=32, shapes=(circle, square)), Scene(size=32, shapes=(circle, bitten))]
    stacked = Scene(size=32, shapes=(circle, circle))  # two circles drawn on one spot: one is seen
    assert judge_accuracy(read) == 1.0
    assert judge_accuracy([*read, stacked]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("defect", ["bite", "crack", "smear"])
def test_judge_flags_malformed_shapes(defect: str) -> None:
    rng = np.random.default_rng(12)
    flagged = 0
    trials = 90
    for index in range(trials):
        shape = Shape(
            kind=("circle", "square", "triangle")[index % 3],
            color="green",
            x=16 + rng.uniform(-4, 4),
            y=16 + rng.uniform(-4, 4),
            radius=rng.uniform(3.5, 6.0),
            defect=defect,  # type: ignore[arg-type]
            defect_angle=rng.uniform(0, 2 * np.pi),
        )
        seen = perceive(render(Scene(size=32, shapes=(shape,))))
        flagged += len(seen) != 1 or seen[0].malformed
    assert flagged / trials >= 0.9


def test_counting_target_verdicts() -> None:
    target = Target(require=(Want(count=2, color="red", kind="circle"),))
    two = Scene(
        size=32,
        shapes=(
            Shape(kind="circle", color="red", x=8, y=8, radius=4),
            Shape(kind="circle", color="red", x=24, y=24, radius=4),
        ),
    )
    verdict = judge(render(two), target)
    assert verdict.good and verdict.violations == () and 0 < verdict.score <= 0.1
    three = Scene(size=32, shapes=(*two.shapes, Shape(kind="square", color="red", x=24, y=8, radius=4)))
    verdict = judge(render(three), target)
    assert not verdict.good and verdict.violations == ("unwanted: red square",)
    fit = np.mean([o.fit for o in verdict.seen])
    assert verdict.score == pytest.approx(-1 + 0.1 * fit)  # a violation costs 1, the fit a tenth
    one = Scene(size=32, shapes=two.shapes[:1])
    assert judge(render(one), target).violations == ("count: 2 red circle(s) wanted, 1 seen",)


def test_region_malformed_and_forbidden_rules() -> None:
    left = Shape(kind="square", color="blue", x=8, y=16, radius=4)
    right = Shape(kind="square", color="blue", x=24, y=16, radius=4)
    image = render(Scene(size=32, shapes=(left, right)))
    assert judge(image, Target(require=(Want(count=2, kind="square"),), region="left")).violations == (
        "region: blue square outside the left",
    )
    bitten = render(Scene(size=32, shapes=(left.model_copy(update={"defect": "bite"}),)))
    assert judge(bitten, Target(exact=False, no_malformed=True)).violations[0].startswith("malformed: blue")
    assert not judge(image, Target(exact=False, forbidden_colors=("blue",))).good
    assert judge(image, Target(exact=False, forbidden_colors=("red",))).good


IDS = ["a", "b", "c", "d"]


def test_simulated_annotator_follows_the_hero_protocol() -> None:
    target = Target(require=(Want(count=1, color="red", kind="circle"),))
    good = render(Scene(size=32, shapes=(Shape(kind="circle", color="red", x=16, y=16, radius=5),)))
    bad = render(Scene(size=32, shapes=(Shape(kind="square", color="red", x=16, y=16, radius=5),)))
    images = np.stack([bad, good, bad, good])
    labels = SimulatedAnnotator(target).label_round(IDS, images)
    assert [x.label for x in labels.images] == ["bad", "good", "bad", "good"]
    assert labels.best_vote in ("b", "d") and not labels.keep_best
    # A better current best stays; nothing this round is as good, so nothing is good.
    kept = SimulatedAnnotator(target).label_round(IDS[:2], np.stack([bad, bad]), current_best=good)
    assert kept.keep_best and [x.label for x in kept.images] == ["bad", "bad"]
    # A worse current best: good is "as good as the current best", judged before the new best (b)
    # is chosen, so the image as bad as the current best (a) is good too.
    raised = SimulatedAnnotator(target).label_round(IDS[:2], np.stack([bad, good]), current_best=bad)
    assert raised.best_vote == "b" and [x.label for x in raised.images] == ["good", "good"]
    # No good image at all: the least bad is the best and is good by definition.
    none_good = SimulatedAnnotator(target).label_round(IDS[:2], np.stack([bad, bad]))
    assert none_good.best_vote == "a" and [x.label for x in none_good.images] == ["good", "good"]
    # What the annotator says is valid feedback, as a human's would have to be.
    verdict = aggregate([labels], IDS, has_current_best=False)
    assert verdict.good == (False, True, False, True)


def test_label_noise_flips_about_the_asked_fraction_but_never_the_best() -> None:
    target = Target(require=(Want(count=1, color="red", kind="circle"),))
    good = render(Scene(size=32, shapes=(Shape(kind="circle", color="red", x=16, y=16, radius=5),)))
    bad = render(Scene(size=32, shapes=(Shape(kind="square", color="red", x=16, y=16, radius=5),)))
    images = np.stack([good] + [bad] * 399)
    ids = [f"img-{i}" for i in range(400)]
    labels = SimulatedAnnotator(target, flip_probability=0.25, seed=3).label_round(ids, images)
    assert labels.best_vote == "img-0" and labels.images[0].label == "good"
    assert 0.18 < sum(x.label == "good" for x in labels.images[1:]) / 399 < 0.32
    with pytest.raises(ValueError, match="flip_probability"):
        SimulatedAnnotator(target, flip_probability=1.5)
