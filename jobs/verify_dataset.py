"""Check a finished dataset against its manifest.

    python jobs/verify_dataset.py outputs/tiny
    python jobs/verify_dataset.py s3://bucket/datasets/voc-oracle

Checks that every Parquet file the manifest lists is there with its recorded size,
sha256 and row count, and no other; that each file holds the ids of its commit record;
that sample ids are unique across files and are exactly the planned ids (the plan
rebuilt from the manifest's recipe) minus those recorded as dropped; that the counts
add up; that every image, label map and class mask decodes at the recorded size; and
that the dataset card (README.md) is there.
Prints a short report; exit code 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import sys

from factory.build.plan import replan
from factory.core.cli import run_job
from factory.core.options import parse_options
from factory.dataset.verify import Verifier, VerifyOptions


def verify(argv: list[str] | None) -> int:
    verifier = Verifier(parse_options(VerifyOptions, argv, __doc__).dataset, replan)
    ok = verifier.run()
    print(verifier.report())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_job("verify_dataset", verify, argv)


if __name__ == "__main__":
    sys.exit(main())
