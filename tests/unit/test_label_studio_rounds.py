"""A round as Label Studio tasks and annotations back as feedback: the pure half of the adapter."""

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hero_ml.adapters.label_studio.rounds import (
    LABEL_CONFIG,
    SUGGESTION_MODEL,
    CollectedRound,
    Progress,
    Readiness,
    best_task,
    collect,
    image_task,
    readiness,
    suggestions,
    task_key,
)
from hero_ml.feedback import FeedbackError

IDS = ["r0001-000", "r0001-001", "r0001-002"]
DIGESTS = {i: f"{n:064x}" for n, i in enumerate(IDS)} | {"": "f" * 64}  # the manifest's, as tasks() has them


def tasks() -> list[dict[str, Any]]:
    common = {"run_id": "run", "round_index": 1, "prompt": "three red circles", "best_url": "s3://b/best.png"}
    images = [
        {
            "id": 10 + n,
            **image_task(
                **common, image_id=i, position=n, image_url=f"s3://b/{i}.png", image_sha256=f"{n:064x}"
            ),
        }
        for n, i in enumerate(IDS)
    ]
    best = best_task(
        **common, image_ids=IDS, grid_url="s3://b/grid.png", grid_sha256="f" * 64, has_current_best=True
    )
    return [*images, {"id": 20, **best}]


def collect_round(
    round_tasks: list[dict[str, Any]], has_current_best: bool = True, annotators_per_image: int = 1
) -> CollectedRound:
    """collect of round 1 of run 'run' (the tasks() round)."""
    return collect(
        round_tasks,
        run_id="run",
        round_index=1,
        image_ids=IDS,
        digests=DIGESTS,
        has_current_best=has_current_best,
        annotators_per_image=annotators_per_image,
    )


def annotation(
    who: int,
    choice: str,
    *,
    ident: int = 0,
    when: str = "2026-01-01T00:00",
    cancelled: bool = False,
    control: str = "label",
) -> dict[str, Any]:
    result = [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]
    return {
        "id": ident,
        "completed_by": who,
        "was_cancelled": cancelled,
        "updated_at": when,
        "result": result,
    }


def test_tasks_carry_what_maps_labels_back() -> None:
    image, best = tasks()[0]["data"], tasks()[-1]["data"]
    assert image["hero"] == {
        "run_id": "run",
        "round": 1,
        "kind": "image",
        "flow_run_id": None,
        "image_id": IDS[0],
        "sha256": "0" * 64,  # its labels belong to these pixels
    }
    assert [o["hotkey"] for o in image["label_options"]] == ["1", "2"] and image["best_options"] == []
    assert [o["value"] for o in best["best_options"]] == [*IDS, "keep"]
    assert best["hero"]["image_ids"] == IDS and best["label_options"] == []
    assert best["hero"]["sha256"] == "f" * 64
    assert task_key(image) == ("run", 1, "image", IDS[0]) and task_key(best) == ("run", 1, "best", "")
    first = best_task(
        run_id="run",
        round_index=0,
        image_ids=IDS,
        prompt="p",
        grid_url="g",
        grid_sha256="g" * 64,
        best_url="b",
        has_current_best=False,
    )["data"]
    assert "predictions" not in tasks()[0]  # suggestions are off unless asked for
    assert "keep" not in [o["value"] for o in first["best_options"]]  # nothing to keep in round 0
    for name in ('name="label"', 'name="best"', 'value="$label_options"', 'value="$current_best"'):
        assert name in LABEL_CONFIG


