"""bench/gpu.py smoke test: every stage of the small configuration on the CPU, rates the cost model reads."""

from __future__ import annotations

import json

import pytest

from bench import gpu
from factory.build.cost import load_rates


def test_small_run_measures_every_stage(tmp_path, capsys):
    out = tmp_path / "rates.json"
    assert gpu.main(["--small", "--batch-sizes", "1", "--repeats", "1", "--peak-tflops", "0.5",
                     "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(m["stage"], m["scheduler"]): m for m in report["measurements"]}
    assert set(rows) == {("unet", ""), ("vae", ""), ("maskrcnn", ""), ("generate", "ddim"), ("generate", "dpm"),
                         ("sam3", ""), ("owlv2+sam", "")}
    for m in rows.values():
        assert m["images_per_s"] > 0 and m["tflop_per_image"] > 0
        assert m["fraction_of_peak"] == pytest.approx(m["achieved_tflops"] / 0.5)
    # A pipeline call costs its guided U-Net evaluations and one decode (plus the small text encoder).
    unet, vae = rows[("unet", "")]["tflop_per_image"], rows[("vae", "")]["tflop_per_image"]
    for scheduler, steps in (("ddim", 2), ("dpm", 1)):
        m = rows[("generate", scheduler)]
        assert m["steps"] == steps and m["predicted_images_per_s"] > 0
        assert 2 * steps * unet + vae <= m["tflop_per_image"] < 1.5 * (2 * steps * unet + vae)
    rates = load_rates(str(out))  # the cost model reads what the bench writes
    assert rates.image_size == 64
    assert rates.unet_forwards_per_s == pytest.approx(rows[("unet", "")]["images_per_s"])
    # open_vocabulary's route is known only from its saved models: the slower one is its rate
    assert rates.open_vocabulary_images_per_s == pytest.approx(
        min(rows[("sam3", "")]["images_per_s"], rows[("owlv2+sam", "")]["images_per_s"]))
    assert "DPM-Solver++-1 / DDIM-2" in capsys.readouterr().out


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit) as info:
        gpu.main(["--small", "--stages", "unet,bogus"])
    assert info.value.code == 2
