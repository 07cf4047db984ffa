"""Train the grounding module on a triplet dataset (Protocol-I training), on Ray Train.

    python jobs/train_grounding.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_grounding.py --config voc-split1 \\
        --data s3://bucket/datasets/voc-triplets --out s3://bucket/grounding/voc-split1

--config names a YAML file in jobs/recipes/grounding/ (or is a path); every field can be
overridden as --field VALUE or --section.field VALUE (see --help). Running the same command
again on the same --out resumes from its last checkpoint, up to --epochs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from factory.storage import StorageError
from grounding.data import DataError
from factory.options import (ArgumentParser, ConfigError, add_config_arguments, load_config, overrides_from_args,
                             resolve_config_path)
from grounding.train import (CheckpointError, GroundingTrainConfig, TrainingSummary, prepare_training,
                             run_training)

CONFIG_DIR = Path(__file__).resolve().parent / "recipes" / "grounding"
DEFAULT_CONFIG = "tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"config name in jobs/recipes/grounding/ or a YAML path (default: {DEFAULT_CONFIG})")
    add_config_arguments(parser, GroundingTrainConfig)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> GroundingTrainConfig:
    path = resolve_config_path(args.config, CONFIG_DIR)
    return load_config(GroundingTrainConfig, path, overrides_from_args(args, GroundingTrainConfig))


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
    try:
        args = parse_args(argv)
        plan = prepare_training(config_from_args(args))
    except (ConfigError, DataError, StorageError, CheckpointError) as exc:
        print(f"train_grounding: error: {exc}", file=sys.stderr)
        return 2
    print_summary(run_training(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
