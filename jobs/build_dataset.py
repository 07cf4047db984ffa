"""Build a synthetic segmentation dataset: plan -> generate -> label -> write.

    python jobs/build_dataset.py                                   # the mini world, local CPUs
    python jobs/build_dataset.py --recipe tiny                     # tiny random models: plumbing only
    ray job submit -- python jobs/build_dataset.py --recipe voc-oracle --out s3://bucket/prefix

Running the same command again on the same output finishes only what is missing.
"""

from __future__ import annotations

import argparse
import sys

from factory.pipeline.cost import add_estimate_arguments, estimate, format_estimate, load_rates
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import add_recipe_arguments, recipe_from_args
from factory.core.cli import add_verbose_argument, run_job, setup_output
from factory.core.options import job_parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__)
    add_recipe_arguments(parser)
    add_estimate_arguments(parser)
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def build(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_output(args.verbose)
    recipe = recipe_from_args(args)
    if args.estimate:  # the recipe is validated and planned, then only the cost model runs
        samples = len(build_plan(recipe))
        print(format_estimate(estimate(recipe, samples, load_rates(args.rates), args.gpus, args.usd_per_gpu_hour),
                              recipe))
        return 0
    prepared = prepare_build(recipe)
    for note in prepared.notes:
        print(f"note: {note}")
    print(run_build(prepared).report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("build_dataset", build, argv,
                   storage_failure="committed parts are kept; the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
