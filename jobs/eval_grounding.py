"""Protocol-I evaluation: a trained grounding module against the DAAM baseline (spec section 8).

    python jobs/eval_grounding.py --checkpoint outputs/grounding-tiny/best --data outputs/tiny-test
    ray job submit --working-dir . -- python jobs/eval_grounding.py \\
        --checkpoint s3://bucket/grounding/voc-split1/best --data s3://bucket/datasets/pascal-sim-test \\
        --splits 1 --out s3://bucket/evals/voc-split1.json

--data is a triplet test set: a factory build with `--capture.features latent` (or tensors)
and `--capture.attention true` (DAAM's heat maps; without them the DAAM rows are skipped).
The module runs on every row through Ray Data, in an actor pool (one GPU per actor when the
cluster has GPUs); DAAM's masks are its stored heat maps, upsampled to the mask size and
thresholded. Both are scored on the same slots of the same images: the classes the oracle
found with a non-empty mask (the others have no ground truth). The batches are fixed by
the driver and the counts are integers, so the result does not depend on the worker count.
Prints a table like Table 1 of 003 and, with --out, writes the results as JSON (local or s3://).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from factory.daam import DAAM_THRESHOLD
from factory.quality import select_top_fraction
from factory.options import ArgumentParser, ConfigError
from factory.storage import StorageError, absolute_uri, check_reachable, split_file_uri, write_file
from grounding.data import DataError, TripletSource
from grounding.evaluate import DAAM, MODULE, EvalStage, ProtocolIAccumulator, format_table
from grounding.train import CheckpointError, read_checkpoint_metadata

FORMAT = "protocol-i-results/1"
MODULE_THRESHOLD = 0.5  # GroundingModule.predict: sigmoid(logits) > 0.5
_CHECKPOINT_KEYS = ("model", "text", "generator", "capture", "vocabulary", "classes")


class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message is one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="grounding checkpoint folder (local or s3://), "
                        "e.g. <training out>/best")
    parser.add_argument("--data", required=True, help="triplet test set (local or s3://)")
    parser.add_argument("--out", help="results JSON file, local or s3:// (default: print only)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], help="seen/unseen splits (default: 1 2 3)")
    parser.add_argument("--daam-threshold", type=float, default=DAAM_THRESHOLD,
                        help=f"DAAM heat-map threshold (default: {DAAM_THRESHOLD}, Tang et al.'s)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per module call (default: 8)")
    parser.add_argument("--num-workers", type=int, help="actors (default: one per GPU in the cluster, else 1)")
    parser.add_argument("--min-score", type=float, help="automatic test-set filter, detector agreement: keep "
                        "samples whose every class the oracle found with at least this score")
    parser.add_argument("--keep-quality", type=float, help="automatic test-set filter, image quality: keep this "
                        "best fraction by the CLIP quality score (002 keeps 0.8; needs a build with quality.model)")
    return parser.parse_args(argv)


@dataclass
class EvalPlan:
    checkpoint: str
    data: str
    out: str | None
    splits: list[int]
    vocabulary: str
    daam_threshold: float | None  # None: the dataset has no heat maps, DAAM is skipped
    batches: list[list[int]]  # row positions of each module call, fixed here
    num_workers: int | None
    report: dict  # the JSON's fields other than the results


def select_test_rows(source: TripletSource, min_score: float | None, keep_quality: float | None) -> list[int]:
    """Row positions that pass the automatic filter replacing the papers' manual check."""
    columns = ["found", "scores"] + (["quality"] if keep_quality is not None else [])
    try:
        table = source.read(columns)
    except (KeyError, pa.ArrowInvalid):
        raise EvalError(f"--keep-quality needs quality scores: build {source.uri} with --quality.model") from None
    keep = np.ones(table.num_rows, bool)
    if min_score is not None:
        keep &= np.array([all(found) and min(scores) >= min_score for found, scores in
                          zip(table.column("found").to_pylist(), table.column("scores").to_pylist())])
    if keep_quality is not None and keep.any():
        if not 0.0 < keep_quality <= 1.0:
            raise EvalError(f"--keep-quality {keep_quality} must be in (0, 1]")
        quality = table.column("quality").to_numpy()
        keep &= select_top_fraction(np.where(keep, quality, -np.inf), keep_quality * keep.mean())
    return [int(i) for i in np.flatnonzero(keep)]


