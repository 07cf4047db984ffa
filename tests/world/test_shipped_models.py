"""The shipped mini-world models (models/): they load through the build's own paths and reach
the quality their cards report, a little under the measured values (README, "The mini world")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.diffusion.pipelines import load_pipeline
from world.benchmark import benchmark_draws
from world.evaluate import generator_quality, oracle_quality
from world.oracle import load_oracle

pytestmark = pytest.mark.slow  # hundreds of images through the shipped models: about a minute

MODELS = Path(__file__).resolve().parents[2] / "models"
# Measured on these 40 + 40 prompts: one 1.0, two 0.375, unprompted 0.175 (the card's 100 + 100: 1.0, 0.33, 0.255).
ONE, TWO, UNPROMPTED = 0.95, 0.3, 0.25
ORACLE = str(MODELS / "shapes-oracle" / "model.safetensors")


def test_the_oracle_finds_the_drawn_benchmark_objects():
    quality = oracle_quality(load_oracle(ORACLE), benchmark_draws(200, "val"))  # as its card measured
    card = json.loads((MODELS / "shapes-oracle" / "training.json").read_text())["quality"]
    assert quality.as_dict() == {k: card[k] for k in quality.as_dict()}  # the card is what the weights do
    assert quality.found >= 0.97 and quality.mean_iou >= 0.85 and quality.false_classes <= 0.02


def test_the_generator_draws_the_prompted_classes():
    pipe = load_pipeline(str(MODELS / "shapes-generator"))  # a diffusers folder, as SD 1.5 is loaded
    quality = generator_quality(pipe, load_oracle(ORACLE), count=40)
    assert quality.one >= ONE and quality.two >= TWO and quality.unprompted <= UNPROMPTED, quality
