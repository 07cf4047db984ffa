"""Waiting on the event a test expects, not on a clock: file-system events (inotify) for files a
build or a cluster writes, process exits for processes a test stops."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from inotify_simple import INotify, flags

# A file appears (created, or renamed into place as every atomic write does) or is removed.
CHANGES = flags.CREATE | flags.MOVED_TO | flags.DELETE


def wait_until(condition: Callable[[], bool], folders: Sequence[Path], timeout: float) -> bool:
    """Blocks until `condition()` holds, looking again after each change in `folders` (created
    if missing); False when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    with INotify() as inotify:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            inotify.add_watch(folder, CHANGES)
        while not condition():  # checked after the watches exist: no change can slip between
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            inotify.read(timeout=int(remaining * 1000) + 1)
    return True


def count(folder: Path, pattern: str = "*") -> int:
    return len(list(folder.glob(pattern)))


def stop_process_group(pgid: int, grace: float = 3) -> None:
    """SIGTERM every process of a group, SIGKILL those still alive after `grace` seconds."""
    members = [p for p in psutil.process_iter() if _group(p) == pgid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in members:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, members = psutil.wait_procs(members, timeout=grace)
        if not members:
            return


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None
