"""A round's feedback: each annotator's labels, validated against the round, and several annotators
aggregated into the one verdict the engine learns from.

The protocol is HERO's (HERO-REFERENCE.md): every image is *good* (as good as or better than the
current best) or *bad*, and one *best* is picked, or the current best, from an earlier round, is
kept. Cases the reference leaves open are defined here:

- first round: there is nothing to keep, so a best must be picked; the best is good by definition.
- no good image in a later round: the current best is kept; the round says "all worse than the best".
- every image good: the round has no negatives; the engine skips the encoder update (nothing to push
  away) but rewards still rank the images.

One feedback is one label of one image by one annotator: three annotators on a 64-image round spend
192 feedbacks, the human effort the budget meters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hero_ml.errors import HeroError

KEEP = "keep"  # a best vote for the current best rather than an image of this round


class FeedbackError(HeroError, ValueError):
    """Feedback that cannot be used as it is; the message names the annotator, the image and the rule."""


class ImageLabel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    image_id: str = Field(min_length=1, max_length=200, description="The image's id within its round.")
    label: Literal["good", "bad"] = Field(description="good: as good as or better than the current best.")
    best: bool = Field(False, description="This image is the annotator's pick for the new best.")


class AnnotatorFeedback(BaseModel):
    """One annotator's labels of one round, as collected (Label Studio, a simulated annotator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    annotator: str = Field(min_length=1, max_length=200, description="Who labelled (a stable id).")
    images: tuple[ImageLabel, ...] = Field(description="One label per image of the round.")
    keep_best: bool = Field(False, description="No image of this round beats the current best.")

    @property
    def best_vote(self) -> str | None:
        """The image id voted best, KEEP, or None: no vote (a team member who only labelled images)."""
        picked = [label.image_id for label in self.images if label.best]
        return picked[0] if picked else KEEP if self.keep_best else None

    def check(self, image_ids: Sequence[str], has_current_best: bool, complete: bool = True) -> None:
        """Raise FeedbackError unless these labels are of the round's images (all of them when
        `complete`) and pick at most one best, which is labelled good."""
        who = f"annotator {self.annotator!r}"
        seen = Counter(label.image_id for label in self.images)
        twice = sorted(i for i, n in seen.items() if n > 1)
        if twice:
            raise FeedbackError(f"{who} labelled images more than once: {_few(twice)}")
        unknown = sorted(set(seen) - set(image_ids))
        if unknown:
            raise FeedbackError(f"{who} labelled images that are not in this round: {_few(unknown)}")
        missing = [i for i in image_ids if i not in seen]
        if missing and complete:
            raise FeedbackError(
                f"incomplete round: {who} left {len(missing)} of {len(image_ids)} images unlabelled "
                f"({_few(missing)}); every image needs good or bad"
            )
        bests = [label for label in self.images if label.best]
        if len(bests) > 1:
            raise FeedbackError(
                f"{who} picked {len(bests)} bests ({_few([b.image_id for b in bests])}); pick exactly one"
            )
        if bests and bests[0].label != "good":
            raise FeedbackError(
                f"{who} picked {bests[0].image_id!r} as best but labelled it bad; "
                "the best is good by definition"
            )
        if bests and self.keep_best:
            raise FeedbackError(f"{who} both picked a best and kept the current one; choose one of the two")
        if not bests and not self.keep_best and complete:
            raise FeedbackError(f"{who} picked no best; pick one image or keep the current best")
        if self.keep_best and not has_current_best:
            raise FeedbackError(
                f"{who} kept the current best, but this is the first round: there is none yet, pick an image"
            )


