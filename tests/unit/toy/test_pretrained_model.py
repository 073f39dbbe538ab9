"""The committed toy model: a standard diffusers folder that plain diffusers loads and that draws shapes."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from hero_ml.toy.cli import PRETRAINED
from hero_ml.toy.perceive import perceive
from hero_ml.toy.pretrain import TRAINING_LOG


def test_the_committed_model_loads_in_plain_diffusers_and_draws_shapes() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(PRETRAINED, safety_checker=None)
    generator = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipe(
        ["three red circles"] * 8,
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
    ).images
    assert images.shape == (8, 32, 32, 3)
    seen = [perceive((image * 255).round().astype(np.uint8)) for image in images]
    # A trained model draws recognisable shapes in most images, and mostly red ones for this prompt.
    assert sum(1 for objects in seen if objects) >= 6
    colours = [o.color for objects in seen for o in objects]
    assert colours.count("red") > len(colours) / 2


def test_the_committed_model_is_small_safetensors_with_its_training_log() -> None:
    weights = sum(p.stat().st_size for p in PRETRAINED.rglob("*.safetensors"))
    assert weights <= 30 * 2**20
    assert not list(PRETRAINED.rglob("*.bin")) and not list(PRETRAINED.rglob("*.pt"))
    log = json.loads((PRETRAINED / TRAINING_LOG).read_text())
    assert {"config", "vae", "unet", "seconds"} <= set(log)


def test_the_model_card_holds_the_command_and_measured_figures() -> None:
    card = (PRETRAINED / "README.md").read_text()
    assert "hero toy pretrain --seed 0" in card and "hero toy card --n 512" in card
    figures = json.loads((PRETRAINED / "card.json").read_text())
    assert figures["judge_accuracy"]["clean"] >= 0.98
    tasks = ("anomaly", "binding", "counting", "personal", "safety")
    assert set(figures["base_rates"]) == {f"{t}/training prompts" for t in tasks} | {"safety/unseen prompts"}
    for key, result in figures["base_rates"].items():
        if not key.endswith("unseen prompts"):
            assert 0.05 <= result["rate"] <= 0.5, key
