"""Train the grounding module on a triplet dataset (Protocol-I training), on Ray Train.

    python jobs/train_grounding.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_grounding.py --config voc-split1 \\
        --data s3://bucket/datasets/voc-triplets --out s3://bucket/grounding/voc-split1

A rerun on the same --out resumes from its last checkpoint, up to --epochs.
"""

from __future__ import annotations

import sys

from factory.core.cli import run_job
from factory.core.conventions import RECIPE_DIR
from factory.core.options import parse_config
from grounding.config import GroundingTrainConfig
from grounding.train import prepare_training, run_training


def train(argv: list[str] | None) -> int:
    config = parse_config(GroundingTrainConfig, argv, __doc__, default="tiny",
                          folder=RECIPE_DIR / "grounding")
    print(run_training(prepare_training(config)).report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("train_grounding", train, argv)


if __name__ == "__main__":
    sys.exit(main())