class RoundFeedback(BaseModel):
    """The verdict on a round that the engine learns from (one annotator's, or the aggregate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image_ids: tuple[str, ...] = Field(min_length=1, description="The round's images, in sampling order.")
    good: tuple[bool, ...] = Field(description="good (True) or bad, aligned with image_ids.")
    best: int | None = Field(description="Index of the new best in image_ids; None keeps the current best.")
    annotators: tuple[str, ...] = Field(min_length=1, description="Who labelled.")
    labels: int = Field(ge=1, description="Image labels given in all: the feedbacks this round spent.")
    label_agreement: float = Field(
        ge=0, le=1, description="Mean over images of the share of annotators who gave the majority label."
    )
    unanimous_share: float = Field(ge=0, le=1, description="Share of images on which all annotators agree.")
    best_agreement: float = Field(ge=0, le=1, description="Share of best votes that went to the winner.")

    @model_validator(mode="after")
    def _consistent(self) -> RoundFeedback:
        if len(self.good) != len(self.image_ids):
            raise ValueError(f"good has {len(self.good)} entries for {len(self.image_ids)} images")
        if self.best is not None:
            if not 0 <= self.best < len(self.image_ids):
                raise ValueError(
                    f"best index {self.best} is outside the round's {len(self.image_ids)} images"
                )
            if not self.good[self.best]:
                raise ValueError(f"best image {self.image_ids[self.best]!r} is not good")
        if self.labels < len(self.image_ids):
            raise ValueError(f"{self.labels} labels cannot cover the round's {len(self.image_ids)} images")
        return self

    @property
    def feedbacks(self) -> int:
        """Labels spent on this round (images x annotators when each labelled every image)."""
        return self.labels

    @property
    def good_indices(self) -> list[int]:
        return [i for i, good in enumerate(self.good) if good]

    @property
    def bad_indices(self) -> list[int]:
        return [i for i, good in enumerate(self.good) if not good]


def aggregate(
    feedback: Sequence[AnnotatorFeedback],
    image_ids: Sequence[str],
    *,
    has_current_best: bool,
    complete: bool = True,
) -> RoundFeedback:
    """Combine several annotators' labels of a round into one verdict.

    complete: every annotator labelled every image (the simulated annotators, one task per round);
    otherwise each annotator labelled some images (a team sharing a round's image tasks) and every
    image must have at least one label.
    good: a strict majority of the image's good labels (a tie is bad: "as good as the best" needs a
    majority).
    best: the plurality of best votes among the aggregated-good images and KEEP (when there is a
    current best). Ties go to KEEP, then to the image with more good labels, then to the earlier
    image. When no vote lands on a candidate: KEEP if there is a current best, else the most-voted
    image (same tie-breaks), which is then good, as every best is.
    """
    if not feedback:
        raise FeedbackError("no feedback: a round needs at least one annotator's labels")
    names = Counter(f.annotator for f in feedback)
    repeated = sorted(n for n, count in names.items() if count > 1)
    if repeated:
        raise FeedbackError(f"annotators appear more than once: {_few(repeated)}; keep one submission each")
    for annotator_feedback in feedback:
        annotator_feedback.check(image_ids, has_current_best, complete)

    labels = [{label.image_id: label.label == "good" for label in f.images} for f in feedback]
    good_votes = [sum(votes.get(i, False) for votes in labels) for i in image_ids]
    label_counts = [sum(i in votes for votes in labels) for i in image_ids]
    unlabelled = [i for i, count in zip(image_ids, label_counts, strict=True) if count == 0]
    if unlabelled:
        raise FeedbackError(
            f"incomplete round: {len(unlabelled)} of {len(image_ids)} images have no label "
            f"({_few(unlabelled)}); every image needs good or bad"
        )
    good = [2 * votes > count for votes, count in zip(good_votes, label_counts, strict=True)]
    best_votes = Counter(vote for f in feedback if (vote := f.best_vote) is not None)
    if not best_votes and not has_current_best:
        raise FeedbackError(
            "nobody picked a best, and the first round must pick one: the best task needs a vote"
        )
    position = {image_id: index for index, image_id in enumerate(image_ids)}

    def rank(vote: str) -> tuple[int, int, int, int]:  # max() wins: votes, then KEEP, good labels, earlier
        if vote == KEEP:
            return (best_votes[vote], 1, 0, 0)
        return (best_votes[vote], 0, good_votes[position[vote]], -position[vote])

    candidates = [v for v in best_votes if (has_current_best if v == KEEP else good[position[v]])]
    if candidates:
        winner = max(candidates, key=rank)
    elif has_current_best:
        winner = KEEP
    else:
        winner = max((v for v in best_votes if v != KEEP), key=rank)
    best = None if winner == KEEP else position[winner]
    if best is not None:
        good[best] = True

    majority = [
        max(votes, count - votes) / count for votes, count in zip(good_votes, label_counts, strict=True)
    ]
    return RoundFeedback(
        image_ids=tuple(image_ids),
        good=tuple(good),
        best=best,
        annotators=tuple(f.annotator for f in feedback),
        labels=sum(label_counts),
        label_agreement=sum(majority) / len(majority),
        unanimous_share=sum(share == 1 for share in majority) / len(majority),
        best_agreement=best_votes[winner] / max(1, sum(best_votes.values())),
    )


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
