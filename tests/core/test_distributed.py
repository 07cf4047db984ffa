"""Ray Train plumbing both trainers share (factory/core/distributed.py), on the suite's local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.core.cluster import cpu_share
from factory.core.distributed import fit


def test_the_cores_are_shared_among_the_processes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert [cpu_share(n) for n in (1, 3, 8, 16)] == [8, 2, 1, 1]


@pytest.mark.slow  # a Ray Train run: about 10 s
def test_a_training_worker_without_gpus_takes_its_share_of_the_cores(ray_cluster, tmp_path, monkeypatch):
    """Ray gives a worker one thread per logical CPU it holds: the suite's workers inherit
    OMP_NUM_THREADS=1, and without the share a trainer on CPUs would use one core."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the driver's cores, as a job without the suite sees them
    out = tmp_path / "threads"

    def record_threads(config: dict) -> None:  # nested: sent to the worker by value, not by module name
        import torch

        Path(config["out"]).write_text(str(torch.get_num_threads()))

    fit(record_threads, {"out": str(out)}, num_workers=1, use_gpu=False)
    assert out.read_text() == "2"
