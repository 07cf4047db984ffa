"""Train the Protocol-II segmenter (MaskFormer) on a synthetic dataset, on Ray Train.

    python jobs/train_segmenter.py                                  # tiny default, local Ray
    ray job submit --working-dir . -- python jobs/train_segmenter.py --config model-c \\
        --data s3://bucket/datasets/voc-synthetic-mixture --out s3://bucket/segmenter/model-c

Runs --iterations optimizer steps in all; a rerun on the same --out resumes from its last/.
A zero-shot --setting (transductive, inductive) refuses a set whose unseen-class labels came
from a labeler trained on them (an oracle set), or whose images' class lists came from ground
truth (real VOC/COCO images annotated by the module): --setting supervised trains such a set as
an oracle upper bound, labelled so in every checkpoint and result. --setting inductive also
refuses a set whose prompts named an unseen class (Bucher et al. 2019; Li et al. 2023). --setting inductive needs
--model.head text (class names as CLIP text embeddings; unseen ones are added at evaluation).
"""

from __future__ import annotations

import sys

from factory.core.cli import run_job
from factory.core.conventions import RECIPE_DIR
from factory.core.options import parse_config
from segmenter.config import SegmenterTrainConfig
from segmenter.train import prepare_training, run_training


def train(argv: list[str] | None) -> int:
    config = parse_config(SegmenterTrainConfig, argv, __doc__, folder=RECIPE_DIR / "segmenter", default="tiny")
    print(run_training(prepare_training(config)).report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("train_segmenter", train, argv)


if __name__ == "__main__":
    sys.exit(main())
