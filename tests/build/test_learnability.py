"""Learnability: masks that are truly in the features are learnt through the project's own code.

Procedural triplet sets (factory/build/procedural.py) go through the factory's writer, the
Featurizer, Ray Train training and Protocol-I evaluation (bench/learnability.py, smaller).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import learnability
from factory.build.procedural import CELL, SEEN, STYLES, UNSEEN, build_procedural, draw, procedural_recipe
from grounding.data import Featurizer, TextConfig, TripletSource

REPO = Path(__file__).resolve().parents[2]


def test_vocabulary_split_is_four_seen_two_unseen():
    assert SEEN == ("aeroplane", "bird", "boat", "bottle") and UNSEEN == ("car", "dog")


def test_drawings_are_seeded_with_disjoint_exact_masks():
    groups = [(name,) for name in STYLES] + list(combinations(STYLES, 2))
    for seed, classes in enumerate(groups):
        image, masks = draw(classes, seed)
        again, same = draw(classes, seed)
        assert np.array_equal(image, again) and np.array_equal(masks, same)
        assert image.shape == (64, 64, 3) and masks.shape == (len(classes), 64, 64)
        assert all(mask.sum() >= 200 for mask in masks)  # objects are large: boundaries are not most of a mask
        assert masks.sum(axis=0).max() == 1  # two objects never touch, so each pixel has one class
        cells = masks[:, ::CELL, ::CELL].repeat(CELL, axis=1).repeat(CELL, axis=2)
        assert np.array_equal(cells, masks)  # shapes follow the latent grid
    assert not np.array_equal(draw(("bird",), 0)[0], draw(("bird",), 1)[0])


@pytest.mark.slow
def test_latent_and_tensors_sets_featurize_alike(tmp_path):
    """One U-Net pass either way: at build time (tensors) or in the Featurizer (latent)."""
    batches = {}
    for mode in ("latent", "tensors"):
        recipe = procedural_recipe(str(tmp_path / mode), classes=tuple(STYLES), num_samples=6, seed=5,
                                   features=mode, batch_size=4)
        assert build_procedural(recipe).written == 6
        source = TripletSource.open(str(tmp_path / mode))
        assert source.capture["unet_call"] == 45 and source.manifest["models"]["labeler"] == "procedural"
        rows = source.take(range(6), source.columns + ["index"]).sort_by("index")  # same plan, same order
        batches[mode] = Featurizer(source, TextConfig())(rows)
    latent, tensors = batches["latent"], batches["tensors"]
    assert torch.equal(latent.targets, tensors.targets) and torch.equal(latent.valid, tensors.valid)
    assert latent.features.keys() == tensors.features.keys() == {16, 32}
    for r in latent.features:  # fp16 storage of the latent or of the features is the only difference
        torch.testing.assert_close(latent.features[r].float(), tensors.features[r].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_grounding_module_learns_seen_masks(tmp_path, ray_cluster):
    report = learnability.run(train=384, val=48, test=96, epochs=20, seed=0, work=tmp_path / "run")
    print(report.text())
    assert report.passed, report.text()
