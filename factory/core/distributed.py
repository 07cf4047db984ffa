"""Data-parallel training plumbing both trainers share: Ray Train start-up and reductions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from factory.core.cluster import cluster_gpus, cpu_share


def fit(loop: Callable[[dict], None], worker_config: dict, *, num_workers: int, use_gpu: Literal["auto"] | bool,
        cpus_per_worker: float = 1.0, datasets: dict | None = None, preserve_order: bool = False) -> None:
    """`loop(worker_config)` on `num_workers` Ray Train workers, one GPU each when `use_gpu` (or, for
    "auto", when the cluster ray.init joins has GPUs), each reading its shard of `datasets` (in the
    datasets' order with `preserve_order`); returns when training ends. Without GPUs each worker
    takes its share of the cores (``cpu_share``), where Ray would give it one thread."""
    data_options = ray.train.DataConfig.default_ingest_options()
    data_options.preserve_order = data_options.preserve_order or preserve_order
    if not ray.is_initialized():  # ignore_reinit_error would log a line each time
        ray.init()
    gpu = use_gpu if use_gpu != "auto" else cluster_gpus() > 0
    scaling = ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                      resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})})
    threads = None if gpu else cpu_share(num_workers)
    ray.train.torch.TorchTrainer(_with_threads(loop, threads), train_loop_config=worker_config, scaling_config=scaling,
                                 datasets=datasets, dataset_config=ray.train.DataConfig(execution_options=data_options)
                                 ).fit()


def _with_threads(loop: Callable[[dict], None], threads: int | None) -> Callable[[dict], None]:
    def run(config: dict) -> None:
        if threads:
            torch.set_num_threads(threads)
        loop(config)
    return run


def all_reduce_mean(total: float, count: int, device: torch.device) -> float:
    """The mean of a sum and a count accumulated on each worker, over all workers."""
    values = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
    return float(values[0] / values[1])