def test_collect_a_round_labelled_by_a_team() -> None:
    round_tasks = tasks()
    # image 0: annotators 1 and 2 say good, 3 says bad (a disagreement)
    round_tasks[0]["annotations"] = [
        annotation(1, "good", ident=1),
        annotation(2, "good", ident=2),
        annotation(3, "bad", ident=3),
    ]
    # image 1: annotator 1 first said good, then updated to bad (the late update wins); 2 skipped it
    round_tasks[1]["annotations"] = [
        annotation(1, "good", ident=4, when="2026-01-01T00:00"),
        annotation(1, "bad", ident=9, when="2026-01-01T00:05"),
        annotation(2, "", ident=5, cancelled=True),
        annotation(3, "bad", ident=6),
    ]
    # image 2: only annotator 2, who submitted nothing usable (no choice): reported, not dropped silently
    round_tasks[2]["annotations"] = [{"id": 7, "completed_by": 2, "was_cancelled": False, "result": []}]
    # best: 1 and 2 pick image 0, 3 keeps the current best
    round_tasks[3]["annotations"] = [
        annotation(1, IDS[0], ident=11, control="best"),
        annotation(2, IDS[0], ident=12, control="best"),
        annotation(3, "keep", ident=13, control="best"),
    ]
    collected = collect_round(round_tasks, annotators_per_image=2)
    assert collected.cancelled == 1 and collected.replaced == 1
    assert collected.problems == [
        "task 12, annotation 7 by annotator 2: no good/bad choice where one is wanted; "
        "the image stays unlabelled by them"
    ]
    assert collected.labels_by_annotator == {"1": 2, "2": 1, "3": 2}
    progress = collected.progress
    assert (progress.labels, progress.labels_required, progress.best_votes) == (4, 6, 3)
    assert progress.least_labels == 0  # image 2
    assert not progress.complete and str(progress) == "4/6 labels, 3/2 best votes"
    with pytest.raises(FeedbackError, match=r"1 of 3 images have no label \('r0001-002'\)"):
        collected.round_feedback(IDS, has_current_best=True)

    round_tasks[2]["annotations"].append(annotation(3, "good", ident=8))
    round_tasks[2]["annotations"].append(annotation(1, "bad", ident=14))
    collected = collect_round(round_tasks, annotators_per_image=2)
    assert collected.progress.complete and collected.progress.least_labels == 2
    verdict = collected.round_feedback(IDS, has_current_best=True)
    # image 0: 2 good of 3; image 1: 0 of 2; image 2: 1 good of 2 is a tie (bad)
    assert verdict.good == (True, False, False)
    assert verdict.best == 0 and verdict.best_agreement == pytest.approx(2 / 3)
    assert verdict.feedbacks == 3 + 2 + 2 and verdict.annotators == ("1", "2", "3")


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest-first", "newest-first"])
def test_an_annotators_latest_annotation_of_an_image_is_their_label(newest_first: bool) -> None:
    # Label Studio promises no order of a task's annotations: the latest update wins, by its time; the
    # ids run against the times here, so an order by id (or by position) gives the other labels
    round_tasks = tasks()
    for index, (first, then) in enumerate([("good", "bad"), ("bad", "good")]):
        pair = [
            annotation(1, first, ident=40 - index, when="2026-01-01T00:00"),
            annotation(1, then, ident=30 - index, when="2026-01-01T00:05"),
        ]
        round_tasks[index]["annotations"] = pair[::-1] if newest_first else pair
    round_tasks[2]["annotations"] = [annotation(1, "good", ident=1)]
    round_tasks[3]["annotations"] = [annotation(1, IDS[1], ident=2, control="best")]
    collected = collect_round(round_tasks)
    assert collected.replaced == 2 and collected.problems == []
    verdict = collected.round_feedback(IDS, has_current_best=True)
    assert verdict.good == (False, True, True) and verdict.best == 1


def test_tasks_of_another_run_or_round_in_the_project_are_not_this_rounds() -> None:
    round_tasks = tasks()
    for n, task in enumerate(round_tasks[:3]):
        task["annotations"] = [annotation(1, "bad", ident=n + 1)]
    round_tasks[3]["annotations"] = [annotation(1, "keep", ident=9, control="best")]
    for other in ({"run_id": "other-run"}, {"round": 2}):
        stray = copy.deepcopy(round_tasks[0])  # the same image id and pixels, labelled good later
        stray["id"] = 99
        stray["data"]["hero"].update(other)
        stray["annotations"] = [annotation(1, "good", ident=50, when="2026-02-01T00:00")]
        collected = collect_round([*round_tasks, stray])
        assert collected.problems == [] and collected.replaced == 0, other
        assert collected.round_feedback(IDS, has_current_best=True).good == (False, False, False)


