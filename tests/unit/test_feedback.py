import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hero_ml.feedback import KEEP, AnnotatorFeedback, FeedbackError, ImageLabel, RoundFeedback, aggregate

IDS = ["img-0", "img-1", "img-2", "img-3"]


def labels(annotator: str, marks: str, best: int | None = None) -> AnnotatorFeedback:
    """marks: one character per image, g (good), b (bad) or - (not labelled); best: index, or None to keep."""
    return AnnotatorFeedback(
        annotator=annotator,
        images=tuple(
            ImageLabel(image_id=IDS[i], label="good" if m == "g" else "bad", best=i == best)
            for i, m in enumerate(marks)
            if m != "-"
        ),
        keep_best=best is None,
    )


def test_one_annotator_is_taken_as_is() -> None:
    verdict = aggregate([labels("ann", "gbgb", best=2)], IDS, has_current_best=False)
    assert verdict.good == (True, False, True, False)
    assert verdict.best == 2
    assert verdict.good_indices == [0, 2] and verdict.bad_indices == [1, 3]
    assert (verdict.label_agreement, verdict.unanimous_share, verdict.best_agreement) == (1.0, 1.0, 1.0)
    assert verdict.feedbacks == 4


def test_majority_per_image_and_plurality_best_among_the_good() -> None:
    verdict = aggregate(
        [labels("a", "ggbb", best=0), labels("b", "gbgb", best=2), labels("c", "ggbb", best=1)],
        IDS,
        has_current_best=True,
    )
    # good votes: img-0 3/3, img-1 2/3, img-2 1/3, img-3 0/3
    assert verdict.good == (True, True, False, False)
    # one vote each for img-0, img-2, img-1; img-2 is not good; tie img-0 vs img-1 -> more good labels
    assert verdict.best == 0
    assert verdict.label_agreement == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 4)
    assert verdict.unanimous_share == 0.5
    assert verdict.best_agreement == pytest.approx(1 / 3)
    assert verdict.feedbacks == 12


def test_more_best_votes_beat_more_good_labels() -> None:
    # good votes: img-0 3/4, img-1 4/4; best votes: img-0 2, img-1 1, KEEP 1
    verdict = aggregate(
        [
            labels("a", "ggbb", best=0),
            labels("b", "ggbb", best=0),
            labels("c", "ggbb", best=1),
            labels("d", "bgbb"),
        ],
        IDS,
        has_current_best=True,
    )
    assert verdict.good == (True, True, False, False) and verdict.best == 0
    assert verdict.best_agreement == pytest.approx(2 / 4)


def test_a_tie_on_a_label_is_bad_and_keep_wins_a_tied_best() -> None:
    verdict = aggregate([labels("a", "gbbb", best=0), labels("b", "bbbb")], IDS, has_current_best=True)
    assert verdict.good == (False, False, False, False)  # img-0: 1 of 2 is not a majority
    assert verdict.best is None  # img-0 is no candidate; KEEP has the other vote
    verdict = aggregate([labels("a", "gbbb", best=0), labels("b", "gbbb")], IDS, has_current_best=True)
    assert verdict.good[0] and verdict.best is None  # 1 vote each: the current best stays


def test_first_round_with_no_good_majority_takes_the_most_voted_image_as_best() -> None:
    verdict = aggregate(
        [labels("a", "gbbb", best=0), labels("b", "bgbb", best=1), labels("c", "bgbb", best=1)],
        IDS,
        has_current_best=False,
    )
    assert verdict.best == 1 and verdict.good == (False, True, False, False)
    verdict = aggregate(
        [labels("a", "gbbb", best=0), labels("b", "bgbb", best=1)], IDS, has_current_best=False
    )
    assert verdict.best == 0 and verdict.good[0]  # no majority anywhere: the earlier image, made good


def test_later_round_with_no_good_image_keeps_the_best() -> None:
    verdict = aggregate([labels("a", "bbbb")], IDS, has_current_best=True)
    assert verdict.best is None and verdict.good_indices == []


