"""Smoke test of bench/scaling.py at a tiny size: a 1- and a 2-node fake-GPU cluster, every sample once.

The bench starts a Ray cluster of its own, so it runs in a child process (the session's
Ray stays untouched).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scaling

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_scaling_bench_on_one_and_two_fake_gpu_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scaling.py"), "--nodes", "1", "2", "--batches-per-gpu", "2",
         "--batch-size", "4", "--size", "64", "--generate-seconds", "0.2", "--label-seconds", "0.05",
         "--rows-per-file", "4", "--cpus-per-node", "2", "--json", str(tmp_path / "figures.json")],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "figures.json").read_text())["runs"]
    assert [r["gpus"] for r in runs] == [1, 2]
    for r in runs:
        assert r["samples"] == r["gpus"] * 2 * 4
        assert r["accounted"] == r["samples"] and r["exact"]  # every planned sample committed once
        assert r["model_bound"] == pytest.approx(r["gpus"] * 4 / 0.25)
        # The stand-ins sleep their stated time, so only a miscount could beat the bound by much.
        # vs_linear has no bound: one slow one-node run (a busy machine) makes it any size.
        assert 0 < r["efficiency"] <= 1.5 and r["vs_linear"] > 0
        assert r["efficiency"] == pytest.approx(r["throughput"] / r["model_bound"])
    assert runs[0]["vs_linear"] == pytest.approx(1.0)
    assert "efficiency" in result.stdout and "vs linear" in result.stdout


def test_stand_in_stages_return_what_the_real_stages_return(tmp_path):
    import numpy as np

    from factory.build.recipe import GeneratorConfig

    generator, labeler = scaling.stand_in_stages(tmp_path, 0.0, 0.0)
    config = GeneratorConfig(height=64, width=48)
    batch = {"seed": np.array([1, 2]), "classes": np.array([["dog"], ["dog", "cat"]], dtype=object)}
    batch = labeler(None, "voc", 48)(generator(config)(batch))
    assert batch["image"].shape == (2, 64, 48, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == batch["class_bits"].shape == (2, 64, 48)
    assert set(np.unique(batch["label"][1])) == {0, 8, 12}  # background, cat, dog (VOC indices)
    assert set(np.unique(batch["class_bits"][1])) <= {0, 1, 2, 3} and (batch["class_bits"][1] & 2).any()
    assert [len(s) for s in batch["scores"]] == [1, 2] and list(batch["drop_reason"]) == ["", ""]
    assert not np.array_equal(batch["image"][0], batch["image"][1])  # each seed its own image
