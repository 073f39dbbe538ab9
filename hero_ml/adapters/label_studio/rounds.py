"""A HERO round as Label Studio tasks, and Label Studio annotations back as the round's feedback.

Pure functions on plain dicts (the JSON Label Studio speaks): no HTTP, no SDK. The labeling interface
is `label_studio/hero_round.xml`; the task granularity and its reasons are in label_studio/README.md.

A round is published as one *image task* per image (good / bad, hotkeys 1 / 2, beside the current best)
and one *best task* (the round's numbered grid: pick the best or keep the current one). Every task
carries `hero` metadata (run id, round, kind, image id, the flow run to resume) that maps its labels
back. Collecting reads every annotation of the round's tasks, reports each one it cannot use (and why)
instead of dropping it, keeps an annotator's latest annotation of a task, and turns the rest into one
AnnotatorFeedback per annotator for feedback.aggregate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hero_ml.feedback import KEEP, AnnotatorFeedback, FeedbackError, ImageLabel, RoundFeedback, aggregate

_HERE = Path(__file__).parent
LABEL_CONFIG = (_HERE / "hero_round.xml").read_text()
INSTRUCTIONS = (_HERE / "instructions.html").read_text()
IMAGE, BEST = "image", "best"
SUGGESTION_MODEL = "hero-encoder"  # the model_version of pre-annotations
LABEL_OPTIONS = [{"value": "good", "hotkey": "1"}, {"value": "bad", "hotkey": "2"}]


def image_task(
    *,
    run_id: str,
    round_index: int,
    image_id: str,
    position: int,
    prompt: str,
    image_url: str,
    image_sha256: str,
    best_url: str,
    flow_run_id: str | None = None,
    suggestion: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """The task asking whether one image is as good as the current best, in Label Studio's import
    form. image_sha256: the PNG's digest (the manifest's), which ties the task's labels to these pixels.
    suggestion: (good or bad, score) shown as a pre-annotation the annotator confirms or changes."""
    data = {
        "prompt": prompt,
        "question": "Is this image as good as or better than the current best? 1 = good, 2 = bad.",
        "image_title": f"Image #{position} of round {round_index}",
        "image": image_url,
        "current_best": best_url,
        "label_options": LABEL_OPTIONS,
        "best_options": [],
        "hero": _meta(run_id, round_index, IMAGE, flow_run_id, image_id=image_id, sha256=image_sha256),
    }
    if suggestion is None:
        return {"data": data}
    label, score = suggestion
    return {
        "data": data,
        "predictions": [
            {"model_version": SUGGESTION_MODEL, "score": score, "result": _choices("label", label)}
        ],
    }


def best_task(
    *,
    run_id: str,
    round_index: int,
    image_ids: list[str],
    prompt: str,
    grid_url: str,
    grid_sha256: str,
    best_url: str,
    has_current_best: bool,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """The task picking the round's best (tiles of the grid are numbered by position); grid_sha256: the
    grid PNG's digest."""
    options = [{"value": image_id, "html": f"#{n}"} for n, image_id in enumerate(image_ids)]
    if has_current_best:
        options.append({"value": KEEP, "html": "Keep the current best"})
    data = {
        "prompt": prompt,
        "question": (
            "Which image matches the prompt best? Pick its number"
            + (", or keep the current best if none beats it." if has_current_best else ".")
        ),
        "image_title": f"Round {round_index}: all {len(image_ids)} images",
        "image": grid_url,
        "current_best": best_url,
        "label_options": [],
        "best_options": options,
        "hero": _meta(run_id, round_index, BEST, flow_run_id, image_ids=list(image_ids), sha256=grid_sha256),
    }
    return {"data": data}


