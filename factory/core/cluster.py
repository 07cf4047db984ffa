"""Ray plumbing the jobs share: what a model actor asks for, and actor pools over fixed batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ray


def cluster_gpus() -> int:
    """GPUs of the cluster ``ray.init`` joined (or started)."""
    return int(ray.cluster_resources().get("GPU", 0))


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
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    gpus = cluster_gpus()
    workers = min(num_workers or max(1, gpus), len(batches))
    ds = ray.data.from_items([{"positions": p} for p in batches], override_num_blocks=len(batches))
    ds = ds.map_batches(stage, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), **actor_resources(gpus > 0))
    return ActorPool(workers, gpus, ds.iter_rows())
