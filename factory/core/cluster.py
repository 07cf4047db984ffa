"""Ray plumbing the jobs share: joining a cluster quietly, what a model actor asks for, and actor pools
over fixed batches."""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import ray

_verbose = False  # set by a job's --verbose (show_library_output); read where Ray starts


def show_library_output(verbose: bool) -> None:
    """Ray's and Ray Data's own output on (``--verbose``) or off: their start-up lines, per-operator
    progress lines, execution logs and warnings, and what workers print. Off, a build shows its own
    progress bar, and errors still arrive as exceptions."""
    global _verbose
    _verbose = verbose
    if not verbose:  # e.g. Ray Data's "the operator only received 1 input(s)" advice
        warnings.filterwarnings("ignore", module=r"ray\.")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster (RAY_ADDRESS, or a running local one) or start a local one, once per process;
    `num_cpus`: the logical CPUs of a local one (Ray's default: the machine's cores; a cluster joined keeps its own)."""
    if not ray.is_initialized():
        local = {"num_cpus": num_cpus} if num_cpus and not os.environ.get("RAY_ADDRESS") else {}
        ray.init(log_to_driver=_verbose, logging_level=logging.INFO if _verbose else logging.ERROR, **local)
        quiet_main_thread = not _verbose and threading.current_thread() is threading.main_thread()
        if quiet_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt_quietly)
    ray.data.DataContext.get_current().enable_progress_bars = _verbose
    # After Ray Data's import (the line above), which sets its loggers' levels as it configures them.
    logging.getLogger("ray.data").setLevel(logging.INFO if _verbose else logging.ERROR)


def _interrupt_quietly(signum, frame) -> None:
    """Ctrl-C without --verbose: first stop the driver's listener for the cluster's error messages
    (as ``ray.shutdown`` does), then interrupt. Tearing down the actors fails their tasks in
    flight, which that listener would print as "(raylet) Task ... submit failed" lines beside the
    job's own one line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker = ray._private.worker.global_worker
    worker.threads_stopped.set()
    worker.gcs_error_subscriber.close()  # wakes the listener's poll, so that it sees the stop
    raise KeyboardInterrupt


def cluster_gpus() -> int:
    """GPUs of the cluster ``ray.init`` joined (or started)."""
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_share(processes: int) -> int:
    """Torch threads for each of `processes` model processes (actors, training workers) on a machine
    without GPUs: the driver's cores, or its OMP_NUM_THREADS where set, shared among them. Ray
    gives a worker one thread per logical CPU it holds, one, and would leave the other cores idle."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    cores = int(os.environ.get("OMP_NUM_THREADS") or usable)
    return max(1, cores // processes)


def actor_resources(gpu: bool) -> dict[str, float]:
    """One GPU per model actor when there are GPUs; one CPU each, so actors never crowd a node."""
    return {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}


@dataclass
class ActorPool:
    workers: int
    gpus: int
    rows: Iterator[dict]  # the stage's output rows, one per batch, as they finish


def map_positions(stage: type, kwargs: dict, batches: list[list[int]], num_workers: int | None) -> ActorPool:
    """Each batch of row positions through one call of `stage` (a Ray Data callable class built
    with `kwargs`), in a pool of `num_workers` actors (default: one per GPU, else one).

    The batches are fixed by the caller, so a result made of exact counts per batch does not
    depend on the worker count or the order the batches finish in.
    """
    init_ray()
    gpus = cluster_gpus()
    workers = min(num_workers or max(1, gpus), len(batches))
    ds = ray.data.from_items([{"positions": p} for p in batches], override_num_blocks=len(batches))
    ds = ds.map_batches(stage, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), **actor_resources(gpus > 0))
    return ActorPool(workers, gpus, ds.iter_rows())
