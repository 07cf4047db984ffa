"""Train the Protocol-II segmenter (MaskFormer) on a synthetic dataset, on Ray Train.

    python jobs/train_segmenter.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_segmenter.py --config model-c \\
        --data s3://bucket/datasets/voc-oracle --out s3://bucket/segmenter/model-c

--config names a YAML file in jobs/recipes/segmenter/ (or is a path); every field can be
overridden as --field VALUE or --section.field VALUE (see --help). Running the same command
again on the same --out resumes from its last checkpoint, up to --iterations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from factory.core.cli import run_job
from factory.core.options import parse_config
from segmenter.train import SegmenterTrainConfig, TrainingSummary, prepare_training, run_training

CONFIG_DIR = Path(__file__).resolve().parent / "recipes" / "segmenter"


def train(argv: list[str] | None) -> int:
    config = parse_config(SegmenterTrainConfig, argv, __doc__, folder=CONFIG_DIR, default="tiny")
    print_summary(run_training(prepare_training(config)))
    return 0


def print_summary(summary: TrainingSummary) -> None:
    print(f"\nSegmenter trained: {summary.out}")
    print(f"  samples    {summary.synthetic_rows} synthetic, {summary.real_rows} real")
    if summary.iterations > summary.resumed_from:
        resumed = f" (resumed after iteration {summary.resumed_from})" if summary.resumed_from else ""
        print(f"  iterations {summary.iterations - summary.resumed_from} run now{resumed}; {summary.iterations} done")
    else:
        print(f"  iterations all {summary.iterations} were already done; nothing to train")
    print(f"  checkpoint {summary.last}")


def main(argv: list[str] | None = None) -> int:
    return run_job("train_segmenter", train, argv)


if __name__ == "__main__":
    sys.exit(main())
