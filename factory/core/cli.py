"""The shell every job shares: one-line errors on stderr, the exit codes users script against,
and library output (Ray's, its workers') off unless --verbose."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from factory.core.errors import FactoryError
from factory.core.storage import first_line


def run_job(name: str, job: Callable[[list[str] | None], int], argv: list[str] | None = None, *,
            storage_failure: str | None = None) -> int:
    """``job(argv)``'s exit code; 2 with one line on stderr for input the user can fix
    (any FactoryError). Storage failing midway (an OSError beyond the S3 client's retries)
    is 2 with `storage_failure` appended when given, and is raised otherwise. Ctrl-C is 130
    with one line: the KeyboardInterrupt's message when the job gave it one (what it kept)."""
    try:
        return job(argv)
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except FactoryError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if storage_failure is None:
            raise
        print(f"{name}: error: {first_line(exc)} ({storage_failure})", file=sys.stderr)
        return 2


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own progress lines and logs, what its workers print, and this job's info logs")


def setup_output(verbose: bool) -> None:
    """This job's info logs and the libraries' own output on or off (``show_library_output``)."""
    from factory.core.cluster import show_library_output  # Ray loads only in the jobs that use it

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s")
    show_library_output(verbose)
