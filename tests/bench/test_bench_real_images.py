"""bench/real_images.py's score: a dataset's label maps of the drawn benchmark against its exact masks."""

from pathlib import Path

import pytest

from bench.real_images import annotation_scores
from factory.build.pipeline import prepare_build, run_build
from factory.build.recipe import load_recipe
from world.benchmark import write_benchmark

GENERATOR = str(Path(__file__).resolve().parents[2] / "models" / "shapes-generator")


@pytest.mark.slow  # a build through the world's generator
def test_labels_that_are_the_exact_masks_score_100(tmp_path):
    root = write_benchmark(tmp_path / "voc", val=8, train=0)
    out = tmp_path / "exact"  # a real-image triplet set: its labels are the images' own masks
    recipe = load_recipe("shapes-real-triplets", {
        "out": str(out), "source.images": str(root), "source.split": "val", "source.route": "noised",
        "generator.model": GENERATOR, "generator.steps": 4, "capture.step": 2})
    run_build(prepare_build(recipe), in_process=True)
    scores = annotation_scores(str(out), root)
    assert scores["images"] == 8
    assert scores["seen"] == pytest.approx(100.0) and scores["unseen"] == pytest.approx(100.0)
    assert scores["harmonic"] == pytest.approx(100.0)
