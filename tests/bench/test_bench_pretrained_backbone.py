"""bench/pretrained_backbone.py: each start is one training config that differs from the others only in the
backbone's weights and learning-rate factor, and the report shows every start's spread and the repeat."""

from __future__ import annotations

from pathlib import Path

import bench.pretrained_backbone as bench
from bench.mini_mission import over_seeds
from segmenter.evaluate import BACKGROUND_KEYS

IGNORED, COUNTED = BACKGROUND_KEYS["ignore"], BACKGROUND_KEYS["seen"]


def test_the_starts_differ_in_the_backbone_alone(monkeypatch, tmp_path):
    configs = {}
    monkeypatch.setattr(bench, "prepare_training", lambda config: configs.setdefault(Path(config.out).parent.name,
                                                                                      config))
    monkeypatch.setattr(bench, "run_training", lambda config: type("Summary", (), {"last": config.out + "/last"}))
    for start in bench.STARTS:
        assert bench.train(tmp_path, start, 1, 40) == str(tmp_path / start / "seed-1" / "last")
    assert configs["random"].model.backbone_weights is None and configs["random"].backbone_lr_factor == 1.0
    assert configs["pretrained"].model.backbone_weights == bench.BACKBONE == "models/shapes-backbone"
    assert (configs["pretrained"].backbone_lr_factor, configs["pretrained-full-lr"].backbone_lr_factor) == (0.1, 1.0)
    varied = {"out", "model", "backbone_lr_factor"}
    dumps = [{k: v for k, v in c.model_dump().items() if k not in varied} for c in configs.values()]
    assert dumps[0] == dumps[1] == dumps[2]  # the same images, schedule, batch, crops, rate and seed
    assert configs["random"].setting == "supervised" and configs["random"].data is None
    assert configs["random"].real.split == "train" and configs["random"].iterations == 40


def test_the_report_shows_each_start_and_the_repeat():
    def run(harmonic):
        figures = {"seen": harmonic + 1, "unseen": harmonic - 1, "harmonic": harmonic}
        return {IGNORED: figures, COUNTED: figures}

    results = {start: over_seeds({0: run(10.0 * k + 5), 1: run(10.0 * k + 7)}) for k, start in
               enumerate(bench.STARTS)}
    text = bench.markdown({"iterations": 40, "seeds": 2, "results": results, "repeat": run(9.0), "seconds": {}})
    assert "| random | 1.0 | 7.0 ± 1.4 / 5.0 ± 1.4 / 6.0 ± 1.4 |" in text
    assert "| pretrained | 0.1 | 17.0 ± 1.4 / 15.0 ± 1.4 / 16.0 ± 1.4 |" in text
    assert "16.0 / 14.0 / 15.0 the first time, 10.0 / 8.0 / 9.0 the second" in text
