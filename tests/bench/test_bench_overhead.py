"""Smoke test of bench/pipeline_overhead.py at a tiny size: both sides run, every sample is accounted for."""

import json

import pytest

from bench import pipeline_overhead

pytestmark = pytest.mark.slow


def test_overhead_bench_reports_both_throughputs_and_their_ratio(ray_cluster, tmp_path, capsys):
    figures = pipeline_overhead.main(["--num-samples", "8", "--generator.steps", "2", "--generator.batch-size", "4",
                                      "--labeler.batch-size", "2", "--json", str(tmp_path / "figures.json")])
    assert figures["samples"] == 8 and figures["bare_labelled"] == 8
    assert figures["accounted"] == 8 and figures["exact"]  # the factory committed each planned sample once
    assert figures["bare_throughput"] > 0 and figures["factory_throughput"] > 0
    # No bounds that depend on the machine's load: positive, and consistent with each other.
    assert figures["ratio"] > 0 and figures["end_to_end_ratio"] > 0
    assert figures["model_actors"] == 1 and 0 < figures["model_busy"] <= 1.05  # one actor does both models
    assert 0 < figures["factory_startup"] < figures["factory_seconds"] and figures["bare_startup"] > 0
    assert figures["ratio"] == pytest.approx(figures["factory_throughput"] / figures["bare_throughput"])
    assert set(figures["busy"]) == {"generate", "label", "encode", "write"}
    assert all(seconds > 0 for seconds in figures["busy"].values())
    assert json.loads((tmp_path / "figures.json").read_text()) == figures
    printed = capsys.readouterr().out
    assert "bare loop" in printed and "factory" in printed and f"ratio      {figures['ratio']:.2f}" in printed
    assert f"end to end {figures['end_to_end_ratio']:.2f}" in printed


def test_overhead_bench_refuses_a_bad_recipe_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline_overhead.main(["--generator.batch-size", "0"])
    assert exit_info.value.code != 0
    assert "--generator.batch-size" in capsys.readouterr().err
