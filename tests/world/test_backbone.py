"""The world's pretraining task shares nothing with the 20 classes, and its training writes weights the
`world` segmenter loads through model.backbone_weights, as it loads ImageNet's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from factory.core.vocab import SHAPES
from jobs import train_world
from segmenter.config import SegmenterModelConfig
from segmenter.model import Segmenter, load_backbone_weights
from world import draw
from world.backbone import CLASSES, COLOURS, FORMS, draw_pretraining, form_mask

REPO = Path(__file__).resolve().parents[2]


def test_no_pretraining_colour_or_form_is_one_of_the_classes():
    for name, colour in COLOURS.items():  # far from every class colour, beyond the drawings' shading
        distance = min(np.linalg.norm(np.subtract(colour, c)) for c in draw.COLOURS.values())
        assert distance > 60, name
    for form in FORMS:  # at the same place and size, no pretraining form is a class form (the closest: 0.74)
        for old in ("disc", "square", "triangle", "cross"):
            a, b = form_mask(form, (32, 32), 16), draw.form_mask(old, (32, 32), 16)
            assert (a & b).sum() / (a | b).sum() < 0.8, (form, old)
    assert not {c.split()[0] for c in CLASSES} & {n.split("_")[0] for n in SHAPES.names}
    image = draw_pretraining([0, 7], 1)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert not np.array_equal(image, draw_pretraining([0, 7], 2)) and np.array_equal(image, draw_pretraining([0, 7], 1))


def test_training_resumes_and_its_weights_load_into_the_world_segmenter(tmp_path, capsys):
    out, work = tmp_path / "backbone", tmp_path / "work"
    args = ["backbone", "--out", str(out), "--work", str(work), "--batch-size", "8", "--save-every", "10",
            "--eval-images", "40"]
    assert train_world.main([*args, "--steps", "10"]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert train_world.main([*args, "--steps", "20"]) == 0  # continues from step 10
    measured = json.loads((out / "training.json").read_text())["quality"]
    assert measured["steps"] == 20 and 0 <= measured["accuracy"] <= 1
    assert (out / "model.safetensors").read_bytes() != first and (out / "README.md").is_file()
    segmenter = Segmenter(SegmenterModelConfig.world(num_labels=21))
    load_backbone_weights(segmenter, str(out))  # every backbone tensor, nothing else
    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.equal(segmenter.backbone.state_dict()[k], v) for k, v in saved.items())


def test_the_shipped_backbone_is_small_and_learnt_its_task():
    folder = REPO / "models" / "shapes-backbone"
    assert (folder / "model.safetensors").stat().st_size <= 5_000_000
    measured = json.loads((folder / "training.json").read_text())["quality"]
    assert measured["accuracy"] >= 0.8  # every class of a drawing right: chance is far below 0.01
    load_backbone_weights(Segmenter(SegmenterModelConfig.world(num_labels=21)), str(folder))
