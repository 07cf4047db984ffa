"""The drawn benchmark: the mini world's "real" images, in PASCAL VOC's layout.

Drawn from the ``benchmark`` family (other backgrounds and layouts than anything a model
trains on, world/draw.py) with seeds no training draw uses (training seeds are even; the
benchmark's are 1 mod 4 for ``val`` and 3 mod 4 for ``train``), and written as VOC 2012 is:

    JPEGImages/<id>.jpg                  quality 95
    SegmentationClass/<id>.png           palette PNG of ``shapes`` class indices
    ImageSets/Segmentation/{train,val}.txt

so the segmenter's VOC reader reads it unchanged (``real.root``, ``vocabulary: shapes``).
``val`` is Protocol-II's evaluation set; ``train`` is the drawn training set of Model-D
(the inductive setting ignores its unseen classes).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from factory.core.vocab import SHAPES
from factory.dataset.codec import PALETTE
from world.draw import draw, label_map

SPLIT_SEEDS = {"val": 1, "train": 3}  # a drawing seed is 4 k + this


def benchmark_draws(count: int, split: str = "val") -> list[tuple[tuple[str, ...], int]]:
    """(classes, drawing seed) of the split's first `count` images: one-object and two-object
    images alternate; classes cycle through all 20, pairs through all 190, in a seeded order."""
    rng = np.random.default_rng([20, SPLIT_SEEDS[split]])
    singles = [(name,) for name in SHAPES.names]
    pairs = list(itertools.combinations(SHAPES.names, 2))
    singles = [singles[i] for i in rng.permutation(len(singles))]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    out = []
    for k in range(count):
        source = singles if k % 2 == 0 else pairs
        classes = source[(k // 2) % len(source)]
        if len(classes) == 2 and rng.random() < 0.5:
            classes = classes[::-1]
        out.append((classes, 4 * k + SPLIT_SEEDS[split]))
    return out


def image_id(split: str, k: int) -> str:
    return f"shapes_{split}_{k:06d}"


def write_benchmark(root: str | Path, val: int = 500, train: int = 1000) -> Path:
    """Write the benchmark under `root` (VOC 2012's folder layout); returns `root`."""
    root = Path(root)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("val", val), ("train", train)):
        ids = []
        for k, (classes, seed) in enumerate(benchmark_draws(count, split)):
            image, masks = draw(classes, seed, "benchmark")
            ids.append(image_id(split, k))
            Image.fromarray(image).save(root / "JPEGImages" / f"{ids[-1]}.jpg", quality=95)
            label = Image.fromarray(label_map(classes, masks), mode="P")
            label.putpalette(PALETTE)
            label.save(root / "SegmentationClass" / f"{ids[-1]}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
