"""Train the grounding module on a triplet dataset (Protocol-I training), on Ray Train.

    python jobs/train_grounding.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_grounding.py --config voc-split1 \\
        --data s3://bucket/datasets/voc-triplets --out s3://bucket/grounding/voc-split1

--config names a YAML file in jobs/recipes/grounding/ (or is a path); every field can be
overridden as --field VALUE or --section.field VALUE (see --help). Running the same command
again on the same --out resumes from its last checkpoint, up to --epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from factory.core.cli import run_job
from factory.core.options import parse_config
from grounding.train import GroundingTrainConfig, TrainingSummary, prepare_training, run_training

CONFIG_DIR = Path(__file__).resolve().parent / "recipes" / "grounding"


def train(argv: list[str] | None) -> int:
    config = parse_config(GroundingTrainConfig, argv, __doc__, folder=CONFIG_DIR, default="tiny")
    print_summary(run_training(prepare_training(config)))
    return 0


def print_summary(summary: TrainingSummary) -> None:
    print(f"\nGrounding module trained: {summary.out}")
    print(f"  samples   {summary.train_samples} training, {summary.val_samples} validation")
    if summary.trained:
        resumed = f" (resumed after epoch {summary.resumed_from})" if summary.resumed_from else ""
        print(f"  epochs    {summary.trained} run now{resumed}; {summary.epochs} done")
    else:
        print(f"  epochs    all {summary.epochs} were already done; nothing to train")
    if summary.best is None:
        print("  best      none (no validation class had a mask)")
    else:
        print(f"  best      epoch {summary.best_epoch}, val mIoU {summary.best_miou:.4f}")
        print(f"  checkpoint {summary.best}")
    print(f"  last      {summary.last}")


def main(argv: list[str] | None = None) -> int:
    return run_job("train_grounding", train, argv)


if __name__ == "__main__":
    sys.exit(main())
