"""The mini world's oracle trainer (world/oracle.py) and the detector it ships."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factory.core.vocab import SHAPES
from world.oracle import OracleTrainConfig, OracleTraining, load_oracle, training_batch


def test_targets_are_the_drawn_objects():
    images, targets = training_batch(0, 5, 6, 1.0)
    assert len(images) == 6 and images[0].shape == (3, 64, 64) and 0 <= images[0].min() and images[0].max() <= 1
    for target in targets:
        masks, boxes = target["masks"].bool(), target["boxes"]
        assert masks.shape[0] == 2 and len(boxes) == 2 and set(target["labels"].tolist()) <= set(range(1, 21))
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)


@pytest.mark.slow  # a short training, resumed, and two exports that measure their weights: about 30 s
def test_training_resumes_and_exports_weights_the_labeler_loads(tmp_path):
    config = OracleTrainConfig(out=str(tmp_path / "out"), work=str(tmp_path / "work"), steps=2, batch_size=2,
                               save_every=2, eval_images=4)
    OracleTraining(config).run()
    resumed = OracleTraining(config.model_copy(update={"steps": 3}))
    assert resumed.step == 2 and [r[1] for r in resumed.log.records] == [1, 2]
    resumed.run()
    out = tmp_path / "out"
    measured = json.loads((out / "training.json").read_text())["quality"]
    assert measured["steps"] == 3 and measured["objects"] == 6  # 4 images: 2 one-object, 2 two-object
    for name in ("model.safetensors", "loss.png", "detections.png", "README.md"):
        assert (out / name).is_file(), name
    detector = load_oracle(str(out / "model.safetensors"))  # the labeler's weights path
    found = detector(np.zeros((2, 64, 64, 3), np.uint8))
    assert len(found) == 2 and all(set(d.classes.tolist()) <= set(range(len(SHAPES) + 1)) for d in found)
