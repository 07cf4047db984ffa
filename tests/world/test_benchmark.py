"""The drawn benchmark (world/benchmark.py): VOC's layout, read by the segmenter's VOC reader."""

from __future__ import annotations

import numpy as np
import pytest

from factory.core.vocab import SHAPES
from factory.dataset.real import real_dataset
from jobs.draw_benchmark import main as draw_benchmark_main
from world.benchmark import benchmark_draws, image_id, write_benchmark
from world.draw import draw, label_map
from world.utils import class_draws


def test_benchmark_seeds_are_no_training_seeds_and_splits_are_disjoint():
    val, train = benchmark_draws(400, "val"), benchmark_draws(400, "train")
    val_seeds, train_seeds = {s for _, s in val}, {s for _, s in train}
    assert len(val_seeds) == 400 and not val_seeds & train_seeds
    assert all(seed % 2 == 1 for seed in val_seeds | train_seeds)
    training = {seed for step in range(50) for _, seed in class_draws(0, step, 16, 0.5)}
    assert all(seed % 2 == 0 for seed in training)


def test_benchmark_covers_every_class_and_alternates_one_and_two_objects():
    items = benchmark_draws(40, "val")
    assert [len(classes) for classes, _ in items] == [1, 2] * 20
    assert {classes[0] for classes, _ in items[::2]} == set(SHAPES.names)
    assert benchmark_draws(40, "val") == items and benchmark_draws(10, "val") == items[:10]


def test_the_voc_reader_reads_it_unchanged_with_the_shapes_vocabulary(tmp_path):
    root = write_benchmark(tmp_path / "voc", val=12, train=6)
    reader = real_dataset("voc", root, "val", "shapes")
    assert len(reader) == 12 and reader.vocabulary is SHAPES
    assert reader.ids == [image_id("val", k) for k in range(12)]
    for k, (classes, seed) in enumerate(benchmark_draws(12, "val")):
        sample = reader[k]
        image, masks = draw(classes, seed, "benchmark")
        assert np.array_equal(sample.label, label_map(classes, masks))  # lossless PNG of the exact masks
        assert np.abs(sample.image.astype(int) - image).mean() < 4  # JPEG, quality 95
    assert len(real_dataset("voc", root, "train", "shapes")) == 6
    with pytest.raises(ValueError, match="coco format holds the coco vocabulary"):
        real_dataset("coco", root, "val", "shapes")


def test_the_job_draws_it(tmp_path, capsys):
    assert draw_benchmark_main(["--out", str(tmp_path / "b"), "--val", "3", "--train", "2"]) == 0
    assert "drew 3 val and 2 train images" in capsys.readouterr().out
    assert (tmp_path / "b" / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        image_id("train", 0), image_id("train", 1)]
