"""bench/mini_mission.py's Protocol-II summary: every segmenter trained with several seeds, each cell
their mean and standard deviation, both background conventions named in the table; and the oracle
reference's training curve, which says whether the schedule has plateaued."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import bench.mini_mission as mission
from bench.mini_mission import (
    curve_summary, curve_text, over_seeds, plot_curve, protocol_ii, protocol_ii_table, training_curve)
from factory.core.vocab import SHAPES
from factory.dataset.codec import encode_label
from factory.pipeline.plan import plan_fields
from factory.pipeline.recipe import load_recipe
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
    evaluated = []
    monkeypatch.setattr(mission, "prepare_protocol_ii", lambda options: options)
    monkeypatch.setattr(mission, "run_protocol_ii",
                        lambda options: evaluated.append(options) or {"results": {"1": {**split, "seen": 70.0}}})
    weights = {"ck": "aa", "retrained": "bb"}
    monkeypatch.setattr(mission, "read_segmenter_metadata",
                        lambda uri: {"files": {"model": {"sha256": weights[uri]}}})
    expected = {IGNORED: {"seen": 70.0, "unseen": 50.0, "harmonic": 58.3},
                COUNTED: {"seen": 69.0, "unseen": 49.0, "harmonic": 57.3}}
    assert protocol_ii(tmp_path, "Model-A", 0, "ck") == expected
    # a rerun scores the same weights once; other weights (a checkpoint trained again) are scored again
    assert protocol_ii(tmp_path, "Model-A", 0, "ck") == expected and len(evaluated) == 1
    assert protocol_ii(tmp_path, "Model-A", 0, "retrained") == expected and len(evaluated) == 2
    assert evaluated[0].out == str(tmp_path / "protocol-ii" / "Model-A-seed-0.json")  # its panels beside it


def test_every_segmenter_starts_from_the_pretrained_backbone_on_one_schedule(monkeypatch, tmp_path):
    configs = {}
    monkeypatch.setattr(mission, "prepare_segmenter", lambda config: configs.setdefault(config.out, config))
    monkeypatch.setattr(mission, "run_segmenter", lambda config: type("Summary", (), {"last": config.out + "/last"}))
    for name in mission.TRAINED:
        mission.train_segmenter(tmp_path, name, 100, 2, init="c/last" if name == "Model-D" else None)
    by_name = {Path(out).parent.name: config for out, config in configs.items()}
    assert sorted(by_name) == sorted([name.lower() for name in mission.MODELS]
                                     + ["model-a-oracle-labels", "model-b-oracle-labels"])
    for name, config in by_name.items():
        assert (config.iterations, config.seed, config.backbone_lr_factor, config.split) == (100, 2, 0.1, 1), name
        assert config.model.backbone_weights == (None if name == "model-d" else mission.BACKBONE), name
    assert by_name["real"].data is None and by_name["real"].real.split == "train"
    assert by_name["real"].setting == by_name["oracle"].setting == "supervised"
    # the ablation: Model-A's and Model-B's images with the oracle's labels, which are no zero-shot labels
    assert by_name["model-b-oracle-labels"].data == str(tmp_path / "oracle-two")
    assert by_name["model-a-oracle-labels"].setting == "supervised"
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


def table(harmonics: dict[str, tuple[float, float]], spread: float) -> dict:
    """A report's Protocol-II entries: each model two seeds, seen = unseen = harmonic = its figure +- `spread`;
    `harmonics` overrides a model's (harmonic, unseen) pair (seen then follows from the harmonic mean)."""
    results = {}
    for name in mission.TRAINED:
        harmonic, unseen = harmonics.get(name, (50.0, 50.0))
        seen = harmonic * unseen / (2 * unseen - harmonic)  # 2SU/(S+U) = H
        results[name] = over_seeds({s: run(seen + d, unseen + d, harmonic + d) for s, d in ((0, -spread), (1, spread))})
    return results


