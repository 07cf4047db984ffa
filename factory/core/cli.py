"""The shell every job shares: one-line errors on stderr and the exit codes users script against."""

from __future__ import annotations

import sys
from collections.abc import Callable

from factory.core.errors import FactoryError
from factory.core.storage import first_line


def run_job(name: str, job: Callable[[list[str] | None], int], argv: list[str] | None = None, *,
            storage_failure: str | None = None) -> int:
    """``job(argv)``'s exit code; 2 with one line on stderr for input the user can fix
    (any FactoryError). Storage failing midway (an OSError beyond the S3 client's retries)
    is 2 with `storage_failure` appended when given, and is raised otherwise."""
    try:
        return job(argv)
    except FactoryError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if storage_failure is None:
            raise
        print(f"{name}: error: {first_line(exc)} ({storage_failure})", file=sys.stderr)
        return 2
