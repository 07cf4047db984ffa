"""Drawn triplets (world/procedural.py) and the learnability proof over them (bench/learnability.py):
a module trained on the seen classes of the mini world labels its unseen ones, through the
factory's writer, the Featurizer, Ray Train training and Protocol-I evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import learnability
from factory.core.vocab import SHAPES
from factory.dataset.codec import decode_image
from grounding.data import Featurizer, TextConfig, TripletSource
from grounding.evaluate import MODULE
from world.draw import draw
from world.procedural import SEEN, SPLIT, UNSEEN, build_procedural, procedural_recipe


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


def test_unseen_miou_averages_unseen_class_groups_only(monkeypatch):
    monkeypatch.setattr(learnability, "format_table", lambda results: "")  # Protocol-I's table: not tested here
    groups = {"one/seen": 90.0, "two/seen": 70.0, "one/unseen": 80.0, "two/seen+unseen": 10.0, "two/unseen": 60.0}
    split = {**{g: {"miou": v} for g, v in groups.items()}, "presence": {}}  # not a group: skipped
    results = {MODULE: {"splits": {str(SPLIT): split}}}
    report = learnability.Report(train=1, val=1, test=1, epochs=1, best_epoch=1, val_miou=0.0, results=results,
                                 seconds={})
    assert report.seen_miou == 80.0  # (90 + 70) / 2
    assert report.unseen_miou == 70.0  # (80 + 60) / 2: the mixed group's 10 is in neither mean
    assert report.passed is False  # unseen 70 < 75
    lines = report.text().splitlines()
    assert lines[3].endswith("seen mIoU 80.0 (one/seen 90.0, two/seen 70.0)")
    assert lines[4].endswith("unseen mIoU 70.0 (one/unseen 80.0, two/unseen 60.0)")
    assert lines[5].endswith("seen+unseen images: two/seen+unseen 10.0 (a seen and an unseen class per image; "
                             "in neither mean)")


@pytest.mark.slow
def test_a_module_trained_on_seen_classes_labels_unseen_ones(tmp_path, ray_cluster):
    report = learnability.run(train=384, val=48, test=96, epochs=16, seed=0, work=tmp_path / "run")
    print(report.text())
    assert report.passed, report.text()
