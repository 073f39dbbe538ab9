import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hero_ml.guidance import NoisePool, guided_initial_noise
from hero_ml.rewards import mean_similarity_to_good, similarity_to_best, with_labels


def test_guided_noise_is_the_reference_formula_draw_for_draw() -> None:
    gen = torch.Generator().manual_seed(0)
    best, good = torch.randn(4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    noise = guided_initial_noise(
        best, good, 7, best_ratio=0.5, eps=0.1, generator=torch.Generator().manual_seed(1)
    )

    replay = torch.Generator().manual_seed(1)
    picks = torch.randint(3, (3,), generator=replay)  # ceil(3.5) = 4 near the best, 3 near good ones
    centres = torch.cat([best.expand(4, 4, 8, 8), good[picks]])
    expected = math.sqrt(1 - 0.01) * centres + 0.1 * torch.randn(centres.shape, generator=replay)
    assert torch.equal(noise, expected)


def test_the_best_has_its_share_and_no_more() -> None:
    gen = torch.Generator().manual_seed(0)
    best, good = torch.randn(4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    noise = guided_initial_noise(best, good, 10, best_ratio=0.3, eps=0.0, generator=gen)
    assert all(torch.equal(noise[i], best) for i in range(3))
    assert all(any(torch.equal(noise[i], g) for g in good) for i in range(3, 10))
    # the share is the product as written, rounded up: 100 x 0.07 is 7 (7.000000000000001 in floats)
    for n, ratio, share in ((100, 0.07, 7), (50, 0.14, 7), (10, 0.25, 3)):
        noise = guided_initial_noise(best, good, n, best_ratio=ratio, eps=0.0, generator=gen)
        assert sum(torch.equal(x, best) for x in noise) == share
    # the reference's best_ratio 0: no share of its own, the best is drawn like a good image
    noise = guided_initial_noise(best, good, 200, best_ratio=0.0, eps=0.0, generator=gen)
    drawn_best = sum(torch.equal(x, best) for x in noise)
    assert all(any(torch.equal(x, p) for p in [*good, best]) for x in noise)
    assert 40 < drawn_best < 95  # a third of 200 (binomial std 6.7)


@pytest.mark.parametrize("best_ratio", [0.0, 0.5])
def test_without_other_good_images_every_noise_starts_near_the_best(best_ratio: float) -> None:
    best = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = guided_initial_noise(
        best, torch.empty(0, 4, 8, 8), 6, best_ratio=best_ratio, eps=0.0, generator=torch.Generator()
    )
    assert torch.equal(noise, best.expand(6, 4, 8, 8))


def test_guided_noise_keeps_the_prior_and_correlates_with_its_centre() -> None:
    gen = torch.Generator().manual_seed(3)
    best, good = torch.randn(4, 16, 16, generator=gen), torch.randn(5, 4, 16, 16, generator=gen)
    noise = guided_initial_noise(best, good, 2048, best_ratio=0.5, eps=0.1, generator=gen)
    residual = noise[:1024] - math.sqrt(1 - 0.01) * best
    assert residual.mean().abs() < 0.002 and residual.std() == pytest.approx(0.1, rel=0.01)
    # an element's variance across images near one centre is eps^2; the centres themselves are N(0, 1)
    assert noise.var() == pytest.approx(1.0, rel=0.1)


def test_guided_noise_refuses_bad_arguments() -> None:
    best = torch.zeros(4, 8, 8)
    with pytest.raises(ValueError, match="best_ratio and eps must lie in"):
        guided_initial_noise(
            best, torch.zeros(1, 4, 8, 8), 4, best_ratio=1.5, eps=0.1, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match=r"good noises have shape \(4, 4, 4\), the best \(4, 8, 8\)"):
        guided_initial_noise(
            best, torch.zeros(1, 4, 4, 4), 4, best_ratio=0.5, eps=0.1, generator=torch.Generator()
        )


FEATURES = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])


def test_a_noise_pool_saves_loads_and_samples_as_the_round_does(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    best, good = torch.randn(4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    pool = NoisePool(best, good, best_ratio=0.25, eps=0.2, prompt="a blue circle")
    pool.save(tmp_path / "pool")
    loaded = NoisePool.load(tmp_path / "pool")
    assert torch.equal(loaded.best, best) and torch.equal(loaded.good, good)
    assert (loaded.best_ratio, loaded.eps, loaded.prompt) == (0.25, 0.2, "a blue circle")
    expected = guided_initial_noise(
        best, good, 6, best_ratio=0.25, eps=0.2, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(loaded.sample(6, torch.Generator().manual_seed(5)), expected)


def test_a_broken_noise_pool_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    folder = tmp_path / "pool"
    with pytest.raises(ValueError, match="holds no readable noise pool"):
        NoisePool.load(folder)  # nothing there
    NoisePool(torch.zeros(4, 8, 8), torch.zeros(0, 4, 8, 8), 0.5, 0.1, "p").save(folder)
    settings = folder / NoisePool.SETTINGS
    settings.write_text(json.dumps({"best_ratio": 0.5, "eps": 1.5, "prompt": "p"}))
    with pytest.raises(ValueError, match=r"eps\n  Input should be less than or equal to 1"):
        NoisePool.load(folder)
    settings.write_text(json.dumps({"best_ratio": 0.5, "eps": 0.1}))
    with pytest.raises(ValueError, match=r"prompt\n  Field required"):
        NoisePool.load(folder)
    NoisePool(torch.zeros(4, 8, 8), torch.zeros(2, 4, 4, 4), 0.5, 0.1, "p").save(folder)
    with pytest.raises(ValueError, match=r"good noises have shape \(4, 4, 4\), the best \(4, 8, 8\)"):
        NoisePool.load(folder)
    settings.write_text(json.dumps({"best_ratio": 0.5, "eps": 0.1, "prompt": "p"}))
    save_file({"best": torch.zeros(4, 8, 8)}, folder / NoisePool.TENSORS)
    with pytest.raises(ValueError, match=r"holds no readable noise pool .*: 'good'"):
        NoisePool.load(folder)
    (folder / NoisePool.TENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(
        ValueError, match=r"holds no readable noise pool .*: Error while deserializing header"
    ):
        NoisePool.load(folder)


def test_similarity_to_best_on_hand_computed_cases() -> None:
    rewards = similarity_to_best(FEATURES, torch.tensor([5.0, 0.0]))
    assert rewards.tolist() == [1.0, 0.5, 0.0]  # cos 1, 0, -1 -> (cos + 1) / 2


def test_mean_similarity_to_good_on_hand_computed_cases() -> None:
    rewards = mean_similarity_to_good(FEATURES, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert rewards.tolist() == pytest.approx([0.75, 0.75, 0.25])
    with pytest.raises(ValueError, match="at least one good image"):
        mean_similarity_to_good(FEATURES, torch.empty(0, 2))


def test_labels_lift_every_good_image_above_every_bad_one() -> None:
    rewards = with_labels(torch.tensor([0.25, 0.875, 0.5]), torch.tensor([True, False, True]))
    assert rewards.tolist() == [1.25, 0.875, 1.5]  # the bad image's 0.875 now ranks below both good ones
    with pytest.raises(ValueError, match=r"bool tensor of the rewards' shape \(3,\)"):
        with_labels(torch.zeros(3), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="bool tensor"):
        with_labels(torch.zeros(3), torch.tensor([True, False]))
