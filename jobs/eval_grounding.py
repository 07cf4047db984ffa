"""Protocol-I evaluation: the grounding modules of the seen/unseen splits against the DAAM baseline.

    python jobs/eval_grounding.py --checkpoints '{1: outputs/grounding-split1/best}' --data outputs/tiny-test
    ray job submit --working-dir . -- python jobs/eval_grounding.py \\
        --checkpoints '{1: s3://bucket/grounding/voc-split1/best, 2: s3://bucket/grounding/voc-split2/best,
                        3: s3://bucket/grounding/voc-split3/best}' \\
        --data s3://bucket/datasets/pascal-sim-test --out s3://bucket/evals/voc.json

--checkpoints maps each split to a module trained on that split's seen classes, as the paper
trains one per split: split k is scored with its own module only, a module trained on any of
split k's unseen classes is refused, and the Average row (the paper's Average) is printed only
when every split has a module. A checkpoint must read the test set's features: a generator
model, total steps or capture step other than its training data's is refused; another
guidance scale or prompt template is a note.

--data is a triplet test set: a factory build with `--capture.features latent` (or tensors)
and `--capture.attention true` (DAAM's heat maps; without them the DAAM rows are skipped).
The modules run on every row through Ray Data, in an actor pool (one GPU per actor when the
cluster has GPUs), on one U-Net pass per row; DAAM's masks are its stored heat maps, upsampled
to the mask size and thresholded (the same maps for every split, grouped per split). Both are
scored on the same slots of the same images: the classes the oracle found with a non-empty
mask (the others have no ground truth), on the pixels the label map does not mark 255. The
batches are fixed by the driver and the counts are integers, so the result does not depend on
the worker count. Prints a table like Table 1 of Li et al. (ICCV 2023) and, with --out, writes
the results as JSON (local or s3://).
"""

from __future__ import annotations

import json
import sys

from factory.core.cli import run_job
from factory.core.options import parse_options
from factory.core.storage import write_file
from grounding.config import GroundingEvalOptions
from grounding.evaluate import prepare_evaluation, run_evaluation
from grounding.metrics import format_presence_table, format_table


def evaluate(argv: list[str] | None) -> int:
    plan = prepare_evaluation(parse_options(GroundingEvalOptions, argv, __doc__))
    report = run_evaluation(plan)
    print(format_table(report["results"]))
    print("\nLabel truth: presence precision/recall against the oracle's found flags; absent classes given a mask")
    print(format_presence_table(report["results"]))
    for note in report["notes"]:
        print(f"note: {note}")
    if plan.out:
        write_file(plan.out, json.dumps(report, indent=2).encode())
        print(f"results written to {plan.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("eval_grounding", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
