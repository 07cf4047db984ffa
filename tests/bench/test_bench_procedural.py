"""Drawn triplets (bench/procedural.py): the drawings and their exact labels through the factory's
writer, featurized alike at build time or by the Featurizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.procedural import SEEN, UNSEEN, build_procedural, procedural_recipe
from factory.core.vocab import SHAPES
from factory.dataset.codec import decode_image
from grounding.config import TextConfig
from grounding.data import Featurizer, TripletSource
from world.draw import draw


def test_split_is_the_shapes_split_one():
    assert set(SEEN) | set(UNSEEN) == set(SHAPES.names) and UNSEEN == SHAPES.unseen(1) and len(SEEN) == 15


@pytest.mark.slow
def test_drawn_sets_hold_the_drawings_and_their_exact_labels(tmp_path):
    recipe = procedural_recipe(str(tmp_path / "set"), classes=SHAPES.names, num_samples=4, seed=3, batch_size=4)
    assert build_procedural(recipe).written == 4
    source = TripletSource.open(str(tmp_path / "set"))
    assert source.manifest["vocabulary"]["name"] == "shapes"
    for row in source.take(range(4), ["classes", "seed", "image"]).to_pylist():
        assert np.array_equal(decode_image(row["image"]), draw(row["classes"], row["seed"], "training")[0])


@pytest.mark.slow
def test_latent_and_tensors_sets_featurize_alike(tmp_path):
    """One U-Net pass either way: at build time (tensors) or in the Featurizer (latent)."""
    batches = {}
    for mode in ("latent", "tensors"):
        recipe = procedural_recipe(str(tmp_path / mode), classes=SHAPES.names, num_samples=6, seed=5,
                                   features=mode, batch_size=4)
        assert build_procedural(recipe).written == 6
        source = TripletSource.open(str(tmp_path / mode))
        assert source.capture["unet_call"] == 22 and source.manifest["models"]["labeler"] == "procedural"
        rows = source.take(range(6), source.columns + ["index"]).sort_by("index")  # same plan, same order
        batches[mode] = Featurizer(source, TextConfig())(rows)
    latent, tensors = batches["latent"], batches["tensors"]
    assert torch.equal(latent.targets, tensors.targets) and torch.equal(latent.valid, tensors.valid)
    assert latent.features.keys() == tensors.features.keys() == {4, 8, 16}
    for r in latent.features:  # fp16 storage of the latent or of the features is the only difference
        torch.testing.assert_close(latent.features[r].float(), tensors.features[r].float(), atol=1e-2, rtol=1e-2)