def test_an_annotator_given_as_a_user_object_is_its_id() -> None:
    # exports with annotator details give completed_by as the user object; counting its repr would split
    # one annotator in two when the same person also appears as a bare id
    round_tasks = tasks()
    round_tasks[0]["annotations"] = [
        {**annotation(1, "good", ident=1), "completed_by": {"id": 4, "email": "a@b"}}
    ]
    round_tasks[1]["annotations"] = [annotation(4, "bad", ident=2)]
    round_tasks[2]["annotations"] = [{**annotation(1, "bad", ident=3), "completed_by": {"email": "a@b"}}]
    collected = collect_round(round_tasks)
    assert collected.labels_by_annotator == {"4": 2}
    assert collected.problems == ["task 12: annotation 3 names no usable annotator (completed_by); skipped"]


def test_annotations_posted_through_the_api_are_read_strictly() -> None:
    # anyone with an account can post any JSON: an annotator is a user id (or a name), a skip is a
    # boolean true, and a choice of any length is quoted cut
    round_tasks = tasks()
    round_tasks[0]["annotations"] = [
        {**annotation(1, "good", ident=1), "completed_by": [1, 2]},
        {**annotation(2, "good", ident=2), "completed_by": True},
        {**annotation(3, "good", ident=3), "was_cancelled": "false"},  # given, not skipped
    ]
    round_tasks[1]["annotations"] = [annotation(3, "[/]" + "x" * 500, ident=4)]
    collected = collect_round(round_tasks)
    assert collected.labels_by_annotator == {"3": 1} and collected.cancelled == 0
    assert collected.problems == [
        "task 10: annotation 1 names no usable annotator (completed_by); skipped",
        "task 10: annotation 2 names no usable annotator (completed_by); skipped",
        "task 11, annotation 4 by annotator 3: no good/bad choice (got '[/]" + "x" * 75 + "…); the image "
        "stays unlabelled by them",
    ]


def test_collect_reports_what_it_cannot_map() -> None:
    round_tasks = tasks()
    for task in round_tasks[:3]:
        task["annotations"] = [annotation(1, "bad", ident=task["id"])]
    round_tasks[0]["annotations"] = [annotation(1, "good", ident=1)]
    round_tasks[3]["annotations"] = [annotation(1, IDS[1], ident=2, control="best")]  # best it called bad
    stranger = {"id": 30, "data": {"image": "x"}, "annotations": [annotation(5, "good")]}
    other_round = {
        "id": 31,
        "data": {**tasks()[0]["data"], "hero": {**tasks()[0]["data"]["hero"], "round": 0}},
        "annotations": [annotation(6, "good")],
    }
    round_tasks[1]["annotations"].append({**annotation(1, "good", ident=8), "completed_by": 3.5})
    round_tasks[2]["annotations"].append({**annotation(1, "good", ident=9), "completed_by": "x" * 201})
    unknown = {
        "id": 32,
        "data": {**tasks()[0]["data"], "hero": {**tasks()[0]["data"]["hero"], "image_id": "x"}},
        "annotations": [annotation(7, "good")],
    }
    collected = collect_round([*round_tasks, stranger, other_round, unknown])
    assert collected.problems == [
        "task 11: annotation 8 names no usable annotator (completed_by); skipped",
        "task 12: annotation 9 names no usable annotator (completed_by); skipped",
        "task 30: no valid hero metadata (kind image or best); its labels cannot be mapped",
        "task 32: image 'x' is not in round 1; labels ignored",
        "annotator 1 picked 'r0001-001' as best but labelled it bad; their best vote is not counted",
    ]
    verdict = collected.round_feedback(IDS, has_current_best=True)
    assert verdict.good == (True, False, False) and verdict.best is None  # no valid best vote: keep
    assert collected.progress.best_votes == 0  # the dropped vote does not close the round

    first = collect_round(tasks()[3:], has_current_best=False)
    assert first.problems == []
    keep_in_round_0 = tasks()[3:]
    keep_in_round_0[0]["annotations"] = [annotation(1, "keep", ident=3, control="best")]
    collected = collect_round(keep_in_round_0, has_current_best=False)
    assert collected.problems == [
        "task 20, annotation 3 by annotator 1: kept the current best in the first round, where there is none"
    ]