def prepare_evaluation(args: argparse.Namespace) -> EvalPlan:
    """Every check that needs no model; raises EvalError, DataError, StorageError or CheckpointError."""
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 1):
        raise EvalError("--batch-size and --num-workers must be at least 1")
    if not 0.0 <= args.daam_threshold <= 1.0:
        raise EvalError(f"--daam-threshold {args.daam_threshold} is outside [0, 1] (heat maps are normalised)")
    checkpoint, data = absolute_uri(args.checkpoint), absolute_uri(args.data)
    metadata = read_checkpoint_metadata(checkpoint)
    missing = [key for key in _CHECKPOINT_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks {', '.join(missing)} in its checkpoint.json")
    source = TripletSource(data)
    vocabulary = source.vocabulary
    for what, trained, tested in (("generator", metadata["generator"], source.generator),
                                  ("capture step", metadata["capture"].get("steps_remaining"), source.capture_step),
                                  ("vocabulary", metadata["vocabulary"]["name"], vocabulary.name)):
        if trained != tested:
            raise EvalError(f"{data} was made with {what} {tested}, the checkpoint's training data with {trained}")
    height, width = source.image_size
    if not metadata["model"]["mask_resolution"] == height == width:
        raise EvalError(f"the module makes {metadata['model']['mask_resolution']}-pixel masks, "
                        f"{data} has {height}x{width} images")
    try:
        ProtocolIAccumulator(vocabulary, args.splits)  # rejects unknown and repeated splits
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    out = args.out and absolute_uri(args.out)
    if out:
        check_reachable(split_file_uri(out)[0])

    notes = []
    daam_threshold = args.daam_threshold
    if "daam" not in source.shapes:
        daam_threshold = None
        notes.append(f"{data} has no DAAM heat maps (built without --capture.attention true): DAAM skipped")
    trained = set(metadata["classes"])
    for k in args.splits:
        shown = sorted(trained.intersection(vocabulary.unseen(k)))
        if shown:
            notes.append(f"split {k}: the module was trained on {len(shown)} of its unseen classes "
                         f"({', '.join(shown)}), so its unseen columns are not zero-shot")
    kept = select_test_rows(source, args.min_score, args.keep_quality)
    n = len(kept)
    if n == 0:
        raise EvalError(f"no sample of {data} passes the test-set filter")
    batches = [kept[start:start + args.batch_size] for start in range(0, n, args.batch_size)]
    if n < sum(rows for _, rows in source.files):
        notes.append(f"test-set filter (min score {args.min_score}, best quality fraction {args.keep_quality}) "
                     f"kept {n} of {sum(rows for _, rows in source.files)} samples")
    thresholds = {MODULE: MODULE_THRESHOLD} | ({DAAM: daam_threshold} if daam_threshold is not None else {})
    report = {"format": FORMAT, "checkpoint": checkpoint, "checkpoint_epoch": metadata.get("epoch"),
              "trained_classes": metadata["classes"], "data": data,
              "plan_digest": source.manifest["plan"]["digest"], "samples": n, "vocabulary": vocabulary.name,
              "splits": list(args.splits), "thresholds": thresholds,
              "scored": "classes the oracle found with a non-empty mask", "notes": notes}
    return EvalPlan(checkpoint, data, out, list(args.splits), vocabulary.name, daam_threshold, batches,
                    args.num_workers, report)


def run_evaluation(plan: EvalPlan) -> dict:
    """The report: plan.report plus "results" per method (ProtocolIAccumulator.result)."""
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = min(plan.num_workers or max(1, gpus), len(plan.batches))
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    ds = ray.data.from_items([{"positions": p} for p in plan.batches], override_num_blocks=len(plan.batches))
    ds = ds.map_batches(EvalStage, fn_constructor_kwargs={
                            "checkpoint": plan.checkpoint, "data": plan.data, "splits": plan.splits,
                            "daam_threshold": plan.daam_threshold},
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                        **resources)
    totals = {MODULE: ProtocolIAccumulator(plan.vocabulary, plan.splits)}
    if plan.daam_threshold is not None:
        totals[DAAM] = ProtocolIAccumulator(plan.vocabulary, plan.splits)
    for row in ds.iter_rows():  # integer counts: the merge order does not matter
        totals[MODULE].merge(ProtocolIAccumulator.from_dict(json.loads(row["module"])))
        if DAAM in totals:
            totals[DAAM].merge(ProtocolIAccumulator.from_dict(json.loads(row["daam"])))
    return {**plan.report, "results": {method: acc.result() for method, acc in totals.items()}}


def main(argv: list[str] | None = None) -> int:
    try:
        plan = prepare_evaluation(parse_args(argv))
    except (ConfigError, EvalError, DataError, StorageError, CheckpointError) as exc:
        print(f"eval_grounding: error: {exc}", file=sys.stderr)
        return 2
    report = run_evaluation(plan)
    print(format_table(report["results"]))
    for note in report["notes"]:
        print(f"note: {note}")
    if plan.out:
        write_file(plan.out, json.dumps(report, indent=2).encode())
        print(f"results written to {plan.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
