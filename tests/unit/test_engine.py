"""The engine on the tiny random SD: rounds of every method, checkpoints, resume bit for bit."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

import hero_ml.engine as engine_module
from hero_ml.adapters.storage import LocalStore
from hero_ml.config import HeroConfig
from hero_ml.diffusion.pipeline import build_random_pipeline
from hero_ml.engine import STATE, Engine, EngineError, RoundBatch
from hero_ml.feedback import AnnotatorFeedback, ImageLabel, RoundFeedback, aggregate

METHODS = ["hero", "hero-noguide", "ddpo-binary", "d3po"]


def small_config(method: str = "hero", **encoder: object) -> HeroConfig:
    return HeroConfig(
        method=method,
        model={"source": "random:tiny"},
        sampling={"prompt": "a red circle", "images_per_round": 6, "num_steps": 4, "sub_batch_size": 6},
        encoder={"epochs_per_round": 4, "triplets_per_epoch": 8, "lr": 1e-3, **encoder},
        ddpo={
            "timesteps_per_trajectory": 2,
            "train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "inner_epochs": 1,
        },
        feedback={"budget": 18},
    )


def brightness_labels(engine: Engine, batch: RoundBatch) -> RoundFeedback:
    """A deterministic stand-in for an annotator on random-weight images: brighter is better."""
    brightness = batch.trajectory.images.float().mean(dim=(1, 2, 3))
    bar = brightness.median()
    keep = engine.best_image is not None and engine.best_image.float().mean() > brightness.max()
    best = None if keep else int(brightness.argmax())
    labels = AnnotatorFeedback(
        annotator="bright",
        images=tuple(
            ImageLabel(image_id=i, label="good" if b > bar or n == best else "bad", best=n == best)
            for n, (i, b) in enumerate(zip(batch.image_ids, brightness, strict=True))
        ),
        keep_best=keep,
    )
    return aggregate([labels], batch.image_ids, has_current_best=engine.best_image is not None)


def run_rounds(engine: Engine, rounds: int) -> list[RoundBatch]:
    batches = []
    for _ in range(rounds):
        batch = engine.generate()
        engine.learn(batch, brightness_labels(engine, batch))
        batches.append(batch)
    return batches


def lora(engine: Engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.lora_params]


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_of_every_method(method: str) -> None:
    engine = Engine(small_config(method), build_random_pipeline("tiny", seed=0))
    start = lora(engine)
    batch = engine.generate()
    assert batch.image_ids == tuple(f"r0000-{i:03d}" for i in range(6)) and len(batch.trajectory) == 6
    feedback = brightness_labels(engine, batch)
    first = engine.learn(batch, feedback)
    second_batch = engine.generate()
    second = engine.learn(second_batch, brightness_labels(engine, second_batch))
    assert (first.round, second.round, engine.round) == (0, 1, 2)
    assert (first.feedbacks, second.feedbacks) == (6, 12)
    assert (first.good, first.bad) == (len(feedback.good_indices), len(feedback.bad_indices)) == (3, 3)
    assert first.new_best
    # 6 trajectories (d3po: 3 pairs) in micro-batches of 2, accumulated by 2
    assert first.optimizer_steps == (1 if method == "d3po" else 2)
    assert (first.encoder_loss_first is not None) == (method in ("hero", "hero-noguide"))
    assert (first.reward_good_mean is not None) == (method != "d3po")
    if method in ("hero", "hero-noguide"):
        assert 0 <= first.reward_bad_mean <= 1 and first.reward_good_mean > first.reward_bad_mean
    assert first.update_loss is not None and first.clip_fraction is not None
    assert any(not torch.equal(a, b) for a, b in zip(start, lora(engine), strict=True))
    metrics = second.metrics()  # what the tracker logs: numbers, the round as the step, no None
    assert "round" not in metrics and metrics["feedbacks"] == 12.0 and metrics["good"] == float(second.good)
    assert ("encoder_loss_first" in metrics) == (method in ("hero", "hero-noguide"))


@pytest.mark.parametrize("reward", ["best", "mean_good", "best_plus_label"])
def test_the_rewards_are_the_similarities_the_config_names(reward: str) -> None:
    engine = Engine(small_config("hero", reward=reward), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    feedback = brightness_labels(engine, batch)
    stats = engine.learn(batch, feedback)
    features, best = engine._features(batch.trajectory.final_step_input.float())  # the encoder as it rewarded
    scaled_cos = lambda a, b: (torch.nn.functional.cosine_similarity(a, b, dim=-1) + 1) / 2  # noqa: E731
    if reward == "best":
        expected = scaled_cos(features, best[None])
    elif reward == "best_plus_label":  # + 1 for every image the annotators called good
        expected = scaled_cos(features, best[None]) + torch.tensor(feedback.good, dtype=torch.float32)
    else:  # the other good images and the best: every image the annotators called good
        others = [i for i in feedback.good_indices if i != feedback.best]
        references = torch.cat([features[others], best[None]])
        expected = scaled_cos(features[:, None], references[None]).mean(dim=1)
    good, bad = feedback.good_indices, feedback.bad_indices
    assert stats.reward_good_mean == pytest.approx(expected[good].mean().item(), rel=1e-5)
    assert stats.reward_bad_mean == pytest.approx(expected[bad].mean().item(), rel=1e-5)


def test_ddpo_binary_rewards_good_images_1_and_bad_ones_0() -> None:
    engine = Engine(small_config("ddpo-binary"), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    stats = engine.learn(batch, brightness_labels(engine, batch))
    assert (stats.reward_good_mean, stats.reward_bad_mean) == (1.0, 0.0)


def test_guidance_starts_hero_rounds_near_the_best_noise() -> None:
    guided = Engine(small_config("hero"), build_random_pipeline("tiny", seed=0))
    plain = Engine(small_config("hero-noguide"), build_random_pipeline("tiny", seed=0))
    first = guided.generate()
    feedback = brightness_labels(guided, first)
    guided.learn(first, feedback)
    run_rounds(plain, 1)
    # the good noises are the good images' other than the new best, which is kept apart (the reference)
    assert feedback.best is not None and feedback.best in feedback.good_indices
    others = [i for i in feedback.good_indices if i != feedback.best]
    assert len(others) == len(feedback.good_indices) - 1
    assert torch.equal(guided.good_noises, first.trajectory.initial_noise[others])
    assert torch.equal(guided.best_noise, first.trajectory.initial_noise[feedback.best])
    assert guided.best_noise is not None and plain.best_noise is not None
    near = guided.generate().trajectory.initial_noise[:3]  # best_ratio 0.5: the first half
    far = plain.generate().trajectory.initial_noise[:3]
    distance = lambda x, best: (x - best).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    assert torch.all(distance(near, guided.best_noise) < 0.05)  # eps^2 = 0.01 per element
    assert torch.all(distance(far, plain.best_noise) > 1.0)  # independent N(0, I): about 2
    # only guided HERO has a pool to leave, and it is the next round's: the best and the good noises
    assert plain.noise_pool() is None
    pool = guided.noise_pool()
    assert pool is not None and torch.equal(pool.best, guided.best_noise)
    assert torch.equal(pool.good, guided.good_noises) and pool.prompt == guided.config.sampling.prompt


def test_triplets_take_the_best_as_anchor_and_the_other_good_images_as_positives() -> None:
    engine = Engine(small_config("hero", replay=True), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    feedback = brightness_labels(engine, batch)
    engine.learn(batch, feedback)
    latents = batch.trajectory.final_step_input.float()
    (source,) = engine.replay
    others = [i for i in feedback.good_indices if i != feedback.best]
    assert torch.equal(source.anchor, latents[feedback.best])
    assert torch.equal(source.good, latents[others])
    assert torch.equal(source.bad, latents[feedback.bad_indices])


@pytest.mark.parametrize(
    ("method", "replay"),
    [("hero", True), ("hero", False), ("hero-noguide", False), ("ddpo-binary", False), ("d3po", False)],
)
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path, method: str, replay: bool) -> None:
    config = small_config(method, replay=replay)
    straight = Engine(config, build_random_pipeline("tiny", seed=0))
    straight_batches = run_rounds(straight, 3)

    store = LocalStore(tmp_path)
    first = Engine(config, build_random_pipeline("tiny", seed=0))
    run_rounds(first, 1)
    first.save(store, "runs/t/checkpoints/1")
    resumed = Engine.load(config, build_random_pipeline("tiny", seed=0), store, "runs/t/checkpoints/1")
    assert (resumed.round, resumed.feedbacks) == (1, 6)
    resumed_batches = run_rounds(resumed, 2)

    for a, b in zip(straight_batches[1:], resumed_batches, strict=True):
        assert torch.equal(a.trajectory.latents, b.trajectory.latents)
        assert torch.equal(a.trajectory.log_probs, b.trajectory.log_probs)
    assert all(torch.equal(a, b) for a, b in zip(lora(straight), lora(resumed), strict=True))
    assert (
        straight.lora_optimizer.state_dict()["state"][0]["step"]
        == resumed.lora_optimizer.state_dict()["state"][0]["step"]
    )
    assert (
        (straight.encoder is None) == (resumed.encoder is None) == (method in ("d3po", "ddpo-binary"))
    )  # no encoder
    if straight.encoder is not None and resumed.encoder is not None:
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                straight.encoder.state_dict().values(), resumed.encoder.state_dict().values(), strict=True
            )
        )
    assert len(resumed.replay) == (3 if replay else 0)


def uniform_labels(engine: Engine, batch: RoundBatch, label: str) -> RoundFeedback:
    """Every image `label`; all good: the first is the best; all bad: the current best stays."""
    labels = AnnotatorFeedback(
        annotator="a",
        images=tuple(
            ImageLabel(image_id=i, label=label, best=label == "good" and n == 0)
            for n, i in enumerate(batch.image_ids)
        ),
        keep_best=label == "bad",
    )
    return aggregate([labels], batch.image_ids, has_current_best=engine.best_image is not None)


@pytest.mark.parametrize(
    ("method", "label"), [("ddpo-binary", "good"), ("ddpo-binary", "bad"), ("d3po", "good"), ("d3po", "bad")]
)
def test_a_round_with_nothing_to_compare_leaves_the_lora_as_it_was_and_still_counts(
    method: str, label: str
) -> None:
    # ddpo-binary: equal rewards, zero advantages; d3po: no good-bad pair
    engine = Engine(small_config(method), build_random_pipeline("tiny", seed=0))
    run_rounds(engine, 1)  # a best, so that a round may keep it
    before = lora(engine)
    batch = engine.generate()
    stats = engine.learn(batch, uniform_labels(engine, batch, label))
    assert stats.update_loss is None and stats.optimizer_steps == 0 and stats.lora_step_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, lora(engine), strict=True))
    assert (engine.round, engine.feedbacks, stats.feedbacks) == (2, 12, 12)
    kept = label == "bad"
    assert stats.new_best is not kept
    if not kept:
        assert torch.equal(engine.best_noise, batch.trajectory.initial_noise[0].float())


def test_a_hero_round_without_bad_images_trains_no_encoder_but_still_updates_the_policy() -> None:
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    assert engine.encoder is not None
    encoder_before = {k: v.clone() for k, v in engine.encoder.state_dict().items()}
    stats = engine.learn(batch := engine.generate(), uniform_labels(engine, batch, "good"))
    assert stats.encoder_loss_first is None and stats.encoder_loss_last is None  # no triplet to learn from
    assert all(torch.equal(v, encoder_before[k]) for k, v in engine.encoder.state_dict().items())
    # the rewards (similarity to the best) still differ: 6 trajectories x 2 timesteps in micro-batches
    # of 2 trajectories = 3 micro-batches, 2 a step -> 2 optimiser steps
    assert stats.optimizer_steps == 2 and stats.update_loss is not None
    assert torch.equal(engine.good_noises, batch.trajectory.initial_noise[1:].float())  # all but the best


def test_a_float16_model_learns_through_a_loss_scale_that_its_checkpoint_keeps(tmp_path: Path) -> None:
    config = small_config().model_copy(
        update={"model": small_config().model.model_copy(update={"dtype": "float16"})}
    )
    engine = Engine(config, build_random_pipeline("tiny", seed=0).to(dtype=torch.float16))
    assert (
        engine.loss_scaler is not None
        and Engine(small_config(), build_random_pipeline("tiny")).loss_scaler is None
    )
    start = lora(engine)
    assert {p.dtype for p in start} == {torch.float32}  # float32 masters on a float16 UNet
    stats = engine.learn(batch := engine.generate(), brightness_labels(engine, batch))
    assert stats.optimizer_steps == 2 and all(torch.isfinite(p).all() for p in lora(engine))
    assert all(not torch.equal(a, b) for a, b in zip(start[1::2], lora(engine)[1::2], strict=True))  # every B
    engine.loss_scaler.update(1024.0)  # a scale of its own, as after overflows
    engine.save(LocalStore(tmp_path), "ck")
    resumed = Engine.load(
        config, build_random_pipeline("tiny", seed=0).to(dtype=torch.float16), LocalStore(tmp_path), "ck"
    )
    assert resumed.loss_scaler is not None and resumed.loss_scaler.get_scale() == 1024.0
    # state.json is not hashed: an edited loss scale is refused, never silently replaced or trusted
    saved = json.loads((tmp_path / "ck" / STATE).read_text())
    for edit, says in [
        ({"loss_scale": None}, "it lacks a float16 loss scale, and model.dtype is float16"),
        ({"loss_scale": {**saved["loss_scale"], "scale": -1.0}}, "its loss scale is -1.0, a loss scale"),
        ({"loss_scale": {**saved["loss_scale"], "growth_interval": 1}}, "its loss scale has growth_interval"),
    ]:
        (tmp_path / "ck" / STATE).write_text(json.dumps({**saved, **edit}))
        with pytest.raises(EngineError, match=f"does not fit this engine: {says}"):
            Engine.load(
                config,
                build_random_pipeline("tiny", seed=0).to(dtype=torch.float16),
                LocalStore(tmp_path),
                "ck",
            )
    (tmp_path / "ck" / STATE).write_text(json.dumps(saved))
    with pytest.raises(EngineError, match=r"it holds a float16 loss scale, and model\.dtype is float32"):
        Engine.load(small_config(), build_random_pipeline("tiny", seed=0), LocalStore(tmp_path), "ck")


def test_learn_refuses_feedback_that_does_not_fit() -> None:
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    no_best = RoundFeedback(
        image_ids=batch.image_ids,
        good=(False,) * 6,
        best=None,
        annotators=("a",),
        labels=6,
        label_agreement=1,
        unanimous_share=1,
        best_agreement=1,
    )
    with pytest.raises(EngineError, match="first round's feedback must pick a best"):
        engine.learn(batch, no_best)
    other = no_best.model_copy(update={"image_ids": tuple(f"x{i}" for i in range(6))})
    with pytest.raises(EngineError, match="not this batch's"):
        engine.learn(batch, other)
    short = dataclasses.replace(
        batch, image_ids=batch.image_ids[:5]
    )  # e.g. a trajectory file of another batch
    with pytest.raises(EngineError, match="the batch holds 6 trajectories for 5 image ids"):
        engine.learn(short, no_best)
    engine.learn(batch, brightness_labels(engine, batch))
    with pytest.raises(EngineError, match="the batch is of round 0, the engine is at round 1"):
        engine.learn(batch, brightness_labels(engine, batch))


def test_a_checkpoint_loads_only_into_its_own_method(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    engine = Engine(small_config("hero"), build_random_pipeline("tiny", seed=0))
    run_rounds(engine, 1)
    engine.save(store, "ck")
    with pytest.raises(EngineError, match="trained with method 'hero', the config says 'd3po'"):
        Engine.load(small_config("d3po"), build_random_pipeline("tiny", seed=0), store, "ck")
    with pytest.raises(EngineError, match="no committed checkpoint at 'nothing'"):
        Engine.load(small_config("hero"), build_random_pipeline("tiny", seed=0), store, "nothing")


def test_predicted_rewards_rank_a_batch_before_its_feedback() -> None:
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    first = engine.generate()
    assert engine.predicted_rewards(first) is None  # no best to compare with yet
    engine.learn(first, brightness_labels(engine, first))
    second = engine.generate()
    rewards = engine.predicted_rewards(second)
    assert rewards is not None and len(rewards) == 6 and all(0 <= r <= 1 for r in rewards)
    assert engine.encoder is not None and engine.best_latent is not None
    with torch.no_grad():
        features = engine.encoder.features(second.trajectory.final_step_input.float())
        best = engine.encoder.features(engine.best_latent[None])[0]
    expected = (torch.nn.functional.cosine_similarity(features, best[None], dim=1) + 1) / 2
    assert rewards == pytest.approx(expected.tolist(), abs=1e-6)
    binary = Engine(small_config("ddpo-binary"), build_random_pipeline("tiny", seed=0))
    assert binary.predicted_rewards(first) is None  # no encoder


def test_the_engine_passes_the_configured_constants_to_the_math(monkeypatch: pytest.MonkeyPatch) -> None:
    # the math's own tests pin each formula; this pins the wiring: a config's value reaches its formula
    # (a constant written in the engine instead would pass every other test, its default being the same)
    seen: dict[str, dict[str, object]] = {}

    def spy(name: str) -> None:
        function = getattr(engine_module, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            seen[name] = inspect.signature(function).bind(*args, **kwargs).arguments
            return function(*args, **kwargs)

        monkeypatch.setattr(engine_module, name, wrapped)

    for name in ("advantages", "ddpo_objective", "update_pass", "train_encoder"):
        spy(name)
    config = small_config("hero", margin=0.37)
    config = config.model_copy(
        update={
            "ddpo": config.ddpo.model_copy(
                update={"clip_range": 0.0123, "adv_clip_max": 2.5, "max_grad_norm": 0.7}
            ),
            "guidance": config.guidance.model_copy(update={"noise_eps": 0.2, "best_ratio": 0.25}),
        }
    )
    engine = Engine(config, build_random_pipeline("tiny", seed=0))
    run_rounds(engine, 1)
    assert seen["advantages"]["clip"] == 2.5
    assert seen["ddpo_objective"]["clip_range"] == 0.0123
    assert seen["update_pass"]["max_grad_norm"] == 0.7
    assert seen["train_encoder"]["margin"] == 0.37
    pool = engine.noise_pool()
    assert pool is not None and (pool.eps, pool.best_ratio) == (0.2, 0.25)


def test_a_non_finite_latent_does_not_poison_the_encoder() -> None:
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    feedback = brightness_labels(engine, batch)
    other_good = next(i for i in feedback.good_indices if i != feedback.best)
    for image in (feedback.bad_indices[0], other_good):  # a float16 overflow in a bad and a good image
        batch.trajectory.latents[image, -2, 0, 0, 0] = float("nan")
    assert engine.learn(batch, feedback).non_finite_images == 2
    assert engine.encoder is not None
    assert all(torch.isfinite(v).all() for v in engine.encoder.state_dict().values())
    batch = engine.generate()
    stats = engine.learn(batch, brightness_labels(engine, batch))
    assert stats.optimizer_steps > 0 and stats.update_loss is not None
    assert stats.reward_good_mean is not None and stats.reward_bad_mean is not None

    # picked as best, such an image cannot anchor the encoder: the current best stays
    best_before = engine.best_latent.clone() if engine.best_latent is not None else None
    batch = engine.generate()
    feedback = brightness_labels(engine, batch)
    picked = feedback.best if feedback.best is not None else feedback.good_indices[0]
    feedback = feedback.model_copy(update={"best": picked})
    batch.trajectory.latents[picked, -2, 0, 0, 0] = float("nan")
    stats = engine.learn(batch, feedback)
    assert not stats.new_best and stats.non_finite_images == 1
    assert best_before is not None and torch.equal(engine.best_latent, best_before)
    assert all(torch.isfinite(v).all() for v in engine.encoder.state_dict().values())


def test_a_first_round_whose_best_is_not_finite_is_refused() -> None:
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    batch = engine.generate()
    feedback = brightness_labels(engine, batch)
    assert feedback.best is not None
    batch.trajectory.latents[feedback.best, -2, 0, 0, 0] = float("inf")
    with pytest.raises(EngineError, match=r"first round's best, .* not finite .* cannot go on"):
        engine.learn(batch, feedback)