def suggestions(rewards: list[float]) -> list[tuple[str, float] | None]:
    """Pre-annotations from the encoder's rewards (similarity to the current best): good for the images
    above the round's median reward, bad for the rest, each with its reward as the score. A ranking,
    not a verdict: the encoder has no calibrated threshold, annotators decide. None for every image
    when a reward is not finite (a diverged encoder ranks nothing; JSON has no NaN)."""
    if not rewards or not all(math.isfinite(reward) for reward in rewards):
        return [None] * len(rewards)
    median = sorted(rewards)[len(rewards) // 2]
    return [("good" if reward >= median else "bad", round(float(reward), 4)) for reward in rewards]


def _choices(control: str, value: str) -> list[dict[str, Any]]:
    return [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def _meta(run_id: str, round_index: int, kind: str, flow_run_id: str | None, **extra: Any) -> dict[str, Any]:
    return {"run_id": run_id, "round": round_index, "kind": kind, "flow_run_id": flow_run_id, **extra}


TaskKey = tuple[str, int, str, str]  # run, round, kind, image id ('' for the best task)


def task_key(data: Any) -> TaskKey | None:
    """What makes a task unique within a run's project: (run, round, kind, image id or ''); None when
    the task's `hero` metadata is missing or malformed (task data can be edited in Label Studio)."""
    hero = data.get("hero") if isinstance(data, dict) else None
    if not isinstance(hero, dict):
        return None
    run_id, round_index, kind, image_id = (hero.get(k) for k in ("run_id", "round", "kind", "image_id"))
    if (
        not isinstance(run_id, str)
        or type(round_index) is not int
        or round_index < 0
        or not isinstance(kind, str)
        or not isinstance(image_id, str | None)
    ):
        return None
    return run_id, round_index, kind, image_id or ""


@dataclass(frozen=True)
class Progress:
    """How far a round's labelling is, for the orchestration layer's completion check."""

    images: int
    labels_required: int  # images x annotators_per_image
    labels: int  # usable labels, at most annotators_per_image counted per image
    best_votes_required: int
    best_votes: int
    least_labels: int  # usable labels of the least-labelled image

    @property
    def complete(self) -> bool:
        return self.labels >= self.labels_required and self.best_votes >= self.best_votes_required

    def __str__(self) -> str:
        labels = f"{self.labels}/{self.labels_required} labels"
        return f"{labels}, {self.best_votes}/{self.best_votes_required} best votes"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # why it may close ("complete", "deadline …") or what it still lacks
    # tasks of the round are gone from Label Studio (deleted, or their project): the round must be
    # entered again to publish them, or it would wait on labels no one can give
    republish: bool = False


def readiness(
    progress: Progress,
    *,
    first_round: bool,
    published_at: datetime,
    now: datetime,
    deadline_h: float | None,
    deadline_min_labels: int,
    not_counted: Sequence[str] = (),
    missing_tasks: Sequence[str] = (),
    republish_after: datetime | None = None,
) -> Readiness:
    """Whether a waiting round may close: every label it wants is in, or its deadline has passed and
    every image has at least `deadline_min_labels` labels (and the first round, which has no current
    best to keep, a best vote). not_counted: the annotations collect could not use (its problems),
    named in a waiting reason: Label Studio counts them done and gives their tasks out no more, so
    the round may wait on them for good. missing_tasks: the round's tasks Label Studio no longer holds
    (CollectedRound.missing_tasks): the round is to be published again, unless its deadline lets it
    close without them; republish_after: not before then (the last try failed)."""
    if progress.complete:
        return Readiness(True, "complete")
    deadline = None if deadline_h is None else published_at + timedelta(hours=deadline_h)
    minimum = progress.least_labels >= deadline_min_labels and not (first_round and progress.best_votes == 0)
    closes = deadline is not None and now >= deadline and minimum  # without the labels still missing
    if missing_tasks and not closes:
        gone = (
            f"{len(missing_tasks)} of the round's tasks are gone from Label Studio (e.g. {missing_tasks[0]})"
        )
        if republish_after is not None and now < republish_after:
            return Readiness(
                False,
                f"{gone}: publishing them again failed, next try after "
                f"{republish_after.isoformat(timespec='seconds')}; {progress} so far",
            )
        return Readiness(False, f"{gone}: publishing them again; {progress} so far", republish=True)
    if deadline is not None and closes:
        return Readiness(True, f"deadline {deadline.isoformat(timespec='seconds')} passed with {progress}")
    unusable = (
        f"; {len(not_counted)} annotation(s) not counted, fix or delete them in Label Studio "
        f"(`hero labelstudio status` lists them), e.g. {not_counted[0]}"
        if not_counted
        else ""
    )
    if deadline is None:
        return Readiness(False, f"waiting for {progress}{unusable}")
    if now < deadline:
        return Readiness(
            False, f"waiting for {progress} (deadline {deadline.isoformat(timespec='seconds')}){unusable}"
        )
    return Readiness(  # past the deadline, not closed by it
        False,
        f"deadline passed, but the minimum is not met yet ({deadline_min_labels} labels on every "
        f"image{' and a best vote' if first_round else ''}): {progress}{unusable}",
    )


@dataclass
class CollectedRound:
    feedback: list[AnnotatorFeedback]  # one per annotator with usable labels
    progress: Progress
    problems: list[str] = field(default_factory=list)  # annotations that could not be used, and why
    missing_tasks: list[str] = field(default_factory=list)  # the round's tasks the project lacks
    cancelled: int = 0  # annotations the annotator skipped
    replaced: int = 0  # earlier annotations of a task by the same annotator (their latest counts)
    labels_by_annotator: dict[str, int] = field(default_factory=dict)

    def round_feedback(self, image_ids: list[str], has_current_best: bool) -> RoundFeedback:
        """The aggregate the engine learns from (FeedbackError when images lack labels)."""
        if not self.feedback:
            raise FeedbackError("no usable annotation yet: the round cannot be aggregated")
        return aggregate(self.feedback, image_ids, has_current_best=has_current_best, complete=False)


def collect(
    tasks: list[dict[str, Any]],
    *,
    run_id: str,
    round_index: int,
    image_ids: list[str],
    digests: Mapping[str, str],
    has_current_best: bool,
    annotators_per_image: int,
) -> CollectedRound:
    """Turn the round's tasks with their annotations (Label Studio task JSON) into per-annotator
    feedback. Tasks of other runs or rounds are ignored when they belong to this project's other
    rounds, reported when their metadata is broken. digests: the sha256 of each image (by id) and of
    the grid ('') in the round's manifest; a task whose digest differs shows other pixels, and its
    labels are reported, not counted (one published before tasks carried a digest has none)."""
    problems: list[str] = []
    cancelled = replaced = 0
    labels: dict[str, dict[str, str]] = {}  # annotator -> image id -> good/bad
    best_votes: dict[str, str] = {}  # annotator -> image id or KEEP
    known = set(image_ids)
    held: dict[str, Any] = {}  # image id ('' for the best task) -> the task holding it

    for task in tasks:
        if not isinstance(task, dict):
            problems.append(f"a task that is not a JSON object ({type(task).__name__}); skipped")
            continue
        data, task_id = task.get("data") or {}, task.get("id")
        key = task_key(data)
        if key is None or key[2] not in (IMAGE, BEST):
            if task.get("annotations"):  # a task someone added by hand, unlabelled: none of ours
                problems.append(
                    f"task {task_id}: no valid hero metadata (kind image or best); its labels cannot be "
                    "mapped"
                )
            continue
        if key[0] != run_id or key[1] != round_index:
            continue  # another round of the run: not this collection's business
        if key[2] == IMAGE and key[3] not in known:
            problems.append(f"task {task_id}: image {key[3]!r} is not in round {round_index}; labels ignored")
            continue
        shown = "the best task" if key[2] == BEST else f"image {key[3]!r}"
        if data["hero"].get("sha256") not in (None, digests.get(key[3])):
            problems.append(
                f"task {task_id}: its sha256 is not {shown}'s in round {round_index}'s manifest (its data "
                "edited, or an earlier run's of this name): it showed other pixels; labels ignored"
            )
            continue
        if key[3] in held:  # its metadata edited in Label Studio: which one's labels are meant is unknown
            problems.append(f"task {task_id}: {shown} is task {held[key[3]]}'s already; labels ignored")
            continue
        held[key[3]] = task_id
        latest: dict[str, dict[str, Any]] = {}
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            problems.append(f"task {task_id}: its annotations are not a list; none read")
            annotations = []
        for annotation in annotations:
            if not isinstance(annotation, dict):
                problems.append(f"task {task_id}: an annotation that is not a JSON object; skipped")
                continue
            given_by = annotation.get("completed_by")
            if isinstance(given_by, dict):  # exports with annotator details give the user object
                given_by = given_by.get("id")
            elif given_by is None and "completed_by" in annotation and type(annotation.get("id")) is int:
                # Label Studio nulls the annotator of a deleted account: their labels still count, each
                # annotation as an annotator of its own (who gave which is lost with the account)
                given_by = f"deleted-user-{annotation['id']}"
            who = str(given_by)
            # a user id (a number; a name in hand-made exports); an AnnotatorFeedback's id: 1-200 characters
            if type(given_by) not in (int, str) or not who or len(who) > 200:
                problems.append(
                    f"task {task_id}: annotation {annotation.get('id')} names no usable annotator "
                    "(completed_by); skipped"
                )
                continue
            if annotation.get("was_cancelled") is True:  # a skip; anything else counts as given
                cancelled += 1
                continue
            if who in latest:
                replaced += 1
                if _stamp(annotation) < _stamp(latest[who]):
                    continue
            latest[who] = annotation
        for who, annotation in latest.items():
            where = f"task {task_id}, annotation {annotation.get('id')} by annotator {who}"
            chosen = _choices_made(annotation, "label" if key[2] == IMAGE else "best")
            if len(chosen) != 1:
                made = "no " if not chosen else f"{len(chosen)} "
                wanted = "good/bad choice" if key[2] == IMAGE else "best pick"
                problems.append(
                    f"{where}: {made}{wanted}{'s ' + _shown(chosen) if chosen else ''} where one is wanted; "
                    + (
                        "the image stays unlabelled by them"
                        if key[2] == IMAGE
                        else "their best vote is not counted"
                    )
                )
                continue
            choice = chosen[0]
            if key[2] == IMAGE:
                if choice not in ("good", "bad"):
                    problems.append(
                        f"{where}: no good/bad choice (got {_shown(choice)}); the image stays unlabelled by "
                        "them"
                    )
                    continue
                labels.setdefault(who, {})[key[3]] = choice
            elif choice == KEEP and not has_current_best:
                problems.append(f"{where}: kept the current best in the first round, where there is none")
            elif choice != KEEP and choice not in known:
                problems.append(f"{where}: best {_shown(choice)} is not an image of round {round_index}")
            else:
                best_votes[who] = choice

    feedback = []
    counted_votes = 0  # what readiness counts: a dropped vote must not close the round
    for who in sorted(set(labels) | set(best_votes)):
        given = dict(labels.get(who, {}))
        vote = best_votes.get(who)
        if vote is not None and vote != KEEP:
            if given.get(vote) == "bad":
                problems.append(
                    f"annotator {who} picked {vote!r} as best but labelled it bad; "
                    "their best vote is not counted"
                )
                vote = None
            else:
                given[vote] = "good"  # picking an image as best says it is good (the protocol's rule)
        counted_votes += vote is not None
        if not given and vote is None:
            continue  # their only answer was dropped above
        feedback.append(
            AnnotatorFeedback(
                annotator=who,
                images=tuple(
                    ImageLabel(image_id=i, label=given[i], best=i == vote) for i in image_ids if i in given
                ),
                keep_best=vote == KEEP,
            )
        )
    per_image = Counter(i for given in labels.values() for i in given)
    progress = Progress(
        images=len(image_ids),
        labels_required=len(image_ids) * annotators_per_image,
        labels=sum(min(per_image[i], annotators_per_image) for i in image_ids),
        best_votes_required=annotators_per_image,
        best_votes=counted_votes,
        least_labels=min((per_image[i] for i in image_ids), default=0),
    )
    missing = [f"image {i!r}" for i in image_ids if i not in held] + ([] if "" in held else ["the best task"])
    return CollectedRound(
        feedback=feedback,
        progress=progress,
        problems=problems,
        missing_tasks=missing,
        cancelled=cancelled,
        replaced=replaced,
        labels_by_annotator={who: len(given) for who, given in labels.items()},
    )


def _choices_made(annotation: dict[str, Any], from_name: str) -> list[str]:
    """Every choice an annotation made in control `from_name` (one is an answer; none or several is
    not), each as text (anyone with an account can post any JSON)."""
    results = annotation.get("result")
    return [
        choice if isinstance(choice, str) else repr(choice)
        for result in (results if isinstance(results, list) else [])
        if isinstance(result, dict)
        and result.get("from_name") == from_name
        and isinstance(result.get("value"), dict)
        and isinstance(result["value"].get("choices"), list)
        for choice in result["value"]["choices"]
    ]


def _shown(value: str | list[str], limit: int = 80) -> str:
    """An annotator's choice as a problem quotes it: cut (anyone with an account can post any text)."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _stamp(annotation: dict[str, Any]) -> tuple[str, int]:
    number = annotation.get("id")
    return (str(annotation.get("updated_at") or ""), number if type(number) is int else 0)
