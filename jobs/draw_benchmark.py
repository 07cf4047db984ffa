"""Draw the mini world's benchmark: held-out "real" images with exact label maps, in VOC's layout.

    python jobs/draw_benchmark.py --out data/shapes-voc                # 500 val + 1,000 train images
    python jobs/eval_zs3.py --format voc --vocabulary shapes --root data/shapes-voc ...

The images are a function of their index alone (world/benchmark.py): every machine draws the
same benchmark.
"""

from __future__ import annotations

import sys

from pydantic import BaseModel, ConfigDict, Field

from factory.core.cli import run_job
from factory.core.options import parse_options
from world.benchmark import write_benchmark


class BenchmarkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="the folder to write (VOC 2012 layout: JPEGImages, SegmentationClass, ImageSets)")
    val: int = Field(500, ge=1, description="evaluation images (ImageSets/Segmentation/val.txt)")
    train: int = Field(1000, ge=0, description="training images of Model-D (ImageSets/Segmentation/train.txt)")


def draw_benchmark(argv: list[str] | None) -> int:
    options = parse_options(BenchmarkOptions, argv, __doc__)
    root = write_benchmark(options.out, options.val, options.train)
    print(f"drew {options.val} val and {options.train} train images into {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("draw_benchmark", draw_benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
