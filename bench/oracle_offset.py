"""Where the mini world's oracle puts its masks: the mean offset of each found mask's centroid from
its drawn object's, and the mean mask IoU, on the drawn benchmark (val), with the masks pasted as
the factory pastes them (at their boxes' exact positions) and as torchvision's own transform does
(boxes truncated to whole pixels, which moved every label half a pixel up and left).

    python -m bench.oracle_offset [--images 200]

About 15 s on 2 CPU cores, most of it imports.
"""

from __future__ import annotations

import argparse
import sys

from torchvision.models.detection.transform import GeneralizedRCNNTransform

from world.benchmark import benchmark_draws
from world.evaluate import OracleQuality, oracle_quality
from world.oracle import load_oracle

WEIGHTS = "models/shapes-oracle/model.safetensors"


def measure(images: int) -> dict[str, OracleQuality]:
    """The shipped oracle's quality on the first `images` val images, by each way of pasting."""
    items = benchmark_draws(images, "val")
    oracle = load_oracle(WEIGHTS)
    exact = oracle_quality(oracle, items)
    t = oracle.model.transform
    oracle.model.transform = GeneralizedRCNNTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                                      t.size_divisible, t.fixed_size).eval()
    return {"exact boxes (the factory's)": exact, "torchvision's paste": oracle_quality(oracle, items)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="drawn benchmark val images (default 200)")
    args = parser.parse_args(argv)
    print(f"{'masks pasted at':<28} {'dy px':>7} {'dx px':>7} {'mean IoU':>9}  ({args.images} images)")
    for name, quality in measure(args.images).items():
        dy, dx = quality.offset
        print(f"{name:<28} {dy:+7.3f} {dx:+7.3f} {quality.mean_iou:9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