def report(results: dict) -> dict:
    return {"protocol_ii": results, "seeds": 2, "segmenter_iterations": 1500,
            "sets": {"synthetic-one": {"written": 1200, "unseen_share": 25.0,
                                       "agreement_with_oracle": {"seen": 94.6, "unseen": 95.2, "harmonic": 94.9}},
                     "synthetic-two": {"written": 960, "unseen_share": 19.5,
                                       "agreement_with_oracle": {"seen": 88.9, "unseen": 79.5, "harmonic": 83.9}}},
            "oracle_curve": curve_summary({0: curve(10, 30, 40, 45, 48, 49.5, 50.0, 50.2)})}


def test_the_findings_say_which_of_the_papers_orders_hold_by_the_spread():
    paper_like = table({"Model-A": (40.0, 38.0), "Model-B": (55.0, 52.0), "Model-C": (62.0, 60.0),
                        "Model-D": (70.0, 68.0), "Oracle": (66.0, 64.0)}, spread=1.0)
    text = mission.findings(report(paper_like))
    assert "order A < B < C holds, each gap beyond the two rows' spread" in text
    assert "Model-B - Model-A +15.0, beyond their spread" in text
    assert "Model-D raises the unseen mIoU over Model-C, beyond the spread (Model-D - Model-C +8.0" in text
    assert "Model-C's harmonic 62.0 (target >= 60: met)" in text and "(target >= 0.75: met)" in text
    assert "+4.0 over Model-C (targets: >= 0 and <= 10: met)" in text
    assert "moved 0.7 points over the last quarter of its training (plateaued" in text
    # the miniature as it was measured before: A above C above B, D not raising unseen, the oracle below C
    reversed_ = table({"Model-A": (36.0, 34.0), "Model-B": (9.9, 9.9), "Model-C": (15.3, 14.7),
                       "Model-D": (20.9, 13.5), "Oracle": (13.6, 12.4)}, spread=1.0)
    text = mission.findings(report(reversed_))
    assert "order A < B < C does not hold" in text and "Model-D does not raise the unseen mIoU over Model-C" in text
    assert "target >= 60: missed" in text and "-1.7 over Model-C (targets: >= 0 and <= 10: missed)" in text
    # gaps in the right direction but within the seeds' spread decide nothing
    close = table({"Model-A": (50.0, 50.0), "Model-B": (51.0, 51.0), "Model-C": (52.0, 52.0)}, spread=3.0)
    assert "order A < B < C holds in the means, not beyond the spread" in mission.findings(report(close))


def test_the_ablation_says_whether_the_labels_or_the_images_keep_model_b_below_model_a():
    def verdict(a: float, b: float, a_oracle: float, b_oracle: float) -> str:
        results = table({"Model-A": (a, a), "Model-B": (b, b), "Model-A, oracle labels": (a_oracle, a_oracle),
                         "Model-B, oracle labels": (b_oracle, b_oracle)}, spread=1.0)
        return mission.findings(report(results))

    labels = verdict(45.0, 38.0, 50.0, 56.0)  # the oracle reference, C's images with oracle labels: 50.0
    assert "order A < B < C does not hold (C - B -6.0, beyond their spread)" in labels
    assert "order A < B < C holds in the means, not beyond the spread (C - B +1.0, within" in verdict(
        45.0, 38.0, 40.0, 49.0)
    assert "images labelled by the oracle instead (supervised, not zero-shot): Model-A 50.0 ± 1.4, " \
           "Model-B 56.0 ± 1.4, Model-B - Model-A +6.0, beyond their spread, against -7.0" in labels
    assert "the module's labels on the two-object images, not the images, keep Model-B below" in labels
    images = verdict(45.0, 38.0, 56.0, 50.0)
    assert "labels are not what keeps it below; its images do (960 two-object images against 1200" in images
    assert "does not decide" in verdict(45.0, 38.0, 50.0, 51.0)  # +1.0: within the spread
    assert "B is above A with the module's labels already, and the oracle's widen" in verdict(40.0, 45.0, 40.0, 50.0)
    assert "the module's labels reach 94.6 / 95.2 on Model-A's and 88.9 / 79.5 on Model-B's images" in labels
    assert "unseen classes 19.5% of the class mentions in Model-B's set and 25.0% in Model-A's" in labels
    assert "each class equally often (25%)" in labels


