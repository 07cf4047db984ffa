"""The shipped mini-world models (models/): they load through the build's own paths and reach
the quality their cards report, a little under the measured values (README, "The mini world")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.real_images import annotation_scores
from factory.diffusion.pipelines import load_pipeline
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import load_recipe
from world.benchmark import benchmark_draws, write_benchmark
from world.evaluate import generator_quality, oracle_quality
from world.oracle import load_oracle

pytestmark = pytest.mark.slow  # hundreds of images through the shipped models: about a minute

MODELS = Path(__file__).resolve().parents[2] / "models"
# Measured on these 40 + 40 prompts: one 1.0, two 0.95, unprompted 0.0 (the card's 100 + 100: 1.0, 0.96, 0.01).
ONE, TWO, UNPROMPTED = 0.95, 0.85, 0.05
ORACLE = str(MODELS / "shapes-oracle" / "model.safetensors")
# The grounding module on 64 benchmark val images by the noised route, given their true class lists, measured:
# seen 84.4, unseen 80.9 mIoU (the module of the first generator: 81.7, 61.6).
SEEN, UNSEEN = 78.0, 72.0


def test_the_oracle_finds_the_drawn_benchmark_objects():
    quality = oracle_quality(load_oracle(ORACLE), benchmark_draws(200, "val"))  # as its card measured
    card = json.loads((MODELS / "shapes-oracle" / "training.json").read_text())["quality"]
    assert quality.as_dict() == {k: card[k] for k in quality.as_dict()}  # the card is what the weights do
    assert quality.found >= 0.97 and quality.mean_iou >= 0.85 and quality.false_classes <= 0.02


def test_the_generator_draws_the_prompted_classes():
    pipe = load_pipeline(str(MODELS / "shapes-generator"))  # a diffusers folder, as SD 1.5 is loaded
    quality = generator_quality(pipe, load_oracle(ORACLE), count=40)
    assert quality.one >= ONE and quality.two >= TWO and quality.unprompted <= UNPROMPTED, quality


def test_the_grounding_module_annotates_drawn_benchmark_images(tmp_path):
    """The module jobs/annotate_images.py uses by default, on 64 benchmark val images by the fast
    route, scored against their exact masks as bench/real_images.py scores all 500."""
    root = write_benchmark(tmp_path / "voc", val=64, train=0)
    recipe = load_recipe("shapes-annotate", {
        "out": str(tmp_path / "annotated"), "source.images": str(root), "source.route": "noised"})
    summary = run_build(prepare_build(recipe), in_process=True)
    scores = annotation_scores(summary.out, root)
    assert scores["images"] == 64 and scores["seen"] >= SEEN and scores["unseen"] >= UNSEEN, scores
