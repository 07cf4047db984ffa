"""A labeler config loaded as a detector: Mask R-CNN keeps candidates down to the lowest threshold
a labelling rule looks at (the model itself: tests/detection)."""

import json

import numpy as np
import pytest
import torch

from factory.core.vocab import COCO, VOC
from factory.detection.detections import Detections
from factory.pipeline.cost import DEFAULT_RATES, estimate
from factory.pipeline.labelers import DAAM_MAPS, GROUNDING, LABELERS, MASKS, labeler_for, load_detector
from factory.pipeline.labelers.base import Labeler
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import load_recipe
from factory.pipeline.sections import LabelerConfig

CPU = torch.device("cpu")


def images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_load_detector():
    detector = load_detector(LabelerConfig(), VOC, 64, CPU)
    assert callable(detector) and len(detector(images(1))) == 1


@pytest.mark.parametrize("score,ignore,nms,expected", [
    (0.5, None, 0.5, 0.5),
    (0.7, 0.3, 0.4, 0.3),
    (0.05, None, 0.6, 0.05),
    (0.5, 0.0, 0.5, 0.0),  # an ignore threshold of 0 keeps every candidate
])
def test_thresholds_reach_roi_heads(score, ignore, nms, expected):
    config = LabelerConfig(score_threshold=score, ignore_threshold=ignore, nms_threshold=nms)
    model = load_detector(config, COCO, 64, CPU).model
    assert model.roi_heads.score_thresh == pytest.approx(expected)
    assert model.roi_heads.nms_thresh == pytest.approx(nms)
    assert not model.training


def test_ignore_threshold_lets_weaker_candidates_through():
    # The random tiny model scores about 1/91 per class: nothing reaches 0.5.
    batch = images(1, seed=5)
    (strict,) = load_detector(LabelerConfig(score_threshold=0.5), COCO, 64, CPU)(batch)
    (wide,) = load_detector(LabelerConfig(score_threshold=0.5, ignore_threshold=0.0), COCO, 64, CPU)(batch)
    assert len(strict.scores) == 0
    assert len(wide.scores) > 0 and (wide.scores < 0.5).all()


class Everywhere(Labeler):
    """A test-only labeler: each class an image is asked for covers the whole image."""
    names = ("everywhere",)

    def load(self, config, vocabulary, image_size, device):
        def detect(images, classes):
            return [Detections(np.array([c.index for c in asked], np.int64), np.ones(len(asked), np.float32),
                               np.ones((len(asked), *images.shape[1:3]), np.float32)) for asked in classes]
        return detect


def test_a_registered_labeler_needs_nothing_else(monkeypatch, tmp_path):
    monkeypatch.setitem(LABELERS, "everywhere", Everywhere())  # the registration line, made in the test
    recipe = load_recipe("tiny", {"labeler.model": "everywhere", "num_samples": 2, "generator.steps": 2,
                                  "out": str(tmp_path / "ds")})
    assert estimate(recipe, 10, DEFAULT_RATES, gpus=1).seconds_per_sample["label"] > 0
    summary = run_build(prepare_build(recipe), in_process=True)
    assert summary.written == 2 and not summary.dropped
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["models"]["labeler"] == "everywhere" and manifest["labels"]["kind"] == "oracle"


# The id of each registered labeler, and a recipe that selects it: by labeler.model, or by the annotator
# and source sections.
SELECTING = {
    "tiny": {},
    "open_vocabulary:facebook/sam3": {"labeler.model": "open_vocabulary", "labeler.weights": "facebook/sam3"},
    "grounding:ck": {"annotator.checkpoint": "ck"},
    "daam": {"annotator.daam": True},
    "masks:voc": {"source.images": "voc", "source.format": "voc", "capture.features": "latent"},
}


def test_every_registered_labeler_answers_the_interface():
    recipes = {model_id: load_recipe("tiny", overrides) for model_id, overrides in SELECTING.items()}
    chosen = {model_id: labeler_for(recipe) for model_id, recipe in recipes.items()}
    assert set(map(id, chosen.values())) == set(map(id, (*LABELERS.values(), GROUNDING, DAAM_MAPS, MASKS)))
    for model_id, labeler in chosen.items():
        recipe = recipes[model_id]
        assert labeler.kind in ("oracle", "annotator", "daam", "masks")
        assert labeler.model_id(recipe, recipe.labeler) == model_id
        seconds = estimate(recipe, 10, DEFAULT_RATES, gpus=1).seconds_per_sample
        assert all(s > 0 for s in seconds.values()) and ("label" in seconds) == labeler.own_stage