def test_the_ablation_labels_model_a_and_b_images_again_with_the_oracle(monkeypatch, tmp_path):
    built = {}
    monkeypatch.setattr(mission, "build", lambda recipe, out, scale, overrides: built.update(
        recipe=recipe, out=out, scale=scale, **overrides) or {"written": 1})
    mission.oracle_labelled(tmp_path, "two", 0.5)
    # the followed set's plan, scaled as the bench scaled it: the follower checks that they agree
    assert built == {"recipe": "shapes-oracle", "out": tmp_path / "oracle-two", "scale": 0.5, "per_class": 0,
                     "per_pair": 3, "pairs": "all", "follow": str(tmp_path / "synthetic-two")}
    # and the oracle's recipe, so overridden, plans what each followed set planned, or the follower refuses
    for kind in ("one", "two"):
        for scale in (1.0, 0.05):
            mission.oracle_labelled(tmp_path, kind, scale)
            sizes = {k: built[k] for k in ("per_class", "per_pair", "pairs")}
            followed = load_recipe(f"shapes-synthetic-{kind}", {k: sizes[k] for k in ("per_class", "per_pair")})
            assert plan_fields(load_recipe("shapes-oracle", sizes)) == plan_fields(followed), (kind, scale)


def test_table_2_puts_the_papers_figures_beside_each_row_and_says_what_was_not_built():
    lines = mission.table_2(report(table({}, spread=1.0))).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[4:] if line.startswith("| ")}
    assert list(rows) == ["Model-A", "Model-B", "Model-C", "Model-D", "Model-E", "DAAM", "Oracle", "Real"]
    assert rows["Model-C"][2:] == ["50.0 ± 1.4", "50.0 ± 1.4", "50.0 ± 1.4", "69.5 / 63.2 / 66.2"]
    assert rows["Model-E"][2:5] == ["-", "-", "-"] and rows["Model-E"][5] == "83.4 / 74.4 / 78.7"
    assert "not built" in rows["Model-E"][1] and rows["DAAM"][5] == "not in the paper"
    assert "over 2 training seeds" in lines[0] and lines[-1].startswith("Harmonic mIoU: Model-A 50.0 ± 1.4")


