"""Protocol-II evaluation: zero-shot semantic segmentation (ZS3) of a trained segmenter on real
PASCAL VOC or COCO: mIoU over seen classes, over unseen classes, and their
harmonic mean 2SU / (S + U), per seen/unseen split.

    python jobs/eval_zs3.py --checkpoint outputs/segmenter-voc/last --format voc \\
        --root data/VOCdevkit/VOC2012 --out outputs/evals/voc-split1.json
    ray job submit --working-dir . -- python jobs/eval_zs3.py \\
        --checkpoint s3://bucket/segmenter/coco-split1/last --format coco --root /data/coco \\
        --out s3://bucket/evals/coco-split1.json --num-workers 8

--root is a local folder that every node can read: VOC's VOCdevkit/VOC2012, or COCO's folder
holding val2017/ and annotations/instances_val2017.json (--split-set names another list).

Inference (segmenter/evaluate.py): each image resized so its short side is --size pixels,
one image per forward pass, the argmax map resized back to the label's size by nearest
neighbour. It runs through Ray Data in an actor pool (one GPU per actor when the cluster has
GPUs); each batch of images gives one integer confusion matrix and the driver adds them up.
The batches are fixed here and the counts are exact, so the result does not depend on the
worker count. The scores are computed from the summed matrix for every split.

Background (segmenter/metrics.py): every split is scored both ways, background pixels ignored
(ZegFormer, Ding et al. 2022, whose VOC numbers the paper compares with) and background a seen
class (ZS3Net, Bucher et al. 2019), where a class predicted on background loses IoU by it; the
JSON has them under background_ignored and background_counted and the table a row for each.
A split's own seen/unseen/harmonic keys are ZegFormer's convention, or ZS3Net's with
--background seen. The JSON keeps the confusion matrix too.

Every result says how the model was trained: its setting, whether that is zero-shot (a
"supervised" model, trained on oracle labels of the unseen classes, is labelled "supervised
(oracle upper bound), not zero-shot" in the JSON and above the table), and, for a text-head
model, the class names added at test time (embedded with the checkpoint's own text encoder).

Prints a table (split, background convention, seen, unseen, harmonic) and, with --out, writes
the results as JSON (local or s3://) and --qualitative panels (image | ground truth |
prediction) next to it.
"""

from __future__ import annotations

import json
import sys

from factory.core.cli import run_job
from factory.core.options import parse_options
from factory.core.storage import write_file
from segmenter.config import ZS3EvalOptions
from segmenter.evaluate import format_table, prepare_evaluation, run_evaluation


def evaluate(argv: list[str] | None) -> int:
    plan = prepare_evaluation(parse_options(ZS3EvalOptions, argv, __doc__))
    report = run_evaluation(plan)
    dataset, run = report["dataset"], report["run"]
    added = f", classes named at test time: {', '.join(report['added_at_test'])}" if report["added_at_test"] else ""
    print(f"{dataset['format']} {dataset['split_set']}: {dataset['images']} images, {report['setting_label']} model "
          f"({report['head']} head{added}), short side {plan.size}; the JSON's seen/unseen/harmonic keys: "
          f"background {report['background']}")
    print(format_table(report["results"], report["setting"]))
    print(f"{run['images_per_second']:.2f} images/s in all, workers: {run['workers']} "
          f"({run['images_per_second_per_worker']:.2f} images/s per worker while busy)")
    for note in report["notes"]:
        print(f"note: {note}")
    if plan.out:
        write_file(plan.out, json.dumps(report, indent=2).encode())
        print(f"results written to {plan.out}" + (f", {len(plan.panels)} panels next to it" if plan.panels else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("eval_zs3", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
