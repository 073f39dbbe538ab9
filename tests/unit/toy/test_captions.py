import numpy as np
import pytest

from hero_ml.toy.captions import caption, parse_caption, vocabulary
from hero_ml.toy.scene import Composition, Group, random_composition


@pytest.mark.parametrize(
    ("composition", "text"),
    [
        (Composition(groups=(Group(count=3, color="red", kind="circle"),)), "three red circles"),
        (
            Composition(
                groups=(
                    Group(count=1, color="blue", kind="square"),
                    Group(count=1, color="yellow", kind="triangle"),
                )
            ),
            "a blue square and a yellow triangle",
        ),
        (
            Composition(groups=(Group(count=2, color="green", kind="triangle"),), region="left"),
            "two green triangles on the left",
        ),
        (Composition(groups=(Group(count=1, color="orange", kind="circle"),)), "an orange circle"),
        (Composition(groups=(Group(count=2, color=None, kind="circle"),)), "two circles"),
        (
            Composition(
                groups=(Group(count=1, color=None, kind="square"), Group(count=3, color="red", kind="circle"))
            ),
            "a square and three red circles",
        ),
    ],
)
def test_canonical_captions(composition: Composition, text: str) -> None:
    assert caption(composition) == text
    assert parse_caption(text) == composition


def test_every_paraphrase_parses_back_to_its_composition() -> None:
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(3000):
        composition = random_composition(rng, region_rate=0.4).without_colors(rng, 0.3)
        text = caption(composition, rng)
        texts.add(text)
        assert parse_caption(text) == composition, text
    assert len(texts) > 1000  # paraphrases really vary


def test_paraphrases_of_one_composition() -> None:
    composition = Composition(groups=(Group(count=3, color="red", kind="circle"),), region="top")
    rng = np.random.default_rng(1)
    texts = {caption(composition, rng) for _ in range(200)}
    assert {"three red circles at the top", "3 red circles in the top half"} & texts
    assert len(texts) >= 6


def test_unreadable_captions_say_what_the_grammar_knows() -> None:
    with pytest.raises(ValueError, match=r"no '<count> \[colour\] <shape>' phrase"):
        parse_caption("a cat on a mat")
    with pytest.raises(ValueError, match="colour is left open may appear in one group only"):
        parse_caption("two circles and a red circle")
    with pytest.raises(ValueError, match="more than one region"):
        parse_caption("a red circle on the left and a blue square on the right")


def test_vocabulary_covers_every_generated_word() -> None:
    words = set(vocabulary())
    rng = np.random.default_rng(2)
    for _ in range(500):
        text = caption(random_composition(rng, region_rate=0.5), rng)
        assert set(text.replace(",", " ").split()) <= words, text


def test_without_colors_leaves_open_only_unambiguous_groups() -> None:
    composition = parse_caption("a red circle, a blue circle and two green squares")
    rng = np.random.default_rng(0)
    assert composition.without_colors(rng, 0.0) == composition
    opened = composition.without_colors(rng, 1.0)
    assert [g.color for g in opened.groups] == ["red", "blue", None]  # two circles: keep their colours
    assert caption(opened) == "a red circle, a blue circle and two squares"
    assert parse_caption(caption(opened)) == opened
