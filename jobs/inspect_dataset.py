"""Inspect a finished dataset: per-class counts, coverage, drops, label scores and galleries.

    python jobs/inspect_dataset.py outputs/tiny
    python jobs/inspect_dataset.py s3://bucket/datasets/voc-oracle --out s3://bucket/inspections/voc-oracle

Writes report.json, index.html (open it in a browser: tables, charts, a gallery per class)
and gallery/<class>.png to --out (default inspections/<dataset folder name>), and prints
a summary table. Exit code 0; 2 when there is no readable dataset at the URI or --out
cannot be written; 1 when storage fails midway.
"""

from __future__ import annotations

import argparse
import sys

from factory.inspection import inspect, summary_table, write_inspection
from factory.reader import DatasetError, DatasetSource
from factory.storage import StorageError, check_reachable, first_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="the dataset: a local folder or s3://bucket/prefix")
    parser.add_argument("--out", help="a local folder or s3://bucket/prefix for the report "
                                      "(default: inspections/<dataset folder name>)")
    args = parser.parse_args(argv)
    out = args.out or f"inspections/{args.uri.rstrip('/').rsplit('/', 1)[-1]}"
    try:
        dataset = DatasetSource.open(args.uri)
        check_reachable(out)
    except (DatasetError, StorageError) as exc:
        print(f"inspect_dataset: {exc}", file=sys.stderr)
        return 2
    try:
        report = write_inspection(inspect(dataset), out)
    except OSError as exc:
        print(f"inspect_dataset: failed: {first_line(exc)}", file=sys.stderr)
        return 1
    print(summary_table(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
