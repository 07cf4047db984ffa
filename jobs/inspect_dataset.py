"""Inspect a finished dataset: per-class counts, coverage, drops, label scores and galleries.

    python jobs/inspect_dataset.py outputs/tiny
    python jobs/inspect_dataset.py s3://bucket/datasets/voc-oracle --out s3://bucket/inspections/voc-oracle

Writes report.json, index.html (open it in a browser: tables, charts, a gallery per class)
and gallery/<class>.png to --out (default inspections/<dataset folder name>), and prints
a summary table. Exit code 0; 2 when there is no readable dataset at the URI or --out
cannot be written; 1 when storage fails midway.
"""

from __future__ import annotations

import sys

from factory.pipeline.plan import replan
from factory.core.cli import run_job
from factory.core.options import parse_options
from factory.core.storage import check_reachable, first_line
from factory.dataset.inspection import InspectOptions, inspect, summary_table, write_inspection
from factory.dataset.source import DatasetSource


def inspect_dataset(argv: list[str] | None) -> int:
    options = parse_options(InspectOptions, argv, __doc__)
    source = DatasetSource.open(options.dataset)
    check_reachable(options.output)
    try:
        report = write_inspection(inspect(source, replan), options.output)
    except OSError as exc:
        print(f"inspect_dataset: failed: {first_line(exc)}", file=sys.stderr)
        return 1
    print(summary_table(report, options.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("inspect_dataset", inspect_dataset, argv)


if __name__ == "__main__":
    sys.exit(main())