@pytest.mark.parametrize(
    ("feedback", "message"),
    [
        (labels("a", "gbg"), "incomplete round: annotator 'a' left 1 of 4 images unlabelled"),
        (
            AnnotatorFeedback(
                annotator="a",
                images=(*labels("a", "gbgb", best=0).images, ImageLabel(image_id="img-9", label="bad")),
            ),
            "labelled images that are not in this round: 'img-9'",
        ),
        (
            AnnotatorFeedback(
                annotator="a",
                images=(*labels("a", "gbgb", best=0).images, ImageLabel(image_id="img-1", label="bad")),
            ),
            "labelled images more than once: 'img-1'",
        ),
        (
            AnnotatorFeedback(
                annotator="a",
                images=tuple(ImageLabel(image_id=i, label="good", best=i in ("img-0", "img-1")) for i in IDS),
            ),
            "picked 2 bests \\('img-0', 'img-1'\\); pick exactly one",
        ),
        (labels("a", "bggb", best=0), "picked 'img-0' as best but labelled it bad"),
        (
            AnnotatorFeedback(annotator="a", images=labels("a", "gggg", best=0).images, keep_best=True),
            "both picked a best and kept the current one",
        ),
        (AnnotatorFeedback(annotator="a", images=labels("a", "gggg").images), "picked no best"),
    ],
)
def test_invalid_feedback_says_who_what_and_how(feedback: AnnotatorFeedback, message: str) -> None:
    with pytest.raises(FeedbackError, match=message):
        aggregate([feedback], IDS, has_current_best=True)


def test_keeping_a_best_in_the_first_round_is_refused() -> None:
    with pytest.raises(FeedbackError, match="first round: there is none yet"):
        aggregate([labels("a", "gbbb")], IDS, has_current_best=False)


def test_a_team_without_a_best_vote_is_refused_in_the_first_round_and_keeps_the_best_later() -> None:
    only_labels = [  # a team sharing the image tasks: nobody did the best task
        AnnotatorFeedback(
            annotator=name,
            images=tuple(ImageLabel(image_id=IDS[i], label="good" if i == 0 else "bad") for i in share),
        )
        for name, share in (("a", (0, 1)), ("b", (2, 3)))
    ]
    with pytest.raises(FeedbackError, match="nobody picked a best, and the first round must pick one"):
        aggregate(only_labels, IDS, has_current_best=False, complete=False)
    verdict = aggregate(only_labels, IDS, has_current_best=True, complete=False)
    assert verdict.good == (True, False, False, False) and verdict.best is None  # the current best stays


def test_no_feedback_and_repeated_annotators_are_refused() -> None:
    with pytest.raises(FeedbackError, match="at least one annotator"):
        aggregate([], IDS, has_current_best=True)
    with pytest.raises(FeedbackError, match="annotators appear more than once: 'a'"):
        aggregate([labels("a", "gbbb", best=0), labels("a", "gbbb", best=0)], IDS, has_current_best=True)


def test_round_feedback_refuses_a_bad_best_and_misaligned_labels() -> None:
    common = dict(annotators=("a",), labels=2, label_agreement=1, unanimous_share=1, best_agreement=1)
    with pytest.raises(ValidationError, match="best image 'x' is not good"):
        RoundFeedback(image_ids=("x", "y"), good=(False, True), best=0, **common)
    with pytest.raises(ValidationError, match="good has 1 entries for 2 images"):
        RoundFeedback(image_ids=("x", "y"), good=(True,), best=None, **common)
    with pytest.raises(ValidationError, match="outside the round"):
        RoundFeedback(image_ids=("x", "y"), good=(True, True), best=5, **common)
    with pytest.raises(ValidationError, match="1 labels cannot cover the round's 2 images"):
        RoundFeedback(image_ids=("x", "y"), good=(True, True), best=0, **{**common, "labels": 1})


@st.composite
def annotation_sets(draw: st.DrawFn) -> tuple[list[AnnotatorFeedback], bool]:
    has_current_best = draw(st.booleans())
    feedback = []
    for a in range(draw(st.integers(1, 6))):
        marks = draw(st.lists(st.sampled_from("gb"), min_size=len(IDS), max_size=len(IDS)))
        goods = [i for i, m in enumerate(marks) if m == "g"]
        options: list[int | None] = [*goods] + ([None] if has_current_best else [])
        if not options:  # first round, all bad: the annotator must still pick a best, which is good
            marks[0], options = "g", [0]
        feedback.append(labels(f"a{a}", "".join(marks), best=draw(st.sampled_from(options))))
    return feedback, has_current_best


