"""Smoke test of bench/scaling.py at a tiny size: 1 and 2 fake GPUs, every sample once; its stand-ins.

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
        [sys.executable, str(REPO / "bench" / "scaling.py"), "--gpus", "1", "2", "--gpus-per-node", "1",
         "--batches-per-gpu", "2",
         "--batch-size", "4", "--size", "64", "--generate-seconds", "0.2", "--label-seconds", "0.05",
         "--rows-per-file", "4", "--cpus-per-gpu", "2", "--json", str(tmp_path / "figures.json")],
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
        assert r["driver_cpu_per_batch"] > 0 and 0 < r["host_busy"] <= 1
    assert runs[0]["vs_linear"] == pytest.approx(1.0)
    assert "efficiency" in result.stdout and "vs linear" in result.stdout and "coordination" in result.stdout


def test_held_encoding_encodes_each_input_once_and_returns_its_bytes():
    import numpy as np

    from factory.dataset.codec import decode_png, encode_image

    calls = []
    encode = scaling.held(lambda array, *args: calls.append(args) or encode_image(array, *args))
    image = scaling.stand_in_image(3, 64, 64)
    first = encode(image, "png", 95)
    again = encode(image.copy(), "png", 95)  # equal pixels, another array
    assert again == first and len(calls) == 1
    np.testing.assert_array_equal(decode_png(first), image)
    other = encode(scaling.stand_in_image(4, 64, 64), "png", 95)
    assert other != first and len(calls) == 2
    encode(image, "jpeg", 90)  # other arguments: another encoding
    assert len(calls) == 3


def test_the_driver_bound_on_gpus():
    assert scaling.max_gpus(0.01, 4.2) == pytest.approx(420)
    runs = [{"samples": 8 * b, "driver_cpu_seconds": 3.0 + 0.02 * b} for b in (6, 48, 192)]
    fixed, per_batch = scaling.coordination(runs, batch_size=8)
    assert fixed == pytest.approx(3.0) and per_batch == pytest.approx(0.02)


def test_stand_in_stages_return_what_the_real_stages_return(tmp_path):
    import numpy as np

    from factory.pipeline.sections import GeneratorConfig

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
