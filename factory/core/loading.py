"""Model start-up in actors: a bounded number of attempts, then one clear error.

A model actor that cannot load its model (a throttled or interrupted download, a node
short of memory for a moment, corrupt weights) retries with backoff inside the actor;
when every attempt has failed it raises ``ModelLoadError``, whose one-line message names
the model and the cause. Ray Data then ends the build at once (it replaces no actor
whose constructor failed), and the driver reports that line (``pipeline_failure``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, TypeVar

from factory.core.errors import FactoryError

T = TypeVar("T")
logger = logging.getLogger(__name__)


class ModelLoadError(FactoryError, RuntimeError):
    """A model failed to load on every attempt; the message is one line."""


def load_with_retries(what: str, load: Callable[[], T], attempts: int, backoff: float = 2.0) -> T:
    """``load()``, tried ``attempts`` times, waiting ``backoff``, 2x``backoff``, ... between tries."""
    for attempt in range(1, attempts + 1):
        try:
            return load()
        except Exception as exc:  # any failure may be transient; the bound keeps it from hanging
            cause = _one_line(exc)
            if attempt == attempts:
                raise ModelLoadError(f"cannot load {what} ({attempts} attempt(s)): {cause}") from exc
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("loading %s failed (attempt %d of %d), retrying in %.0f s: %s",
                           what, attempt, attempts, delay, cause)
            time.sleep(delay)
    raise ValueError(f"attempts must be at least 1, not {attempts}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# Ray hands the driver an actor's start-up failure or a task's failure as text (the
# worker's traceback): the original exception object does not cross.
_OUR_ERRORS = re.compile(r"\b(?:ModelLoadError|StorageError): (.+)$", re.MULTILINE)


def pipeline_failure(exc: BaseException) -> str | None:
    """The one-line message of a ModelLoadError or StorageError inside a Ray error, if any."""
    found = _OUR_ERRORS.findall(str(exc))
    return found[-1].strip() if found else None
