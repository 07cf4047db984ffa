"""Build a synthetic segmentation dataset: plan -> generate -> label -> write.

    python jobs/build_dataset.py                                   # the mini world, local CPUs
    python jobs/build_dataset.py --recipe tiny                     # tiny random models: plumbing only
    ray job submit -- python jobs/build_dataset.py --recipe voc-oracle --out s3://bucket/prefix

Running the same command again on the same output finishes only what is missing.
"""

from __future__ import annotations

import argparse
import sys

from factory.build.cost import add_estimate_arguments, estimate, format_estimate, load_rates
from factory.build.pipeline import Summary, prepare_build, run_build
from factory.build.plan import build_plan
from factory.build.recipe import add_recipe_arguments, recipe_from_args
from factory.core.cli import run_job
from factory.core.options import job_parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__)
    add_recipe_arguments(parser)
    add_estimate_arguments(parser)
    return parser.parse_args(argv)


def build(argv: list[str] | None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    if args.estimate:  # the recipe is validated and planned, then only the cost model runs
        samples = len(build_plan(recipe))
        print(format_estimate(estimate(recipe, samples, load_rates(args.rates), args.gpus, args.usd_per_gpu_hour),
                              recipe))
        return 0
    prepared = prepare_build(recipe)
    for note in prepared.notes:
        print(f"note: {note}")
    print_summary(run_build(prepared))
    return 0


def print_summary(summary: Summary) -> None:
    print(f"\nDataset written to {summary.out}")
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary.dropped.items()) or "none"
    print(f"  samples   {summary.written} written of {summary.planned} planned; dropped: {dropped}; "
          f"given up: {summary.given_up}")
    if summary.resumed_from:
        print(f"  resumed   {summary.resumed_from} samples were already done; {summary.new_this_run} made now")
    rate = summary.new_this_run / summary.wall_seconds if summary.wall_seconds else 0.0
    print(f"  time      {summary.wall_seconds:.1f} s wall, {rate:.2f} samples/s")
    for stage, seconds in summary.stage_seconds.items():
        per = summary.new_this_run / seconds if seconds else float("inf")
        print(f"    {stage:<9} {seconds:8.1f} s busy   {per:8.2f} samples per busy second")
    per_sample = summary.bytes_written / summary.written if summary.written else 0
    print(f"  storage   {summary.bytes_written / 1e6:.2f} MB in {summary.files} Parquet files "
          f"({per_sample / 1e3:.1f} kB per sample)")
    for note in summary.notes:
        print(f"  note      {note}")
    print(f"  manifest  {summary.manifest}")
    print(f"  card      {summary.card}")
    if summary.preview:
        print(f"  preview   {summary.preview}")


def main(argv: list[str] | None = None) -> int:
    return run_job("build_dataset", build, argv,
                   storage_failure="committed parts are kept; the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