@settings(max_examples=300, deadline=None)
@given(annotation_sets())
def test_aggregates_of_valid_annotations_are_valid_and_order_free(case: tuple[list, bool]) -> None:
    feedback, has_current_best = case
    verdict = aggregate(feedback, IDS, has_current_best=has_current_best)
    assert verdict.best is not None or has_current_best
    if verdict.best is not None:
        assert verdict.good[verdict.best]
    n = len(feedback)
    for index, image_id in enumerate(IDS):
        votes = sum(dict((x.image_id, x.label == "good") for x in f.images)[image_id] for f in feedback)
        assert verdict.good[index] == (2 * votes > n or index == verdict.best)
    assert verdict.feedbacks == len(IDS) * n
    assert 0.5 <= verdict.label_agreement <= 1
    shuffled = aggregate(feedback[::-1], IDS, has_current_best=has_current_best)
    assert (shuffled.good, shuffled.best) == (verdict.good, verdict.best)
    winner = KEEP if verdict.best is None else IDS[verdict.best]
    assert verdict.best_agreement == sum(f.best_vote == winner for f in feedback) / n


def test_a_team_sharing_a_round_is_aggregated_per_image() -> None:
    team = [labels("a", "gg--", best=0), labels("b", "--gb", best=2), labels("c", "bbg-")]
    with pytest.raises(FeedbackError, match="incomplete round: annotator 'a' left 2 of 4 images"):
        aggregate(team, IDS, has_current_best=True)  # complete is the default: one task per annotator
    verdict = aggregate(team, IDS, has_current_best=True, complete=False)
    # img-0: g b (a tie: bad), img-1: g b (bad), img-2: g g, img-3: b
    assert verdict.good == (False, False, True, False)
    # votes: img-0 (not good: no candidate), img-2, KEEP: one each -> KEEP wins the tie
    assert verdict.best is None
    assert verdict.feedbacks == 7
    assert verdict.label_agreement == pytest.approx((1 / 2 + 1 / 2 + 1 + 1) / 4)
    assert verdict.unanimous_share == 0.5
    with pytest.raises(FeedbackError, match=r"incomplete round: 1 of 4 images have no label \('img-3'\)"):
        aggregate([labels("a", "ggg-", best=0)], IDS, has_current_best=False, complete=False)


@st.composite
def team_annotations(draw: st.DrawFn) -> list[AnnotatorFeedback]:
    """A team sharing a round with a current best: each annotator labels some images, every image gets
    at least one label, bests among each annotator's own good labels or KEEP."""
    marks = [
        list(draw(st.text("gb-", min_size=len(IDS), max_size=len(IDS))))
        for _ in range(draw(st.integers(1, 5)))
    ]
    for i in range(len(IDS)):
        if all(m[i] == "-" for m in marks):
            marks[draw(st.integers(0, len(marks) - 1))][i] = draw(st.sampled_from("gb"))
    team = []
    for a, m in enumerate(marks):
        goods = [i for i, c in enumerate(m) if c == "g"]
        team.append(labels(f"a{a}", "".join(m), best=draw(st.sampled_from([*goods, None]))))
    return team


@settings(max_examples=300, deadline=None)
@given(team_annotations())
def test_team_aggregates_take_each_images_majority(team: list[AnnotatorFeedback]) -> None:
    verdict = aggregate(team, IDS, has_current_best=True, complete=False)
    for index, image_id in enumerate(IDS):
        given = [x.label == "good" for f in team for x in f.images if x.image_id == image_id]
        assert given, image_id
        assert verdict.good[index] == (2 * sum(given) > len(given) or index == verdict.best)
    assert verdict.feedbacks == sum(len(f.images) for f in team)
    assert 0.5 <= verdict.label_agreement <= 1