def test_a_deleted_annotators_labels_count_and_tasks_gone_or_claimed_twice_are_named() -> None:
    round_tasks = tasks()
    # Label Studio nulls completed_by when the account is deleted: the labels still count, each
    # annotation as its own annotator; a present but unusable value stays a problem
    round_tasks[0]["annotations"] = [{**annotation(1, "good", ident=5), "completed_by": None}]
    round_tasks[1]["annotations"] = [{**annotation(1, "bad", ident=6), "completed_by": None}]
    # one annotation choosing two answers is not a label (the problem quotes both)
    round_tasks[2]["annotations"] = [
        {
            **annotation(2, "good", ident=7),
            "result": [*annotation(2, "good")["result"], *annotation(2, "bad")["result"]],
        }
    ]
    del round_tasks[3]  # the best task, deleted in Label Studio
    claimed = {
        **tasks()[0],
        "id": 40,
        "annotations": [annotation(3, "bad", ident=8)],
    }  # data edited to image 0
    unlabelled_stranger = {
        "id": 41,
        "data": {"image": "x"},
        "annotations": [],
    }  # none of ours, nothing to map
    collected = collect_round([*round_tasks, claimed, unlabelled_stranger])
    assert collected.labels_by_annotator == {"deleted-user-5": 1, "deleted-user-6": 1}
    assert collected.problems == [
        "task 12, annotation 7 by annotator 2: 2 good/bad choices ['good', 'bad'] where one is wanted; "
        "the image stays unlabelled by them",
        "task 40: image 'r0001-000' is task 10's already; labels ignored",
    ]
    assert collected.missing_tasks == ["the best task"]
    del round_tasks[2]
    gone = collect_round(round_tasks)
    assert gone.missing_tasks == ["image 'r0001-002'", "the best task"]
    assert gone.progress.labels == 2


def test_a_task_showing_other_pixels_is_reported_not_counted() -> None:
    round_tasks = tasks()
    stale = {**round_tasks[1], "id": 50}  # an earlier run's task of image 1 (that name's project was kept)
    stale["data"] = {**stale["data"], "hero": {**stale["data"]["hero"], "sha256": "e" * 64}}
    round_tasks[1] = stale
    old_release = round_tasks[2]  # published before tasks carried a digest: nothing to compare
    old_release["data"] = {**old_release["data"], "hero": {**old_release["data"]["hero"], "sha256": None}}
    for task in round_tasks[:3]:
        task["annotations"] = [annotation(1, "good", ident=task["id"])]
    collected = collect_round(round_tasks)
    assert collected.problems == [
        "task 50: its sha256 is not image 'r0001-001''s in round 1's manifest (its data edited, or an "
        "earlier run's of this name): it showed other pixels; labels ignored"
    ]
    assert collected.labels_by_annotator == {"1": 2}  # images 0 and 2
    assert collected.missing_tasks == ["image 'r0001-001'"]  # published again: the true task is gone
    best = tasks()[3]
    best["data"]["hero"]["sha256"] = "0" * 64  # the grid's digest is checked too
    assert collect_round([best]).missing_tasks[-1] == "the best task"


def test_suggestions_split_the_encoder_ranking_at_the_median() -> None:
    assert suggestions([0.2, 0.9, 0.5, 0.7]) == [("bad", 0.2), ("good", 0.9), ("bad", 0.5), ("good", 0.7)]
    assert suggestions([0.2, float("nan"), 0.5]) == [None, None, None]  # a diverged encoder ranks nothing
    assert suggestions([]) == []
    task = image_task(
        run_id="r",
        round_index=1,
        image_id="i",
        position=0,
        prompt="p",
        image_url="u",
        image_sha256="0" * 64,
        best_url="b",
        suggestion=("good", 0.9),
    )
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == SUGGESTION_MODEL and prediction["score"] == 0.9
    assert prediction["result"][0]["from_name"] == "label"
    assert prediction["result"][0]["value"] == {"choices": ["good"]}


