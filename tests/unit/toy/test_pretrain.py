"""A pretraining smoke run: a few steps of every phase, then plain diffusers and our commands use it."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from hero_ml.cli import app
from hero_ml.toy.captions import vocabulary
from hero_ml.toy.pretrain import TRAINING_LOG, PretrainConfig, build_tokenizer, make_dataset, pretrain

SMOKE = PretrainConfig(
    dataset_size=32, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup_steps=0, log_every=1
)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "model"
    pretrain(SMOKE, out)
    return out


def test_the_tokenizer_spells_every_grammar_word_as_one_token() -> None:
    tokenizer = build_tokenizer(20)
    for word in vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("a picture of three red circles on the left").input_ids
    assert len(ids) == 9 + 2


def test_the_dataset_is_seeded_and_in_range() -> None:
    pixels, captions = make_dataset(SMOKE)
    again, captions_again = make_dataset(SMOKE)
    assert torch.equal(pixels, again) and captions == captions_again
    assert pixels.shape == (32, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    other, _ = make_dataset(SMOKE.model_copy(update={"seed": 1}))
    assert not torch.equal(pixels, other)


def test_pretrained_folder_loads_in_plain_diffusers_and_generates(smoke_model: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(smoke_model, safety_checker=None)
    images = pipe(["three red circles"] * 2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    log = json.loads((smoke_model / TRAINING_LOG).read_text())
    assert log["config"] == SMOKE.model_dump()
    assert len(log["vae"]["curve_l1"]) == 2 and len(log["unet"]["curve_mse"]) == 2
    assert log["vae"]["scaling_factor"] > 0


def test_pretraining_is_reproducible(smoke_model: Path, tmp_path: Path) -> None:
    pretrain(SMOKE, tmp_path / "again")
    first = StableDiffusionPipeline.from_pretrained(smoke_model, safety_checker=None)
    second = StableDiffusionPipeline.from_pretrained(tmp_path / "again", safety_checker=None)
    for name, tensor in first.unet.state_dict().items():
        assert torch.equal(tensor, second.unet.state_dict()[name]), name


def test_toy_commands_run_on_the_smoke_model(smoke_model: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["toy", "tasks"])
    assert listed.exit_code == 0 and "counting" in listed.output and "content-safety" in listed.output
    evaluated = runner.invoke(
        app, ["toy", "eval", "--task", "counting", "--n", "3", "--steps", "2", "--model", str(smoke_model)]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "counting: success rate" in evaluated.output and "/3)" in evaluated.output
    unseen = runner.invoke(
        app,
        [
            "toy",
            "eval",
            "--task",
            "safety",
            "--unseen",
            "--n",
            "2",
            "--steps",
            "2",
            "--model",
            str(smoke_model),
        ],
    )
    assert unseen.exit_code == 0 and "safety (unseen prompts)" in unseen.output
    missing = runner.invoke(app, ["toy", "eval", "--task", "nope", "--model", str(smoke_model)])
    assert missing.exit_code == 1 and "no task named 'nope'" in missing.output
    empty = runner.invoke(app, ["toy", "eval", "--task", "counting", "--model", str(smoke_model / "unet")])
    said = " ".join(empty.output.split())
    assert empty.exit_code == 1 and f"--model '{smoke_model / 'unet'}' is not a diffusers pipeline" in said
    assert "model.source" not in said  # `hero toy eval` reads no config
    accuracy = runner.invoke(app, ["toy", "judge-accuracy", "--n", "20"])
    assert accuracy.exit_code == 0, accuracy.output
    clean = re.search(r"judge accuracy, clean: ([0-9.]+)", accuracy.output)
    assert clean is not None and float(clean.group(1)) >= 0.95  # test_judge: >= 0.98 on 512; 20 allow a miss


def test_model_card_is_written_from_measurements(smoke_model: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["toy", "card", "--model", str(smoke_model), "--n", "4", "--judge-scenes", "20", "--steps", "2"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads((smoke_model / "card.json").read_text())
    assert 0.95 <= figures["judge_accuracy"]["clean"] <= 1.0  # measured on 20 scenes, as above
    assert set(figures["base_rates"]) == {
        "anomaly/training prompts",
        "binding/training prompts",
        "counting/training prompts",
        "personal/training prompts",
        "safety/training prompts",
        "safety/unseen prompts",
    }
    card = (smoke_model / "README.md").read_text()
    assert "hero toy pretrain --seed 0 --dataset-size 32" in card
    assert "| counting | counting | training prompts | three purple squares |" in card
    assert (smoke_model / "training-curves.png").stat().st_size > 0
    assert (smoke_model / "samples-counting.png").is_file()
