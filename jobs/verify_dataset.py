"""Check a finished dataset against its manifest.

    python jobs/verify_dataset.py outputs/tiny
    python jobs/verify_dataset.py s3://bucket/datasets/voc-oracle

What it checks: factory/dataset/verify.py (files, checksums, commit records, planned ids,
counts, every image decoding, the card). Prints a short report; exit code 0 when everything
holds, 1 otherwise.
"""

from __future__ import annotations

import sys

from factory.pipeline.plan import replan
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
