"""Model start-up in actors: a bounded number of attempts, then one clear error.

A model actor that cannot load its model for a reason that may pass (a throttled or
interrupted download, a node short of memory for a moment) retries with backoff inside the
actor; a failure that would fail again (weights of another shape, a corrupt or missing file, a
bad config) is not retried. Either way it raises ``ModelLoadError``, whose one-line message
names the model and the cause. Ray Data then ends the build at once (it replaces no actor
whose constructor failed), and the driver reports that line (``pipeline_failure``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, TypeVar

from factory.core.errors import FactoryError
from factory.core.storage import StorageError

T = TypeVar("T")
logger = logging.getLogger(__name__)


class ModelLoadError(FactoryError, RuntimeError):
    """A model failed to load on every attempt; the message is one line."""


def load_with_retries(what: str, load: Callable[[], T], attempts: int, backoff: float = 2.0) -> T:
    """``load()``, tried ``attempts`` times, waiting ``backoff``, 2x``backoff``, ... between tries."""
    for attempt in range(1, attempts + 1):
        try:
            return load()
        except Exception as exc:
            cause = _one_line(exc)
            if not transient(exc):
                raise ModelLoadError(f"cannot load {what}: {cause}") from exc
            if attempt == attempts:
                raise ModelLoadError(f"cannot load {what} ({attempts} attempt(s)): {cause}") from exc
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("loading %s failed (attempt %d of %d), retrying in %.0f s: %s",
                           what, attempt, attempts, delay, cause)
            time.sleep(delay)
    raise ValueError(f"attempts must be at least 1, not {attempts}")


def transient(exc: BaseException) -> bool:
    """Whether another try may succeed: input/output (a download refused or cut, a busy disk) or
    memory short for a moment; not a missing file, weights of another shape, a bad config or a bug."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, (OSError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"  # torch's, on a GPU


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# Ray hands the driver an actor's start-up failure or a task's failure as text (the
# worker's traceback): the original exception object does not cross.
_OUR_ERRORS = re.compile(r"\b(ModelLoadError|StorageError): (.+)$", re.MULTILINE)


def pipeline_failure(exc: BaseException) -> FactoryError | None:
    """The ModelLoadError or StorageError inside a Ray error, rebuilt from its one-line message, if any."""
    found = _OUR_ERRORS.findall(str(exc))
    if not found:
        return None
    kind, message = found[-1]
    return (ModelLoadError if kind == "ModelLoadError" else StorageError)(message.strip())
