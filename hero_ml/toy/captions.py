"""The caption grammar: compositions to prompts ("three red circles on the left") and back.

    caption   := [frame] groups [region]      | region ", " groups
    groups    := group | group " and " group | group " with " group
    group     := count [colour] kind(s)       (no colour: any one colour)
    count     := a/an/one | two | three | four | 1..4
    region    := on the left | in the left half | on the top | ...

Paraphrases vary the frame, the count words, the conjunction and the region phrase; `parse_caption`
reads every paraphrase back to the same composition.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import ValidationError

from hero_ml.toy.scene import COLORS, KINDS, MAX_COUNT, REGIONS, Composition, Group

COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",), 4: ("four",)}
FRAMES = ("{}", "a picture of {}", "an image of {}", "{} on a plain background")
CONJUNCTIONS = (" and ", " with ")
REGION_PHRASES = {
    "left": ("on the left", "in the left half"),
    "right": ("on the right", "in the right half"),
    "top": ("at the top", "in the top half"),
    "bottom": ("at the bottom", "in the bottom half"),
}

_NUMBERS = {word: n for n, words in COUNT_WORDS.items() for word in words} | {
    str(n): n for n in range(1, MAX_COUNT + 1)
}
_NUMBERS["an"] = 1
_GROUP = re.compile(rf"\b({'|'.join(_NUMBERS)})\s+(?:({'|'.join(COLORS)})\s+)?({'|'.join(KINDS)})s?\b")
_REGION = re.compile(r"\b(?:on|at|in) the (left|right|top|bottom)(?: half)?\b")


def caption(composition: Composition, rng: np.random.Generator | None = None) -> str:
    """The composition in words; with rng, a random paraphrase, else the canonical form."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]

    phrases = []
    for group in composition.groups:
        count = pick(COUNT_WORDS[group.count])
        if rng is not None and group.count > 1 and rng.random() < 0.2:
            count = str(group.count)
        words = [group.kind] if group.color is None else [group.color, group.kind]
        if count == "a" and words[0][0] in "aeiou":
            count = "an"
        plural = "s" if group.count > 1 else ""
        phrases.append(f"{count} {' '.join(words)}{plural}")
    conjunction = pick(CONJUNCTIONS)
    text = conjunction.join(phrases) if len(phrases) <= 2 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if composition.region is not None:
        where = pick(REGION_PHRASES[composition.region])
        if rng is not None and rng.random() < 0.3:
            return f"{where}, {text}"
        text = f"{text} {where}"
    return pick(FRAMES).format(text)


def parse_caption(text: str) -> Composition:
    """The composition a caption of this grammar states; ValueError naming what could not be read."""
    lowered = text.lower()
    groups = [
        Group(count=_NUMBERS[count], color=color or None, kind=kind)
        for count, color, kind in _GROUP.findall(lowered)
    ]
    if not groups:
        raise ValueError(
            f"no '<count> [colour] <shape>' phrase in {text!r}; counts: {sorted(_NUMBERS)}, "
            f"colours: {list(COLORS)}, shapes: {list(KINDS)}"
        )
    regions = _REGION.findall(lowered)
    if len(set(regions)) > 1:
        raise ValueError(f"{text!r} names more than one region: {regions}")
    try:
        return Composition(groups=tuple(groups), region=regions[0] if regions else None)
    except ValidationError as err:
        raise ValueError(f"{text!r}: {err.errors()[0]['msg']}") from None


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tokenizer's word list)."""
    words: set[str] = set()
    for options in COUNT_WORDS.values():
        words.update(options)
    words.update(str(n) for n in range(1, MAX_COUNT + 1))
    words.update(COLORS)
    words.update(KINDS)
    words.update(kind + "s" for kind in KINDS)
    for text in (*FRAMES, *CONJUNCTIONS, *(p for ps in REGION_PHRASES.values() for p in ps)):
        words.update(re.findall(r"[a-z]+", text))
    return sorted(words | set(REGIONS))
