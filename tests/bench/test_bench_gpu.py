"""bench/gpu.py and bench/gpu_sweep.sh smoke tests: every stage, fast path and capture setting of the small
configuration on the CPU, and the rates the cost model reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu
from factory.pipeline.cost import load_rates

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "rates.json"
    assert gpu.main(["--small", "--batch-sizes", "1", "--repeats", "1", "--peak-tflops", "0.5", "--device", "cpu",
                     "--paths", "math,compiled", "--compile-backend", "aot_eager", "--out", str(out),
                     "--markdown", str(out.with_suffix(".md"))]) == 0
    return out


def rows(report):
    return {(m["stage"], m["scheduler"], m["path"], m["capture"]): m
            for m in json.loads(report.read_text())["measurements"]}


@pytest.mark.slow  # every stage, path and capture setting: a minute
def test_small_run_measures_every_stage_path_and_capture(report):
    measured = rows(report)
    expected = {("maskrcnn", "", "-", False), ("sam3", "", "-", False), ("owlv2+sam", "", "-", False)}
    for path in ("math", "compiled"):
        expected |= {("vae", "", path, False)}
        for capture in (False, True):
            expected |= {("unet", "", path, capture), ("generate", "ddim", path, capture),
                         ("generate", "dpm", path, capture), ("factory", "ddim", path, capture)}
    assert set(measured) == expected
    for m in measured.values():
        assert m["images_per_s"] > 0 and m["tflop_per_image"] > 0
        assert m["fraction_of_peak"] == pytest.approx(m["achieved_tflops"] / 0.5)
    # A pipeline call costs its guided U-Net evaluations and one decode (plus the small text encoder).
    unet, vae = measured[("unet", "", "math", False)]["tflop_per_image"], measured[("vae", "", "math", False)][
        "tflop_per_image"]
    for scheduler, steps in (("ddim", 2), ("dpm", 1)):
        m = measured[("generate", scheduler, "math", False)]
        assert m["steps"] == steps and m["predicted_images_per_s"] > 0
        assert 2 * steps * unet + vae <= m["tflop_per_image"] < 1.5 * (2 * steps * unet + vae)
    # The factory's stage is measured beside the bare call of the same configuration.
    for path in ("math", "compiled"):
        factory, bare = measured[("factory", "ddim", path, True)], measured[("generate", "ddim", path, True)]
        assert factory["bare_images_per_s"] == bare["images_per_s"] and factory["tflop_per_image"] == bare[
            "tflop_per_image"]


@pytest.mark.slow  # every stage, path and capture setting: a minute
def test_rates_and_tables_are_what_the_cost_model_and_people_read(report):
    measured = rows(report)
    rates = load_rates(str(report))  # the cost model reads what the bench writes
    assert rates.image_size == 64
    assert rates.unet_forwards_per_s == pytest.approx(max(
        m["images_per_s"] for key, m in measured.items() if key[0] == "unet" and not key[3]))
    # open_vocabulary's route is known only from its saved models: the slower one is its rate
    routes = [measured[(route, "", "-", False)]["images_per_s"] for route in ("sam3", "owlv2+sam")]
    assert rates.open_vocabulary_images_per_s == pytest.approx(min(routes))
    table = report.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(measured) + 1  # a header and a row per measurement
    for ratio in ("compiled / math, unet", "capture on / off, unet", "DPM-Solver++-1 / DDIM-2",
                  "factory / bare pipeline, compiled batch 1 capture on"):
        assert ratio in table, ratio


def test_unknown_stage_or_path_is_refused():
    for argv in (["--small", "--stages", "unet,bogus"], ["--small", "--paths", "turbo"]):
        with pytest.raises(SystemExit) as info:
            gpu.main(argv)
        assert info.value.code == 2


@pytest.mark.slow
def test_the_gpu_sweep_script_runs_end_to_end_at_small_size(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_sweep.sh"), "--small", "--out", str(tmp_path),
                             "--budget", "400"], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads((tmp_path / "gpu.json").read_text())
    stages = {(m["stage"], m["path"]) for m in merged["measurements"]}
    assert {("unet", "compiled"), ("vae", "sdpa+cl"), ("maskrcnn", "-"), ("factory", "compiled")} <= stages
    assert merged["rates"]["unet_forwards_per_s"] > 0 and load_rates(str(tmp_path / "gpu.json")).vae_images_per_s > 0
    assert "| stage |" in (tmp_path / "gpu.md").read_text()


def test_the_sweep_script_refuses_an_unknown_argument(tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_sweep.sh"), "--fast"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "unknown argument --fast" in result.stderr