def test_a_round_closes_when_complete_or_at_its_deadline_with_the_minimum() -> None:
    published = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def progress(labels: int, least: int, best_votes: int) -> Progress:
        return Progress(
            images=4,
            labels_required=8,
            labels=labels,
            best_votes_required=2,
            best_votes=best_votes,
            least_labels=least,
        )

    def ready(
        p: Progress, hours_later: float, deadline_h: float | None = 24, first: bool = False
    ) -> Readiness:
        return readiness(
            p,
            first_round=first,
            published_at=published,
            now=published + timedelta(hours=hours_later),
            deadline_h=deadline_h,
            deadline_min_labels=1,
        )

    assert ready(progress(8, 2, 2), 0.1) == Readiness(True, "complete")
    # no deadline: an incomplete round waits however long it takes
    assert ready(progress(7, 1, 2), 1000, deadline_h=None) == Readiness(
        False, "waiting for 7/8 labels, 2/2 best votes"
    )
    # before the deadline it waits; after it, every image needs the minimum (1 label)
    assert ready(progress(7, 1, 2), 23.9) == Readiness(
        False, "waiting for 7/8 labels, 2/2 best votes (deadline 2026-01-02T12:00:00+00:00)"
    )
    assert ready(progress(7, 1, 2), 24) == Readiness(
        True, "deadline 2026-01-02T12:00:00+00:00 passed with 7/8 labels, 2/2 best votes"
    )
    late = ready(progress(7, 0, 2), 48)
    assert not late.ready and "1 labels on every image" in late.reason
    # the first round has no current best to keep: it needs a best vote even at the deadline
    assert not ready(progress(4, 1, 0), 48, first=True).ready
    assert ready(progress(4, 1, 0), 48).ready
    # annotations collect could not use are named: Label Studio gives their tasks out no more
    dropped = ["annotator 7 picked 'b' as best but labelled it bad; their best vote is not counted", "x"]
    stuck = readiness(
        progress(8, 2, 1),
        first_round=False,
        published_at=published,
        now=published,
        deadline_h=None,
        deadline_min_labels=1,
        not_counted=dropped,
    )
    assert stuck == Readiness(
        False,
        "waiting for 8/8 labels, 1/2 best votes; 2 annotation(s) not counted, fix or delete them in "
        "Label Studio (`hero labelstudio status` lists them), e.g. annotator 7 picked 'b' as best but "
        "labelled it bad; their best vote is not counted",
    )
    # tasks gone from Label Studio: the round is to be entered again, which publishes them, even past
    # its deadline (their images would never get the minimum)
    for hours in (0, 48):
        gone = readiness(
            progress(6, 0, 2),
            first_round=False,
            published_at=published,
            now=published + timedelta(hours=hours),
            deadline_h=24,
            deadline_min_labels=1,
            missing_tasks=["image 'r0001-002'"],
        )
        assert gone == Readiness(
            False,
            "1 of the round's tasks are gone from Label Studio (e.g. image 'r0001-002'): publishing them "
            "again; 6/8 labels, 2/2 best votes so far",
            republish=True,
        )
    assert ready(progress(8, 2, 2), 0).republish is False
    # a deadline that closes the round without them wins; a failed try is repeated only after its back-off
    closes = readiness(
        progress(7, 1, 2),
        first_round=False,
        published_at=published,
        now=published + timedelta(hours=48),
        deadline_h=24,
        deadline_min_labels=1,
        missing_tasks=["the best task"],
    )
    assert closes.ready and not closes.republish
    waits = readiness(
        progress(6, 0, 2),
        first_round=False,
        published_at=published,
        now=published + timedelta(hours=1),
        deadline_h=None,
        deadline_min_labels=1,
        missing_tasks=["the best task"],
        republish_after=published + timedelta(hours=2),
    )
    assert waits == Readiness(
        False,
        "1 of the round's tasks are gone from Label Studio (e.g. the best task): publishing them again "
        "failed, next try after 2026-01-01T14:00:00+00:00; 6/8 labels, 2/2 best votes so far",
    )
