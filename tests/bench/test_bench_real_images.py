"""bench/real_images.py's score: a dataset's label maps of the drawn benchmark against its exact masks."""

import math
from pathlib import Path

import pytest

from bench.real_images import annotation_scores
from factory.dataset.source import DatasetSource
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import load_recipe
from world.benchmark import write_benchmark

MODELS = Path(__file__).resolve().parents[2] / "models"
GENERATOR, ORACLE = str(MODELS / "shapes-generator"), str(MODELS / "shapes-oracle" / "model.safetensors")


@pytest.mark.slow  # a build through the world's generator
def test_labels_that_are_the_exact_masks_score_100(tmp_path):
    root = write_benchmark(tmp_path / "voc", val=8, train=0)
    out = tmp_path / "exact"  # a real-image triplet set: its labels are the images' own masks
    recipe = load_recipe("shapes-real-triplets", {
        "out": str(out), "source.images": str(root), "source.split": "val", "source.route": "noised",
        "generator.model": GENERATOR, "generator.steps": 4, "capture.step": 2,
        "agreement.labeler": {"model": "maskrcnn_small", "weights": ORACLE}})  # the oracle checks the masks
    run_build(prepare_build(recipe), in_process=True)
    scores = annotation_scores(str(out), root)
    assert scores["images"] == 8
    assert scores["seen"] == pytest.approx(100.0) and scores["unseen"] == pytest.approx(100.0)
    assert scores["harmonic"] == pytest.approx(100.0)
    # bench/agreement.py's drop: the rows whose every class agrees at least min_iou
    agreement = DatasetSource.open(str(out)).read(["agreement"]).column("agreement").to_pylist()
    assert len(agreement) == 8 and all(0.0 <= iou <= 1.0 for ious in agreement for iou in ious)
    kept = annotation_scores(str(out), root, min_iou=0.8)
    assert kept["images"] == sum(min(ious) >= 0.8 for ious in agreement) > 0
    assert all(score == pytest.approx(100.0) for score in (kept["seen"], kept["unseen"]) if not math.isnan(score))
