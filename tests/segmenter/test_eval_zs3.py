"""Protocol-II (ZS3) evaluation job end to end: tiny random segmenters on tiny VOC and COCO folders;
how results say the model was trained, unseen names added to a text head at test time, and the
scores under both background conventions."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from factory.core.storage import open_location
from factory.core.vocab import COCO, VOC, Vocabulary
from factory.dataset.real import real_dataset
from jobs import eval_zs3
from segmenter.checkpoint import load_segmenter_checkpoint, save_segmenter_checkpoint
from segmenter.config import SegmenterModelConfig, ZS3EvalOptions
from segmenter.evaluate import BACKGROUND_KEYS, format_table, predict, prepare_evaluation, score, short_side_size
from segmenter.metrics import ConfusionMatrix
from segmenter.model import Segmenter
from segmenter.text import TEMPLATE, encode_class_names

REPO = Path(__file__).resolve().parents[2]

SIZE = 48  # inference short side: tiny images, fast runs


def save_tiny_checkpoint(uri: Path, vocabulary: Vocabulary, setting: str, split: int | None,
                         head: str = "closed") -> Path:
    """A random tiny segmenter; a text head knows the seen class names when inductive, else all."""
    torch.manual_seed(0)
    text = {"head": "text", "text_encoder": "tiny", "text_template": TEMPLATE, "text_dim": 32} if head == "text" else {}
    model = Segmenter(SegmenterModelConfig.tiny(len(vocabulary) + 1, **text)).eval()
    names = vocabulary.seen(split) if setting == "inductive" else vocabulary.names
    if head == "text":
        model.add_class_embeddings([vocabulary.lookup(n).index for n in names], encode_class_names("tiny", vocabulary, names))
    save_segmenter_checkpoint(str(uri), model, None, {
        "iteration": 0, "vocabulary": vocabulary.definition(), "setting": setting, "split": split,
        "seen": list(vocabulary.seen(split)), "unseen": list(vocabulary.unseen(split)),
        "text_classes": list(names) if head == "text" else None})
    return uri


@pytest.fixture(scope="module")
def voc_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("segmenter") / "voc", VOC, "transductive", 1)


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("segmenter") / "coco", COCO, "inductive", 2, head="text")


def confusion_in_process(checkpoint: Path, format: str, root: Path) -> np.ndarray:
    """The whole dataset's matrix, predicted and counted in one loop (a text head given the
    names it lacks first)."""
    model, metadata = load_segmenter_checkpoint(str(checkpoint))
    if model.config.head == "text":
        vocabulary = real_dataset(format, root).vocabulary
        missing = [name for name in vocabulary.names if name not in metadata["text_classes"]]
        model.add_class_embeddings([vocabulary.lookup(n).index for n in missing],
                                   encode_class_names("tiny", vocabulary, missing))
    matrix = ConfusionMatrix(model.config.num_labels)
    dataset = real_dataset(format, root)
    for i in range(len(dataset)):
        sample = dataset[i]
        matrix.update(predict(model, sample.image, SIZE, torch.device("cpu")), sample.label)
    return matrix.counts


def without_run(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "run"}  # timings and worker count


@pytest.mark.slow
def test_voc_one_worker_equals_two_and_one_process(ray_cluster, voc_eval_root, voc_checkpoint, tmp_path, bucket, capsys):
    common = ["--checkpoint", str(voc_checkpoint), "--format", "voc", "--root", str(voc_eval_root),
              "--size", str(SIZE), "--batch-size", "2", "--splits", "1", "2", "3", "--qualitative", "3"]
    # Same file name in both places: the panels are named after it.
    assert eval_zs3.main([*common, "--num-workers", "1", "--out", str(tmp_path / "results.json")]) == 0
    printed = capsys.readouterr().out
    uri = f"s3://{bucket}/evals/results.json"
    assert eval_zs3.main([*common, "--num-workers", "2", "--out", uri]) == 0
    assert f"results written to {uri}, 3 panels next to it" in capsys.readouterr().out

    one = json.loads((tmp_path / "results.json").read_text())
    evals = open_location(f"s3://{bucket}/evals")
    two = json.loads(evals.read_bytes("results.json"))
    assert without_run(one) == without_run(two)
    assert (one["run"]["workers"], two["run"]["workers"]) == (1, 2)
    assert one["run"]["images_per_second"] > 0

    # The distributed sum equals one process's count of the same predictions.
    counts = np.array(one["confusion"])
    assert np.array_equal(counts, confusion_in_process(voc_checkpoint, "voc", voc_eval_root))
    labels = [np.array(Image.open(p)) for p in sorted((voc_eval_root / "SegmentationClass").glob("*.png"))]
    assert counts.sum() == sum(int((label != 255).sum()) for label in labels)

    assert one["checkpoint"] == str(voc_checkpoint) and one["setting"] == "transductive" and one["zero_shot"]
    assert one["head"] == "closed" and one["added_at_test"] == []
    assert one["trained_split"] == 1 and one["background"] == "ignore"
    assert set(one["background_conventions"]) == {"background_ignored", "background_counted"}
    assert one["dataset"] == {"format": "voc", "root": str(voc_eval_root), "split_set": "val", "images": 5}
    assert one["inference"] == {"mode": "resize", "short_side": SIZE, "label_resize": "nearest"}
    assert set(one["results"]) == {"1", "2", "3"}
    for k, result in one["results"].items():
        assert result["unseen_classes"] == list(VOC.unseen(int(k)))
        values = [v for v in (result["seen"], result["unseen"], *result["per_class"].values()) if v is not None]
        assert all(0.0 <= v <= 100.0 for v in values)
        assert "background" not in result["per_class"]  # ignored by default
        # The top-level scores are the default convention's; both conventions are kept by name.
        ignored, counted = result["background_ignored"], result["background_counted"]
        assert {m: result[m] for m in ("seen", "unseen", "harmonic", "per_class")} == ignored
        assert counted["per_class"]["background"] is not None and "background" not in ignored["per_class"]
    assert [n.split(":")[0] for n in one["notes"]] == ["split 2", "split 3"]

    # Panels: image | ground truth | prediction, spread over the dataset (first, middle, last).
    assert one["qualitative"] == ["results-2007_000000.png", "results-2007_000002.png", "results-2007_000004.png"]
    for name in one["qualitative"]:
        assert Image.open(tmp_path / name).mode == "RGB"
        assert Image.open(io.BytesIO(evals.read_bytes(name))).mode == "RGB"
    first = np.array(Image.open(tmp_path / one["qualitative"][0]))
    assert first.shape == (40, 3 * 56 + 8, 3)
    truth = np.array(Image.open(voc_eval_root / "SegmentationClass" / "2007_000000.png").convert("RGB"))
    assert np.array_equal(first[:, 60:116], truth)  # VOC colours

    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Split"))
    assert lines[header - 1] == "mIoU, transductive zero-shot"
    assert lines[header].split() == ["Split", "Background", "Seen", "Unseen", "Harmonic"]
    assert [line.split()[0] for line in lines[header + 2:header + 8]] == ["1", "1", "2", "2", "3", "3"]
    assert "images/s" in printed and "note: split 2" in printed


@pytest.mark.slow
def test_coco_inductive_background_seen(ray_cluster, coco_eval_root, coco_checkpoint, tmp_path, capsys):
    out = tmp_path / "coco.json"
    assert eval_zs3.main(["--checkpoint", str(coco_checkpoint), "--format", "coco", "--root", str(coco_eval_root),
                          "--size", str(SIZE), "--background", "seen", "--num-workers", "2",
                          "--out", str(out), "--qualitative", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["setting"] == "inductive" and report["splits"] == [2]  # the checkpoint's split
    assert report["head"] == "text" and report["added_at_test"] == list(COCO.unseen(2))
    assert report["dataset"]["split_set"] == "val2017" and report["dataset"]["images"] == 3
    assert report["qualitative"] == [] and report["notes"] == []
    counts = np.array(report["confusion"])
    assert counts.shape == (80, 80)
    assert np.array_equal(counts, confusion_in_process(coco_checkpoint, "coco", coco_eval_root))
    # The mouse's pixels (drawn over the larger person box) are the only ignored ones.
    dataset = real_dataset("coco", coco_eval_root)
    labels = [dataset[i].label for i in range(len(dataset))]
    assert counts.sum() == sum(int((label != 255).sum()) for label in labels) < 3 * 44 * 52

    per_class = report["results"]["2"]["per_class"]
    assert per_class == report["results"]["2"]["background_counted"]["per_class"]  # --background seen
    assert list(per_class)[0] == "background" and len(per_class) == 80 and "mouse" not in per_class
    # Classes neither in the truth nor predicted have no IoU.
    present = np.flatnonzero(counts.sum(0) + counts.sum(1))
    assert [name for name, v in per_class.items() if v is not None] == [
        "background" if i == 0 else COCO.by_index(i).name for i in present]
    printed = capsys.readouterr().out
    assert "note:" not in printed and f"classes named at test time: {', '.join(COCO.unseen(2))}" in printed


def test_short_side_resize():
    assert short_side_size(375, 500, 512) == (512, 683)
    assert short_side_size(640, 480, 512) == (683, 512)
    assert short_side_size(512, 512, 512) == (512, 512)


def test_table_layout():
    results = {"1": {"background_ignored": {"seen": 83.4, "unseen": 74.4, "harmonic": 78.64},
                     "background_counted": {"seen": 80.0, "unseen": 60.0, "harmonic": 68.57}},
               "2": {"background_ignored": {"seen": 50.0, "unseen": None, "harmonic": None},
                     "background_counted": {"seen": 55.0, "unseen": None, "harmonic": None}}}
    caption, *lines = format_table(results, "inductive").splitlines()
    assert caption == "mIoU, inductive zero-shot"
    assert lines[0].split() == ["Split", "Background", "Seen", "Unseen", "Harmonic"] and set(lines[1]) == {"-"}
    # Every row names its background convention.
    assert lines[2].split() == ["1", "ignored", "(ZegFormer)", "83.40", "74.40", "78.64"]
    assert lines[3].split() == ["1", "a", "seen", "class", "(ZS3Net)", "80.00", "60.00", "68.57"]
    assert lines[4].split() == ["2", "ignored", "(ZegFormer)", "50.00", "-", "-"]
    assert lines[5].split() == ["2", "a", "seen", "class", "(ZS3Net)", "55.00", "-", "-"]
    assert lines[2].index("78.64") + 5 == len(lines[0])  # right-aligned under "Harmonic"
    supervised = format_table(results, "supervised").splitlines()
    assert supervised[0] == "mIoU, supervised (oracle upper bound), not zero-shot" and supervised[1:] == lines


def painted_voc_confusion() -> ConfusionMatrix:
    """6 background, 2 aeroplane (seen in split 1) and 2 car (unseen) pixels, every class found,
    and 3 of the background pixels painted as car."""
    car, aeroplane = VOC.lookup("car").index, VOC.lookup("aeroplane").index
    label = np.array([[0, 0, 0, 0, 0, 0, aeroplane, aeroplane, car, car]], np.uint8)
    prediction = label.copy()
    prediction[0, :3] = car
    return ConfusionMatrix(len(VOC) + 1).update(prediction, label)


@pytest.mark.parametrize("background", ["ignore", "seen"])
def test_results_hold_both_background_conventions(background):
    plan = SimpleNamespace(vocabulary=VOC, splits=[1], background=background)
    result = score(plan, painted_voc_confusion())["1"]

    def present(scores: dict) -> dict:
        return {**scores, "per_class": {n: v for n, v in scores["per_class"].items() if v is not None}}

    # Ignored: the paint on background costs nothing. Counted: background IoU 3/6, car 2/5, seen
    # (50 + 100) / 2, harmonic 2 * 75 * 40 / 115 = 1200/23.
    assert present(result["background_ignored"]) == {
        "seen": 100.0, "unseen": 100.0, "harmonic": 100.0, "per_class": {"aeroplane": 100.0, "car": 100.0}}
    counted = present(result["background_counted"])
    assert counted["per_class"] == {"background": 50.0, "aeroplane": 100.0, "car": 40.0}
    assert (counted["seen"], counted["unseen"]) == (75.0, 40.0)
    assert counted["harmonic"] == pytest.approx(1200 / 23)
    # The split's own keys keep their old meaning: the chosen convention's scores.
    chosen = result[BACKGROUND_KEYS[background]]
    assert {m: result[m] for m in ("seen", "unseen", "harmonic", "per_class")} == chosen
    assert result["unseen_classes"] == list(VOC.unseen(1))


def test_results_say_how_the_model_was_trained(voc_eval_root, tmp_path):
    def plan(checkpoint: Path):
        return prepare_evaluation(ZS3EvalOptions(checkpoint=str(checkpoint), format="voc", root=str(voc_eval_root),
                                                 splits=[1, 2]))

    oracle = plan(save_tiny_checkpoint(tmp_path / "oracle", VOC, "supervised", 1)).report
    assert oracle["setting"] == "supervised" and oracle["zero_shot"] is False
    assert oracle["setting_label"] == "supervised (oracle upper bound), not zero-shot"
    assert oracle["notes"] == [("supervised (oracle upper bound), not zero-shot: the model learnt the unseen classes "
                                "from labels of a labeler trained on them; these numbers are an upper bound, not a "
                                "zero-shot result")]

    # An inductive text head never embedded split 1's unseen names: they are embedded now.
    inductive = plan(save_tiny_checkpoint(tmp_path / "inductive", VOC, "inductive", 1, head="text"))
    unseen = list(VOC.unseen(1))
    assert inductive.report["zero_shot"] is True and inductive.report["added_at_test"] == unseen
    assert list(inductive.added) == [VOC.lookup(name).index for name in unseen]
    expected = encode_class_names("tiny", VOC, unseen)
    torch.testing.assert_close(torch.tensor(list(inductive.added.values())), expected)
    transductive = plan(save_tiny_checkpoint(tmp_path / "transductive", VOC, "transductive", 1, head="text"))
    assert transductive.report["added_at_test"] == [] and transductive.added == {}


def test_input_errors_are_one_line(voc_eval_root, coco_eval_root, voc_checkpoint, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert eval_zs3.main(list(argv)) == 2
        message = capsys.readouterr().err
        assert message.startswith("eval_zs3: error: ") and message.count("\n") == 1
        return message

    voc = ["--checkpoint", str(voc_checkpoint), "--format", "voc", "--root", str(voc_eval_root)]
    assert "no readable checkpoint" in error("--checkpoint", str(tmp_path / "missing"), *voc[2:])
    assert "VOC root not found" in error(*voc[:4], "--root", str(tmp_path / "nowhere"))
    assert "no image list" in error(*voc, "--split-set", "test")
    assert "must be a local folder" in error(*voc[:4], "--root", "s3://bucket/voc")
    assert "trained on the voc vocabulary, the dataset has coco" in error(
        "--checkpoint", str(voc_checkpoint), "--format", "coco", "--root", str(coco_eval_root))
    assert "unknown split 4" in error(*voc, "--splits", "1", "4")
    assert "distinct" in error(*voc, "--splits", "2", "2")
    assert "--size: Input should be greater than or equal to 32" in error(*voc, "--size", "16")
    assert "--num-workers: Input should be greater than or equal to 1" in error(*voc, "--num-workers", "0")
    assert "must name a file" in error(*voc, "--out", "s3://bucket")

    text = save_tiny_checkpoint(tmp_path / "text", VOC, "inductive", 1, head="text")
    metadata = json.loads((text / "checkpoint.json").read_text())
    del metadata["text_classes"]
    (text / "checkpoint.json").write_text(json.dumps(metadata))
    assert "lacks text_classes in its checkpoint.json" in error("--checkpoint", str(text), *voc[2:])
