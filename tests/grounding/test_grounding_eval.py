"""Protocol-I evaluation: the accumulator on hand-made masks, the table, and the job end to end.

VOC unseen classes: split 1 tvmonitor, car, dog, sofa, train; split 2 horse, motorbike,
person, pottedplant, sheep; split 3 bus, cat, chair, cow, diningtable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.build.pipeline import prepare_build, run_build
from factory.build.recipe import load_recipe
from factory.core.storage import open_location
from factory.core.vocab import VOC
from factory.dataset.codec import decode_png
from factory.diffusion.daam import daam_masks
from factory.diffusion.features import from_fp16_bytes
from grounding.checkpoint import save_grounding_checkpoint
from grounding.data import Featurizer, TextConfig, TripletSource
from grounding.evaluate import (
    GROUPS,
    EvalStage,
    GroundingEvalOptions,
    ProtocolIAccumulator,
    format_table,
    group_of,
    prepare_evaluation,
    select_test_rows,
)
from grounding.model import GroundingModule
from grounding.train import ModelSection, grounding_model_config
from jobs import eval_grounding

REPO = Path(__file__).resolve().parents[2]


def masks(*rows_on: range, size: int = 4) -> np.ndarray:
    """(O, size, size) bool: object o has the rows rows_on[o] fully on."""
    out = np.zeros((len(rows_on), size, size), bool)
    for o, rows in enumerate(rows_on):
        out[o, rows] = True
    return out


def test_groups_for_voc_split_1():
    unseen = frozenset(VOC.unseen(1))
    assert unseen == {"tvmonitor", "car", "dog", "sofa", "train"}
    assert group_of(["cat"], unseen) == "one/seen"
    assert group_of(["dog"], unseen) == "one/unseen"
    assert group_of(["cat", "horse"], unseen) == "two/seen"
    assert group_of(["car", "person"], unseen) == "two/seen+unseen"
    assert group_of(["person", "car"], unseen) == "two/seen+unseen"
    assert group_of(["dog", "sofa"], unseen) == "two/unseen"
    assert group_of(["cat", "dog", "horse"], unseen) is None


def test_each_sample_is_filed_per_split():
    acc = ProtocolIAccumulator(VOC)
    full = masks(range(4))
    acc.add(["dog"], full, full, [True])  # unseen in split 1, seen in splits 2 and 3
    acc.add(["car", "person"], masks(range(4), range(4)), masks(range(4), range(4)), [True, True])
    filed = {(k, g) for (k, g), n in acc.samples.items() if n}
    # car: unseen in split 1; person: unseen in split 2; both seen in split 3.
    assert filed == {(1, "one/unseen"), (2, "one/seen"), (3, "one/seen"),
                     (1, "two/seen+unseen"), (2, "two/seen+unseen"), (3, "two/seen")}
    assert acc.pixels[1, "two/seen+unseen"] == {"car": [16, 16], "person": [16, 16]}


def test_iou_pools_pixels_over_samples_and_miou_averages_classes():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    # cat, sample 1: truth rows 0-1 (8 px), prediction row 0 (4 px): I = 4, U = 8.
    acc.add(["cat"], masks(range(1)), masks(range(2)), [True])
    # cat, sample 2: truth row 3 (4 px), prediction rows 2-3 (8 px): I = 4, U = 8.
    acc.add(["cat"], masks(range(2, 4)), masks(range(3, 4)), [True])
    # cat: I = 8, U = 16 -> 50 %.
    # horse: truth all 16 px, prediction rows 0-2 (12 px): I = 12, U = 16 -> 75 %.
    acc.add(["horse"], masks(range(3)), masks(range(4)), [True])
    # bird, two samples of very different size: pooled 1 / (1 + 8) = 11.11 %, not the mean
    # of per-sample IoUs (100 % and 0 %, i.e. 50 %).
    one_pixel = np.zeros((1, 4, 4), bool)
    one_pixel[0, 0, 0] = True
    acc.add(["bird"], one_pixel, one_pixel, [True])  # I = 1, U = 1
    acc.add(["bird"], masks(range(2, 3)), masks(range(3, 4)), [True])  # disjoint rows: I = 0, U = 8
    group = acc.result()["splits"]["1"]["one/seen"]
    assert group["iou"] == pytest.approx({"bird": 100 / 9, "cat": 50.0, "horse": 75.0})
    assert list(group["iou"]) == ["bird", "cat", "horse"]  # vocabulary order
    assert group["miou"] == pytest.approx((100 / 9 + 50 + 75) / 3)  # 45.37
    assert group["samples"] == 5


def test_seen_plus_unseen_pair_counts_both_classes_and_invalid_slots_not_at_all():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    # cat (seen) + dog (unseen) in split 1.
    # cat: truth rows 0-1 (8 px), prediction rows 0-1: I = 8, U = 8 -> 100 %.
    # dog: truth rows 2-3 (8 px), prediction row 3 (4 px): I = 4, U = 8 -> 50 %.
    acc.add(["cat", "dog"], masks(range(2), range(3, 4)), masks(range(2), range(2, 4)), [True, True])
    # A second pair whose dog slot is not valid (the oracle missed it): only cat counts.
    # cat: truth row 0 (4 px), prediction rows 0-1 (8 px): I = 4, U = 8. Pooled: 12 / 16 = 75 %.
    acc.add(["cat", "dog"], masks(range(2), range(4)), masks(range(1), range(0)), [True, False])
    group = acc.result()["splits"]["1"]["two/seen+unseen"]
    assert group["iou"] == pytest.approx({"cat": 75.0, "dog": 50.0})
    assert group["miou"] == pytest.approx(62.5)
    assert group["samples"] == 2
    # A sample without any valid slot counts nowhere.
    acc.add(["cat", "dog"], masks(range(4), range(4)), masks(range(4), range(4)), [False, False])
    assert acc.result()["splits"]["1"]["two/seen+unseen"]["samples"] == 2


def test_classes_with_empty_union_are_skipped():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    empty = masks(range(0))
    acc.add(["sheep"], empty, empty, [True])  # nothing predicted, nothing there: U = 0
    assert acc.result()["splits"]["1"]["one/seen"] == {"miou": None, "iou": {}, "samples": 1}
    acc.add(["cow"], masks(range(2)), masks(range(4)), [True])  # I = 8, U = 16 -> 50 %
    assert acc.result()["splits"]["1"]["one/seen"]["iou"] == {"cow": 50.0}
    assert acc.result()["splits"]["1"]["one/seen"]["miou"] == 50.0  # sheep is not a 0 in the mean


def test_more_than_two_classes_are_ignored():
    acc = ProtocolIAccumulator(VOC)
    three = masks(range(4), range(4), range(4))
    acc.add(["cat", "dog", "horse"], three, three, [True, True, True])
    assert all(n == 0 for n in acc.samples.values())
    assert all(not table for table in acc.pixels.values())


def test_mean_over_splits_needs_every_split():
    acc = ProtocolIAccumulator(VOC)
    # cat: seen in splits 1 and 2, unseen in 3. I = 8, U = 16 -> 50 %.
    acc.add(["cat"], masks(range(2)), masks(range(4)), [True])
    assert acc.result()["mean"]["one/seen"] is None  # split 3 has no one/seen sample
    # dog: unseen in split 1, seen in 2 and 3. I = 4, U = 16 -> 25 %.
    acc.add(["dog"], masks(range(1)), masks(range(4)), [True])
    result = acc.result()
    # one/seen: split 1 cat 50; split 2 (cat 50 + dog 25) / 2 = 37.5; split 3 dog 25.
    assert [result["splits"][k]["one/seen"]["miou"] for k in "123"] == [50.0, 37.5, 25.0]
    assert result["mean"]["one/seen"] == pytest.approx((50 + 37.5 + 25) / 3)  # 37.5
    # one/unseen: split 1 dog 25, split 2 none (cat and dog are seen there).
    assert result["mean"]["one/unseen"] is None


def random_samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = VOC.names
    for _ in range(n):
        k = int(rng.integers(1, 4))  # 1, 2, or 3 objects (3: ignored)
        classes = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
        yield (classes, rng.random((k, 8, 8)) > 0.5, rng.random((k, 8, 8)) > 0.6, rng.random(k) > 0.2)


def test_merge_equals_one_accumulator():
    single, first, second = (ProtocolIAccumulator(VOC) for _ in range(3))
    for i, sample in enumerate(random_samples(60)):
        single.add(*sample)
        (first if i % 3 else second).add(*sample)
    merged = ProtocolIAccumulator.from_dict(json.loads(json.dumps(first.to_dict())))  # as from a Ray worker
    merged.merge(second)
    assert merged.to_dict() == single.to_dict()
    assert merged.result() == single.result()
    with pytest.raises(ValueError, match="cannot merge"):
        single.merge(ProtocolIAccumulator(VOC, splits=(1,)))


def test_unknown_split_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown split 4"):
        ProtocolIAccumulator(VOC, splits=(1, 4))
    with pytest.raises(ValueError, match="2 classes"):
        ProtocolIAccumulator(VOC).add(["cat", "dog"], masks(range(4)), masks(range(4)), [True])


def test_table_text():
    module = ProtocolIAccumulator(VOC)
    # cat: one/seen in splits 1, 2 (I = 12, U = 16 -> 75 %) and one/unseen in split 3.
    module.add(["cat"], masks(range(3)), masks(range(4)), [True])
    # dog: one/unseen in split 1 and one/seen in splits 2 and 3 (I = 4, U = 16 -> 25 %).
    module.add(["dog"], masks(range(1)), masks(range(4)), [True])
    daam = ProtocolIAccumulator(VOC)  # nothing at all: every cell "-"
    table = format_table({"grounding module": module.result(), "DAAM": daam.result()})
    lines = table.splitlines()
    assert lines[0].split() == ["Method", "Split", "One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen",
                                "Two/Unseen"]
    assert set(lines[1]) == {"-"}
    cells = [line.split() for line in lines[2:]]
    assert cells[0] == ["grounding", "module", "1", "75.00", "25.00", "-", "-", "-"]
    assert cells[1] == ["2", "50.00", "-", "-", "-", "-"]  # (75 + 25) / 2
    assert cells[2] == ["3", "25.00", "75.00", "-", "-", "-"]
    assert cells[3] == ["mean", "50.00", "-", "-", "-", "-"]  # (75 + 50 + 25) / 3; one/unseen lacks split 2
    assert cells[4] == ["DAAM", "1", "-", "-", "-", "-", "-"]
    assert len(cells) == 8
    # Numbers are right-aligned under their column titles.
    assert lines[2].index("75.00") + len("75.00") == lines[0].index("One/Seen") + len("One/Seen")


# ---------------------------------------------------------------- end to end

# The tiny recipe's random detector reports almost nothing but COCO "cow", so the set is
# built around cow to give the oracle masks something to find: cow is seen in splits 1
# and 2 and unseen in split 3; dog, horse and bus are each unseen in one split.
TEST_SET = {"classes": ["cow", "dog", "horse", "bus"], "per_class": 1, "per_pair": 1, "pairs": "all",
            "num_samples": None, "generator.steps": 3, "capture.features": "latent", "capture.step": 2,
            "capture.attention": True, "quality.model": "tiny", "writer.preview_samples": 0}


@pytest.fixture(scope="module")
def test_set(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pascal-sim") / "test"
    run_build(prepare_build(load_recipe("tiny", {**TEST_SET, "out": str(out)})))
    return out


@pytest.fixture(scope="module")
def checkpoint(test_set, tmp_path_factory) -> Path:
    """An untrained tiny module in the training code's checkpoint format, trained classes: split 1's seen."""
    source = TripletSource.open(str(test_set))
    featurizer = Featurizer(source, TextConfig())
    config = grounding_model_config(ModelSection(preset="tiny"), featurizer.feature_channels(), featurizer.text_dim,
                                    source.image_size[0])
    out = tmp_path_factory.mktemp("grounding") / "best"
    save_grounding_checkpoint(str(out), GroundingModule(config).eval(), None, {
        "epoch": 0, "text": TextConfig().model_dump(), "generator": source.generator,
        "capture": source.manifest["capture"], "vocabulary": source.manifest["vocabulary"],
        "classes": list(VOC.seen(1))})
    return out


def daam_by_hand(test_set: Path, threshold: float) -> dict:
    """DAAM's result straight from the Parquet rows: heat maps upsampled and thresholded, scored on
    the classes the oracle found with a non-empty mask."""
    manifest = json.loads((test_set / "manifest.json").read_text())
    shape = manifest["capture"]["shapes"]["daam"]
    acc = ProtocolIAccumulator(VOC)
    for entry in manifest["files"]:
        for row in pq.read_table(test_set / entry["path"]).to_pylist():
            truth = np.stack([decode_png(m["bytes"]).astype(bool) for m in row["masks"]])
            maps = np.stack([from_fp16_bytes(m, shape) for m in row["daam"]])
            predicted = daam_masks(maps[None], threshold, size=truth.shape[1:])[0]
            acc.add(row["classes"], predicted, truth, np.array(row["found"]) & truth.any(axis=(1, 2)))
    return acc.result()


@pytest.mark.slow
def test_eval_job_end_to_end(test_set, checkpoint, tmp_path, bucket, capsys):
    common = ["--checkpoint", str(checkpoint), "--data", str(test_set), "--batch-size", "3"]  # 4 batches
    assert eval_grounding.main([*common, "--num-workers", "1", "--out", str(tmp_path / "one.json")]) == 0
    printed = capsys.readouterr().out
    uri = f"s3://{bucket}/evals/two.json"
    assert eval_grounding.main([*common, "--num-workers", "2", "--out", uri]) == 0
    assert f"results written to {uri}" in capsys.readouterr().out

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads(open_location(f"s3://{bucket}/evals").read_bytes("two.json"))
    assert one == two  # deterministic, whatever the worker count
    manifest = json.loads((test_set / "manifest.json").read_text())
    assert one["plan_digest"] == manifest["plan"]["digest"] and one["samples"] == manifest["counts"]["written"] == 10
    assert one["checkpoint"] == str(checkpoint) and one["data"] == str(test_set)
    assert one["thresholds"] == {"grounding module": 0.5, "DAAM": 0.4}
    assert set(one["results"]) == {"grounding module", "DAAM"}
    numbers = 0
    for result in one["results"].values():
        assert set(result["splits"]) == {"1", "2", "3"} and set(result["mean"]) == set(GROUPS)
        for groups in result["splits"].values():
            for group in groups.values():
                values = [v for v in (group["miou"], *group["iou"].values()) if v is not None]
                assert all(0.0 <= v <= 100.0 for v in values)
                numbers += bool(values)
    assert numbers > 0  # the oracle found something to score
    assert one["results"]["DAAM"] == daam_by_hand(test_set, 0.4)
    # The untrained module saw split 1's seen classes: splits 2 and 3 are not zero-shot for it.
    assert [n.split(":")[0] for n in one["notes"]] == ["split 2", "split 3"]
    assert "grounding module  1" in printed and "DAAM" in printed and "note: split 2" in printed


@pytest.mark.slow
def test_dataset_without_heat_maps_skips_daam(test_set, checkpoint, tmp_path):
    # What a build without --capture.attention records: no "daam" capture shape.
    copy = tmp_path / "no-daam"
    shutil.copytree(test_set, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["capture"]["attention"] = False
    del manifest["capture"]["shapes"]["daam"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    plan = prepare_evaluation(GroundingEvalOptions(checkpoint=str(checkpoint), data=str(copy), splits=[1]))
    assert plan.daam_threshold is None and "DAAM" not in plan.report["thresholds"]
    assert plan.report["notes"] == [f"{copy} has no DAAM heat maps (built without --capture.attention true): "
                                    f"DAAM skipped"]
    # The actor, in-process (a Ray run is the test above): module counts only.
    stage = EvalStage(plan.checkpoint, plan.data, plan.splits, plan.daam_threshold)
    out = stage({"positions": np.array([[0, 1, 2], [3, 4, 5]])})
    assert list(out["daam"]) == ["", ""]
    counts = ProtocolIAccumulator.from_dict(json.loads(out["module"][0]))
    assert counts.splits == (1,) and counts.vocabulary is VOC


@pytest.mark.slow
def test_eval_job_input_errors(test_set, checkpoint, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert eval_grounding.main(list(argv)) == 2
        message = capsys.readouterr().err
        assert message.startswith("eval_grounding: error: ") and message.count("\n") == 1
        return message

    good = ["--checkpoint", str(checkpoint), "--data", str(test_set)]
    assert "no readable checkpoint" in error("--checkpoint", str(tmp_path / "missing"), "--data", str(test_set))
    no_capture = tmp_path / "plain"
    no_capture.mkdir()
    manifest = json.loads((test_set / "manifest.json").read_text())
    (no_capture / "manifest.json").write_text(json.dumps({**manifest, "capture": None}))
    assert "no U-Net capture" in error("--checkpoint", str(checkpoint), "--data", str(no_capture))
    assert "no dataset" in error("--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere"))
    assert "unknown split 4" in error(*good, "--splits", "1", "4")
    assert "distinct" in error(*good, "--splits", "1", "1")
    assert "--daam-threshold: Input should be less than or equal to 1" in error(*good, "--daam-threshold", "2")
    assert "--keep-quality: Input should be less than or equal to 1" in error(*good, "--keep-quality", "1.5")
    assert "must name a file" in error(*good, "--out", "s3://bucket")


def test_automatic_test_set_filter(test_set):
    """Detector agreement and the quality score replace the papers' manual check of test sets."""
    source = TripletSource.open(str(test_set))
    table = source.read(["found", "scores", "quality"])
    n = table.num_rows
    assert select_test_rows(source, None, None) == list(range(n))
    agree = [i for i, (found, scores) in enumerate(zip(table.column("found").to_pylist(),
                                                        table.column("scores").to_pylist()))
             if all(found) and min(scores) >= 0.01]
    assert select_test_rows(source, 0.01, None) == agree
    quality = table.column("quality").to_numpy()
    best_half = select_test_rows(source, None, 0.5)
    assert len(best_half) == -(-n // 2)
    assert min(quality[best_half]) >= max(np.delete(quality, best_half))  # the best ones, not any
