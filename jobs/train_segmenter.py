"""Train the Protocol-II segmenter (MaskFormer) on a synthetic dataset, on Ray Train.

    python jobs/train_segmenter.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_segmenter.py --config model-c \\
        --data s3://bucket/datasets/voc-oracle --out s3://bucket/segmenter/model-c

--config names a YAML file in jobs/recipes/segmenter/ (or is a path); every field can be
overridden as --field VALUE or --section.field VALUE (see --help). Running the same command
again on the same --out resumes from its last checkpoint, up to --iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from factory.options import (ArgumentParser, ConfigError, add_config_arguments, load_config, overrides_from_args,
                             resolve_config_path)
from factory.storage import StorageError
from segmenter.data import DataError
from segmenter.model import CheckpointError
from segmenter.train import SegmenterTrainConfig, TrainingSummary, prepare_training, run_training

CONFIG_DIR = Path(__file__).resolve().parent / "recipes" / "segmenter"
DEFAULT_CONFIG = "tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"config name in jobs/recipes/segmenter/ or a YAML path (default: {DEFAULT_CONFIG})")
    add_config_arguments(parser, SegmenterTrainConfig)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SegmenterTrainConfig:
    path = resolve_config_path(args.config, CONFIG_DIR)
    return load_config(SegmenterTrainConfig, path, overrides_from_args(args, SegmenterTrainConfig))


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
    try:
        args = parse_args(argv)
        summary = run_training(prepare_training(config_from_args(args)))
    except (ConfigError, DataError, StorageError, CheckpointError) as exc:
        print(f"train_segmenter: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