def test_publish_writes_the_page_and_rewrites_only_the_readmes_table(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    plot_curve(curve_summary({0: curve(10, 30, 40, 45)}), work / "oracle-curve.png")
    readme = tmp_path / "README.md"
    begin, end = mission.README_BLOCK
    readme.write_text(f"# Title\n\n## Table 2\n\n{begin}\nan older run\n{end}\n\n## After\n")
    page = tmp_path / "docs" / "mission.md"
    page.parent.mkdir()
    the_report = report(table({}, spread=1.0))
    for _ in range(2):  # a second publication replaces the first
        mission.publish(the_report, "# Report\n\n![curve](oracle-curve.png)\n", work, page, readme,
                        "python bench/mini_mission.py --publish docs/mission.md")
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Table 2\n\n" + begin + "\nMeasured on ") and text.endswith(end + "\n\n## After\n")
    assert "an older run" not in text and text.count(begin) == 1 and mission.findings(the_report) in text
    assert "    python bench/mini_mission.py --publish docs/mission.md" in text
    assert page.read_text().endswith("# Report\n\n![curve](images/mission-oracle-curve.png)\n")
    assert (page.parent / "images" / "mission-oracle-curve.png").read_bytes() == (work / "oracle-curve.png").read_bytes()


def test_a_rerun_reports_what_each_stage_cost_the_run_that_finished_it(tmp_path, monkeypatch):
    ticks = iter([0.0, 100.0, 1000.0, 1002.0, 1049.0, 2000.0])
    monkeypatch.setattr(mission.time, "monotonic", lambda: next(ticks))
    record = tmp_path / "seconds.json"
    first = mission.StageClock("mission", record)
    first("sets")  # 100 s, then stopped during the trainings, which it leaves unfinished
    assert first.report() == {"sets": 100.0, "total": 100.0, "this_run": {"sets": 100.0, "total": 100.0}}
    rerun = mission.StageClock("mission", record)
    rerun("sets")  # resumed: 2 s
    rerun("trainings")  # 47 s: the stage finished here
    assert rerun.report() == {"sets": 100.0, "trainings": 47.0, "total": 147.0,
                              "this_run": {"sets": 2.0, "trainings": 47.0, "total": 49.0}}
    assert mission.StageClock("plain").report() == {"total": 0}


class Rows:
    """A dataset's rows as DatasetSource.read gives them (a pyarrow table of the asked columns)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def read(self, columns: list[str]) -> pa.Table:
        return pa.Table.from_pylist([{c: row[c] for c in columns} for row in self.rows])


def test_labels_are_scored_against_the_oracles_on_the_same_images(monkeypatch, tmp_path):
    red, green = SHAPES.lookup("red_disc").index, SHAPES.lookup("green_cross").index  # unseen, seen in split 1
    assert "red_disc" in SHAPES.unseen(1) and "green_cross" in SHAPES.seen(1)

    def label(*cells: tuple[int, int, int]) -> dict:
        image = np.zeros((4, 4), np.uint8)
        for row, column, value in cells:
            image[row, column] = value
        return {"bytes": encode_label(image), "path": None}

    oracle = [{"sample_id": "b", "label": label((0, 0, green), (0, 1, green))},  # rows in another order
              {"sample_id": "a", "label": label((0, 0, red), (0, 1, red), (1, 1, 255))}]
    # "a": red right on one pixel, painted on a background pixel, unsure (255) on the other: that pixel is
    # skipped, as is the oracle's unsure one; "b": green right on both pixels
    module = [{"sample_id": "a", "label": label((0, 0, red), (1, 0, red), (0, 1, 255))},
              {"sample_id": "b", "label": label((0, 0, green), (0, 1, green))}]
    sets = {str(tmp_path / "module"): Rows(module), str(tmp_path / "oracle"): Rows(oracle)}
    monkeypatch.setattr(mission.DatasetSource, "open", lambda uri: sets[uri])
    scores = mission.label_agreement(tmp_path / "module", tmp_path / "oracle")
    # red: 1 pixel right, 1 painted on background; green: 2 of 2; background, counted as a seen class: 26
    # pixels right, 1 taken by red (the two unsure pixels skipped)
    assert scores["unseen"] == pytest.approx(50.0)
    assert scores["seen"] == pytest.approx(statistics.fmean([100.0, 100 * 26 / 27]))
    mentions = [{"classes": ["red_disc", "green_cross"]}, {"classes": ["green_cross"]}, {"classes": ["green_cross"]}]
    sets[str(tmp_path / "two")] = Rows(mentions)
    assert mission.composition(tmp_path / "two") == {"images_per_class": {"green_cross": 3, "red_disc": 1},
                                                     "unseen_share": 25.0}


def test_the_sets_table_shows_what_the_drops_took_and_how_good_the_labels_are():
    counts = {name: 6 for name in SHAPES.names} | {"red_disc": 2}
    sets = {"triplets": {"written": 1560, "planned": 1560, "given_up": 0},
            "synthetic-two": {"written": 960, "planned": 1140, "given_up": 180, "images_per_class": counts,
                              "unseen_share": 19.5, "agreement_with_oracle": {"seen": 89.54, "unseen": 79.46}}}
    lines = mission.sets_table(sets).splitlines()
    assert lines[2:4] == ["| triplets | 1560 / 1560 | - | - |", "| synthetic-two | 960 / 1140 | 19.5% | 89.5 / 79.5 |"]
    # per class: one column per module-labelled set, every class once, the split's unseen classes first
    assert lines[7] == "| Class | synthetic-two |"
    classes = [line.split("|")[1].strip().removesuffix(" (unseen)") for line in lines[9:]]
    assert sorted(classes) == sorted(SHAPES.names)
    assert set(classes[:5]) == set(SHAPES.unseen(1)) and all("(unseen)" in line for line in lines[9:14])
    assert "| red_disc (unseen) | 2 |" in lines and "| green_cross | 6 |" in lines
