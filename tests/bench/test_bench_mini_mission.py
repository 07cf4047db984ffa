"""bench/mini_mission.py's Protocol-II summary: every segmenter trained with several seeds, each cell
their mean and standard deviation, both background conventions named in the table; and the oracle
reference's training curve, which says whether the schedule has plateaued."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

import bench.mini_mission as mission
from bench.mini_mission import (
    curve_summary, curve_text, over_seeds, plot_curve, protocol_ii, protocol_ii_table, training_curve)
from segmenter.evaluate import BACKGROUND_KEYS

IGNORED, COUNTED = BACKGROUND_KEYS["ignore"], BACKGROUND_KEYS["seen"]


def run(seen: float, unseen: float, harmonic: float | None) -> dict:
    figures = {"seen": seen, "unseen": unseen, "harmonic": harmonic}
    return {IGNORED: figures, COUNTED: {m: v and v / 2 for m, v in figures.items()}}


def test_each_model_is_the_mean_and_spread_of_its_seeds():
    entry = over_seeds({0: run(60.0, 30.0, 40.0), 2: run(70.0, 50.0, 58.3), 1: run(65.0, 40.0, 49.5)})
    harmonics = [40.0, 49.5, 58.3]
    # the report's format: the papers' convention (background ignored) at the top, one run per seed
    assert entry["harmonic"] == pytest.approx(statistics.fmean(harmonics))
    assert entry["harmonic_sd"] == pytest.approx(statistics.stdev(harmonics))
    assert (entry["seen"], entry["unseen"]) == (pytest.approx(65.0), pytest.approx(40.0))
    assert [r["seed"] for r in entry["runs"]] == [0, 1, 2] and entry["runs"][1][IGNORED]["harmonic"] == 49.5
    assert entry[COUNTED]["seen"] == pytest.approx(32.5) and entry[COUNTED]["seen_sd"] == pytest.approx(2.5)
    one = over_seeds({0: run(60.0, 0.0, None)})  # one seed: no spread; no harmonic where a run had none
    assert one["harmonic"] is None and one["harmonic_sd"] is None and one[IGNORED]["seen_sd"] is None


def test_the_table_names_each_columns_convention_and_shows_the_spread():
    results = {"Model-A": over_seeds({0: run(60.0, 30.0, 40.0), 1: run(70.0, 50.0, 58.0)}),
               "Oracle": over_seeds({0: run(80.0, 70.0, 74.7), 1: run(80.0, 70.0, 74.7)})}
    caption, blank, header, rule, a, oracle = protocol_ii_table(results).splitlines()
    assert caption.startswith("bg ignored: background pixels left out (ZegFormer, Ding et al. 2022)")
    assert "bg counted: background a seen class (ZS3Net, Bucher et al. 2019)" in caption and blank == ""
    assert "mean ± sample standard deviation over 2 training seeds" in caption
    assert [c.strip() for c in header.strip("|").split("|")][3:] == [
        "Seen, bg ignored", "Unseen, bg ignored", "Harmonic, bg ignored",
        "Seen, bg counted", "Unseen, bg counted", "Harmonic, bg counted"]
    assert rule == "|---|---|---|" + "---:|" * 6
    assert [c.strip() for c in a.strip("|").split("|")][3:6] == ["65.0 ± 7.1", "40.0 ± 14.1", "49.0 ± 12.7"]
    assert [c.strip() for c in oracle.strip("|").split("|")][3] == "80.0 ± 0.0"


def test_a_protocol_ii_run_keeps_both_conventions(monkeypatch, tmp_path):
    """What one seed's evaluation contributes: split 1's three figures under each convention, as eval_zs3
    reports them (its per-class IoUs and the chosen convention's copy at the top are left out)."""
    split = {key: {"seen": 70.0 - k, "unseen": 50.0 - k, "harmonic": 58.3 - k, "per_class": {}}
             for k, key in enumerate(BACKGROUND_KEYS.values())}
    monkeypatch.setattr(mission, "prepare_protocol_ii", lambda options: options)
    monkeypatch.setattr(mission, "run_protocol_ii", lambda options: {"results": {"1": {**split, "seen": 70.0}}})
    assert protocol_ii(tmp_path, "Model-A", 0, "ck") == {
        IGNORED: {"seen": 70.0, "unseen": 50.0, "harmonic": 58.3}, COUNTED: {"seen": 69.0, "unseen": 49.0,
                                                                           "harmonic": 57.3}}


def test_every_segmenter_starts_from_the_pretrained_backbone_on_one_schedule(monkeypatch, tmp_path):
    configs = {}
    monkeypatch.setattr(mission, "prepare_segmenter", lambda config: configs.setdefault(config.out, config))
    monkeypatch.setattr(mission, "run_segmenter", lambda config: type("Summary", (), {"last": config.out + "/last"}))
    for name in mission.MODELS:
        mission.train_segmenter(tmp_path, name, 100, 2, init="c/last" if name == "Model-D" else None)
    by_name = {Path(out).parent.name: config for out, config in configs.items()}
    assert sorted(by_name) == sorted(name.lower() for name in mission.MODELS)
    for name, config in by_name.items():
        assert (config.iterations, config.seed, config.backbone_lr_factor, config.split) == (100, 2, 0.1, 1), name
        assert config.model.backbone_weights == (None if name == "model-d" else mission.BACKBONE), name
    assert by_name["real"].data is None and by_name["real"].real.split == "train"
    assert by_name["real"].setting == by_name["oracle"].setting == "supervised"
    assert by_name["model-d"].init == "c/last" and by_name["model-d"].real_fraction == 0.5
    # the curve's points: the oracle reference alone keeps snapshots, 10 over its training
    assert {name: config.snapshot_every for name, config in by_name.items() if config.snapshot_every} == {"oracle": 10}


def test_a_curve_is_each_snapshot_then_the_last_checkpoint(monkeypatch, tmp_path):
    run_dir = tmp_path / "oracle" / "seed-0"
    for name in ("iteration-000004", "iteration-000002", "iteration-000006", "last"):
        (run_dir / name).mkdir(parents=True)
    evaluated = []

    def scores(work, name, seed, checkpoint):
        evaluated.append(Path(checkpoint).name)
        return run(50.0, 40.0, int(Path(checkpoint).name[-1]) * 10.0)

    monkeypatch.setattr(mission, "protocol_ii", scores)
    monkeypatch.setattr(mission, "read_segmenter_metadata", lambda uri: {"iteration": 6})
    curve = training_curve(tmp_path, "Oracle", 0, str(run_dir / "last"), run(70.0, 60.0, 64.6))
    # the snapshot at the end is the last checkpoint, whose figures the table already has
    assert [(p["iteration"], p["harmonic"]) for p in curve] == [(2, 20.0), (4, 40.0), (6, 64.6)]
    assert evaluated == ["iteration-000002", "iteration-000004", "iteration-000006"]


def curve(*harmonics: float) -> list[dict]:
    return [{"iteration": 100 * (k + 1), "seen": 0.0, "unseen": 0.0, "harmonic": h} for k, h in enumerate(harmonics)]


def test_the_schedule_has_plateaued_when_the_last_quarter_moves_under_a_point(tmp_path):
    # 8 points, the last quarter from iteration 600: 600, 700 and 800
    flat = curve_summary({0: curve(10, 30, 40, 45, 48, 49.5, 50.0, 50.2), 1: curve(12, 28, 42, 47, 50, 50.5, 50.4, 50.8)})
    assert [p["iteration"] for p in flat["points"]] == [100 * k for k in range(1, 9)]
    assert flat["points"][-1]["harmonic"] == pytest.approx(50.5)
    assert flat["points"][-1]["harmonic_sd"] == pytest.approx(statistics.stdev([50.2, 50.8]))
    assert flat["last_quarter_change"] == pytest.approx(50.5 - 50.0) and flat["plateaued"]
    assert "moved 0.5 points (criterion: < 1): plateaued" in curve_text(flat)
    assert f"The seeds' own spread at the end: sd {statistics.stdev([50.2, 50.8]):.1f}." in curve_text(flat)
    rising = curve_summary({0: curve(10, 20, 30, 40, 45, 48, 50, 52)})
    assert rising["last_quarter_change"] == pytest.approx(4.0) and not rising["plateaued"]
    assert rising["points"][0]["harmonic_sd"] is None  # one seed: no spread
    assert "not plateaued, still rising (+4.0 points" in curve_text(rising) and "| 800 | 52.0 |" in curve_text(rising)
    # past its peak: moving more than the criterion allows, but downwards
    wavering = curve_summary({0: curve(10, 20, 30, 40, 45, 53.1, 52.0, 52.1)})
    assert wavering["last_quarter_change"] == pytest.approx(1.1) and wavering["last_quarter_net"] == pytest.approx(-1.0)
    assert "not plateaued by the criterion, but not rising either (-1.0 points" in curve_text(wavering)
    # a seed resumed from a run without snapshots has only its end: the curve keeps the common points
    partial = curve_summary({0: curve(10, 20, 30, 40), 1: [{"iteration": 400, "harmonic": 44.0}]})
    assert [p["iteration"] for p in partial["points"]] == [400] and partial["points"][0]["harmonic"] == 42.0
    plot_curve(flat, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
