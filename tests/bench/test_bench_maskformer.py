"""Smoke test of bench/maskformer.py at the tiny size: it trains, predicts and reports sane figures."""

from __future__ import annotations

from bench import maskformer


def test_tiny_bench_reports_figures(capsys):
    result = maskformer.main(["--preset", "tiny", "--batch", "2", "--crop", "32", "--size", "32", "--repeats", "1"])
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["batch"] == 2
    assert 100_000 < result["parameters"] < 300_000  # the tiny config's ~170k, not the real 60M
    assert result["seconds_per_iteration"] > 0 and result["eval_images_per_second"] > 0
    printed = capsys.readouterr().out
    assert "s per iteration (batch 2, crop 32)" in printed and "images/s (500x375, short side 32)" in printed


def test_random_batch_has_classes_background_and_ignore():
    import numpy as np

    images, labels = maskformer.random_batch(np.random.default_rng(0), batch=2, crop=32)
    assert images.shape == (2, 32, 32, 3) and labels.shape == (2, 32, 32)
    for label in labels.numpy():
        values = set(np.unique(label).tolist())
        assert {0, 255} <= values and len(values - {0, 255}) >= 1
