"""Protocol-II evaluation: zero-shot semantic segmentation (ZS3) of a trained segmenter on real
PASCAL VOC or COCO (spec section 9): mIoU over seen classes, over unseen classes, and their
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

Background (segmenter/metrics.py): by default background pixels are ignored, as in ZegFormer's
VOC evaluation, whose numbers the paper compares with; --background seen counts background as
a seen class instead (ZS3Net). The JSON keeps the confusion matrix, so either can be
computed later.

Prints a table (split, seen, unseen, harmonic) and, with --out, writes the results as JSON
(local or s3://) and --qualitative panels (image | ground truth | prediction) next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import ray

from factory.options import ArgumentParser, ConfigError
from factory.storage import (StorageError, absolute_uri, check_reachable, first_line, is_s3,
                             split_file_uri, write_file)
from factory.vocab import Vocabulary
from segmenter.datasets import DEFAULT_SPLITS, READERS, real_dataset
from segmenter.evaluate import ZS3Stage
from segmenter.metrics import BACKGROUND_MODES, ConfusionMatrix, zs3_scores
from segmenter.model import CheckpointError, read_checkpoint_metadata

FORMAT = "zs3-results/1"
_CHECKPOINT_KEYS = ("model", "vocabulary", "setting", "split")


class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message is one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="segmenter checkpoint folder (local or s3://)")
    parser.add_argument("--format", required=True, choices=sorted(READERS), help="real dataset format")
    parser.add_argument("--root", required=True, help="real dataset folder (local, readable on every node)")
    parser.add_argument("--split-set", help="image list: VOC ImageSets/Segmentation name or COCO image folder "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_SPLITS.items())})")
    parser.add_argument("--splits", type=int, nargs="+",
                        help="seen/unseen splits to score (default: the checkpoint's split, else 1 2 3)")
    parser.add_argument("--background", choices=BACKGROUND_MODES, default="ignore",
                        help="background pixels ignored (ZegFormer) or a seen class (ZS3Net) (default: ignore)")
    parser.add_argument("--out", help="results JSON file, local or s3:// (default: print only)")
    parser.add_argument("--num-workers", type=int, help="actors (default: one per GPU in the cluster, else 1)")
    parser.add_argument("--qualitative", type=int, default=8,
                        help="panels written next to --out, of images spread over the dataset (default: 8)")
    parser.add_argument("--size", type=int, default=512, help="short side of the inference input (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per confusion matrix (default: 8)")
    return parser.parse_args(argv)


@dataclass
class EvalPlan:
    checkpoint: str
    format: str
    root: str
    split_set: str
    size: int
    vocabulary: Vocabulary
    num_labels: int
    splits: list[int]
    background: str
    out: str | None
    batches: list[list[int]]  # sample positions of each confusion matrix, fixed here
    panels: dict[int, str]  # sample position -> panel file name next to --out
    num_workers: int | None
    report: dict  # the JSON's fields other than the results


def _check_checkpoint(checkpoint: str, metadata: dict, vocabulary: Vocabulary) -> None:
    missing = [key for key in _CHECKPOINT_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks {', '.join(missing)} in its checkpoint.json")
    trained = metadata["vocabulary"]
    if trained.get("name") != vocabulary.name:
        raise EvalError(f"the checkpoint was trained on the {trained.get('name')} vocabulary, "
                        f"the dataset has {vocabulary.name}")
    if [c["name"] for c in trained.get("classes", [])] != list(vocabulary.names):
        raise EvalError(f"the checkpoint's {vocabulary.name} classes differ from the project's "
                        f"{vocabulary.name} vocabulary (names or order)")
    if metadata["model"]["num_labels"] != len(vocabulary) + 1:
        raise EvalError(f"the checkpoint predicts {metadata['model']['num_labels']} labels, "
                        f"{vocabulary.name} has {len(vocabulary) + 1} with background")


def prepare_evaluation(args: argparse.Namespace) -> EvalPlan:
    """Every check that needs no model; raises EvalError, StorageError or CheckpointError."""
    if args.size < 32:
        raise EvalError(f"--size {args.size} is below 32, the backbone's stride")
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 1) or args.qualitative < 0:
        raise EvalError("--batch-size and --num-workers must be at least 1, --qualitative at least 0")
    if is_s3(args.root):
        raise EvalError(f"--root {args.root} must be a local folder (readable on every node)")
    root, checkpoint = absolute_uri(args.root), absolute_uri(args.checkpoint)
    split_set = args.split_set or DEFAULT_SPLITS[args.format]
    metadata = read_checkpoint_metadata(checkpoint)  # first: a wrong path is the likeliest mistake
    try:
        dataset = real_dataset(args.format, root, split_set)
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read the {args.format} dataset: {first_line(exc)}") from None
    vocabulary = dataset.vocabulary
    _check_checkpoint(checkpoint, metadata, vocabulary)
    trained_split = metadata["split"]
    splits = args.splits or ([trained_split] if trained_split is not None else [1, 2, 3])
    if len(set(splits)) != len(splits):
        raise EvalError(f"--splits must be distinct, got {splits}")
    for k in splits:
        try:
            vocabulary.unseen(k)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    out = args.out and absolute_uri(args.out)
    if out:
        check_reachable(split_file_uri(out)[0])

    n = len(dataset)
    if n == 0:
        raise EvalError(f"the {args.format} {split_set} set in {root} has no images")
    notes = []
    if trained_split is not None:
        notes += [f"split {k}: the model was trained for split {trained_split}, so the unseen classes of "
                  f"split {k} are not zero-shot for it" for k in splits if k != trained_split]
    panels = {}
    if out and args.qualitative:
        stem = split_file_uri(out)[1].rsplit(".", 1)[0]
        # Spread over the dataset rather than its first images.
        for position in np.unique(np.linspace(0, n - 1, min(args.qualitative, n)).round().astype(int)):
            panels[int(position)] = f"{stem}-{dataset.ids[position]}.png"
    batches = [list(range(start, min(start + args.batch_size, n))) for start in range(0, n, args.batch_size)]
    report = {"format": FORMAT, "checkpoint": checkpoint, "checkpoint_iteration": metadata.get("iteration"),
              "setting": metadata["setting"], "trained_split": trained_split,
              "dataset": {"format": args.format, "root": root, "split_set": split_set, "images": n},
              "vocabulary": vocabulary.name, "splits": splits, "background": args.background,
              "inference": {"mode": "resize", "short_side": args.size, "label_resize": "nearest"},
              "qualitative": sorted(panels.values()), "notes": notes}
    return EvalPlan(checkpoint, args.format, root, split_set, args.size, vocabulary,
                    metadata["model"]["num_labels"], splits, args.background, out, batches, panels,
                    args.num_workers, report)


def _class_name(vocabulary: Vocabulary, index: int) -> str:
    return "background" if index == 0 else vocabulary.by_index(index).name


def score(plan: EvalPlan, confusion: ConfusionMatrix) -> dict:
    """Per split: seen, unseen and harmonic mIoU and the per-class IoUs, in percent."""
    vocabulary, results = plan.vocabulary, {}
    for k in plan.splits:
        seen = [vocabulary.lookup(name).index for name in vocabulary.seen(k)]
        unseen = [vocabulary.lookup(name).index for name in vocabulary.unseen(k)]
        scores = zs3_scores(confusion, seen, unseen, background=plan.background)
        results[str(k)] = {"seen": scores["seen"], "unseen": scores["unseen"], "harmonic": scores["harmonic"],
                           "unseen_classes": list(vocabulary.unseen(k)),
                           "per_class": {_class_name(vocabulary, i): v for i, v in scores["per_class"].items()}}
    return results


def run_evaluation(plan: EvalPlan) -> dict:
    """The report: plan.report plus "results" per split, the summed "confusion" and "run" (timings)."""
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = min(plan.num_workers or max(1, gpus), len(plan.batches))
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    panel_folder = split_file_uri(plan.out)[0] if plan.panels else None
    start = time.perf_counter()
    ds = ray.data.from_items([{"positions": p} for p in plan.batches], override_num_blocks=len(plan.batches))
    ds = ds.map_batches(ZS3Stage, fn_constructor_kwargs={
                            "checkpoint": plan.checkpoint, "format": plan.format, "root": plan.root,
                            "split": plan.split_set, "size": plan.size, "panels": plan.panels,
                            "panel_folder": panel_folder},
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                        **resources)
    confusion, images, busy = ConfusionMatrix(plan.num_labels), 0, 0.0
    for row in ds.iter_rows():  # integer counts: the merge order does not matter
        confusion.merge(ConfusionMatrix.from_dict(json.loads(row["confusion"])))
        images += int(row["images"])
        busy += float(row["seconds"])
    seconds = time.perf_counter() - start
    run = {"workers": workers, "gpus": gpus, "seconds": seconds, "images_per_second": images / seconds,
           # Without actor start-up (model and dataset loading): what one actor sustains.
           "images_per_second_per_worker": images / busy}
    return {**plan.report, "results": score(plan, confusion), "confusion": confusion.counts.tolist(), "run": run}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(results: dict) -> str:
    """Split | Seen | Unseen | Harmonic, numbers right-aligned; "-" where no class was present."""
    rows = [["Split", "Seen", "Unseen", "Harmonic"]]
    rows += [[k, _cell(r["seen"]), _cell(r["unseen"]), _cell(r["harmonic"])] for k, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    try:
        plan = prepare_evaluation(parse_args(argv))
    except (ConfigError, EvalError, StorageError, CheckpointError) as exc:
        print(f"eval_zs3: error: {exc}", file=sys.stderr)
        return 2
    report = run_evaluation(plan)
    dataset, run = report["dataset"], report["run"]
    print(f"{dataset['format']} {dataset['split_set']}: {dataset['images']} images, {report['setting']} model, "
          f"background: {report['background']}, short side {plan.size}")
    print(format_table(report["results"]))
    print(f"{run['images_per_second']:.2f} images/s in all, workers: {run['workers']} "
          f"({run['images_per_second_per_worker']:.2f} images/s per worker while busy)")
    for note in report["notes"]:
        print(f"note: {note}")
    if plan.out:
        write_file(plan.out, json.dumps(report, indent=2).encode())
        print(f"results written to {plan.out}" + (f", {len(plan.panels)} panels next to it" if plan.panels else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
