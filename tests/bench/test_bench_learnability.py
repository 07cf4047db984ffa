"""The learnability proof (bench/learnability.py): a module trained on the seen classes of the mini
world labels its unseen ones, through Ray Train training and Protocol-I evaluation."""

from __future__ import annotations

import pytest

from bench import learnability
from bench.procedural import SPLIT
from grounding.evaluate import MODULE


def test_unseen_miou_averages_unseen_class_groups_only(monkeypatch):
    monkeypatch.setattr(learnability, "format_table", lambda results: "")  # Protocol-I's table: not tested here
    groups = {"one/seen": 90.0, "two/seen": 70.0, "one/unseen": 60.0, "two/seen+unseen": 10.0, "two/unseen": 40.0}
    split = {**{g: {"miou": v} for g, v in groups.items()}, "presence": {}}  # not a group: skipped
    results = {MODULE: {"splits": {str(SPLIT): split}}}
    report = learnability.Report(train=1, val=1, test=1, epochs=1, best_epoch=1, val_miou=0.0, results=results,
                                 seconds={})
    assert report.seen_miou == 80.0  # (90 + 70) / 2
    assert report.unseen_miou == 50.0  # (60 + 40) / 2: the mixed group's 10 is in neither mean
    assert report.passed is False  # unseen 50 < 52
    lines = report.text().splitlines()
    assert lines[3].endswith("seen mIoU 80.0 (one/seen 90.0, two/seen 70.0)")
    assert lines[4].endswith("unseen mIoU 50.0 (one/unseen 60.0, two/unseen 40.0)")
    assert lines[5].endswith("seen+unseen images: two/seen+unseen 10.0 (a seen and an unseen class per image; "
                             "in neither mean)")


def test_spread_over_seeds(monkeypatch):
    monkeypatch.setattr(learnability, "format_table", lambda results: "")

    def report(seen: float, unseen: float) -> learnability.Report:
        groups = {"one/seen": seen, "two/seen": seen, "one/unseen": unseen, "two/unseen": unseen,
                  "two/seen+unseen": 0.0}
        results = {MODULE: {"splits": {str(SPLIT): {g: {"miou": v} for g, v in groups.items()}}}}
        return learnability.Report(train=1, val=1, test=1, epochs=1, best_epoch=1, val_miou=0.0, results=results,
                                   seconds={})
    lines = learnability.spread([report(90.0, 80.0), report(86.0, 76.0), report(88.0, 48.0)]).splitlines()
    assert lines[0] == "over 3 seeds (seeds, sets and trainings all differ):"
    assert lines[1] == "  seen    mean 88.0  sd 2.0  min 86.0  (mean - 3 sd 82.0; runs 90.0, 86.0, 88.0)"
    assert lines[2] == "  unseen  mean 68.0  sd 17.4  min 48.0  (mean - 3 sd 15.7; runs 80.0, 76.0, 48.0)"
    assert lines[3] == "  2 of 3 runs pass"  # unseen 48 < 52


@pytest.mark.slow
def test_a_module_trained_on_seen_classes_labels_unseen_ones(tmp_path, ray_cluster):
    report = learnability.run(train=384, val=48, test=96, epochs=16, seed=0, work=tmp_path / "run")
    print(report.text())
    assert report.passed, report.text()
