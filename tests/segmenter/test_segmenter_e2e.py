"""Protocol-II chained end to end, each step through its job: the factory builds a tiny set ->
MaskFormer trains on it with 2 Ray Train workers -> eval_zs3 scores it on a real-format
fixture -> the seen / unseen / harmonic table. Once for VOC (closed head), once for COCO (text
head), once for a user-defined vocabulary (with its export and inspection on the way). The
tiny sets are labelled by the tiny oracle, so the runs are "supervised" and every result says
it is not zero-shot."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.core.vocab import COCO, VOC
from factory.core.vocab_files import read_vocabulary
from factory.core.conventions import RECIPE_DIR
from jobs import build_dataset, eval_zs3, export_dataset, inspect_dataset, train_segmenter
from segmenter.checkpoint import load_segmenter_checkpoint

REPO = Path(__file__).resolve().parents[2]
from conftest import write_voc_root  # noqa: E402
from test_eval_zs3 import SIZE  # noqa: E402

pytestmark = pytest.mark.slow


def train(data: Path, out: Path, split: int, capsys, *options: str) -> Path:
    capsys.readouterr()
    assert train_segmenter.main([
        "--data", str(data), "--out", str(out), "--split", str(split), "--setting", "supervised",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--iterations", "2", "--batch-size", "4",
        "--crop-size", "32", "--checkpoint-every", "2", "--log-every", "1", *options]) == 0
    rows = pq.read_table(data / "data").num_rows
    assert f"samples    {rows} synthetic, 0 real" in capsys.readouterr().out  # every row streamed in
    return out / "last"


def evaluate(checkpoint: Path, format: str, root: Path, out: Path, capsys) -> tuple[dict, list[str]]:
    capsys.readouterr()
    assert eval_zs3.main(["--checkpoint", str(checkpoint), "--format", format, "--root", str(root),
                          "--size", str(SIZE), "--num-workers", "2", "--qualitative", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out.splitlines()


def check_report(report: dict, printed: list[str], vocabulary, split: int, images: int) -> None:
    assert report["setting"] == "supervised" and report["zero_shot"] is False and report["trained_split"] == split
    assert report["notes"][0].startswith("supervised (oracle upper bound), not zero-shot: ")
    assert report["dataset"]["images"] == images and report["splits"] == [split]
    result = report["results"][str(split)]
    assert result["unseen_classes"] == list(vocabulary.unseen(split))
    seen, unseen, harmonic = result["seen"], result["unseen"], result["harmonic"]
    if seen and unseen:
        assert harmonic == pytest.approx(2 * seen * unseen / (seen + unseen))
    header = next(i for i, line in enumerate(printed) if line.startswith("Split"))
    assert printed[header - 1] == "mIoU, supervised (oracle upper bound), not zero-shot"
    assert printed[header].split() == ["Split", "Background", "Seen", "Unseen", "Harmonic"]
    # A row per background convention: ignored (the JSON's top-level keys, by default), then counted.
    assert printed[header + 2].split()[:2] == [str(split), "ignored"]
    assert printed[header + 3].split()[:3] == [str(split), "a", "seen"]
    assert result["background_ignored"]["seen"] == seen and "background_counted" in result
    assert len(report["qualitative"]) == 1


def test_voc_factory_set_to_zs3_table(tiny_dataset, voc_eval_root, tmp_path, capsys):
    checkpoint = train(tiny_dataset, tmp_path / "segmenter", split=1, capsys=capsys)
    model, state = load_segmenter_checkpoint(str(checkpoint))
    assert state["iteration"] == 2 and state["setting"] == "supervised" and model.config.num_labels == 21
    assert state["zero_shot"] is False and state["data_labels"]["kind"] == "oracle"

    report, printed = evaluate(checkpoint, "voc", voc_eval_root, tmp_path / "voc.json", capsys)
    check_report(report, printed, VOC, split=1, images=5)


def test_coco_factory_set_to_zs3_table(ray_cluster, coco_eval_root, tmp_path, capsys):
    data = tmp_path / "coco-set"
    assert build_dataset.main([
        "--out", str(data), "--recipe", "tiny", "--vocabulary", "coco", "--num-samples", "4", "--generator.steps", "2",
        "--generator.batch-size", "4", "--labeler.batch-size", "4", "--writer.preview-samples", "0"]) == 0
    checkpoint = train(data, tmp_path / "segmenter", 2, capsys, "--model.head", "text", "--model.text-encoder", "tiny")
    model, state = load_segmenter_checkpoint(str(checkpoint))
    assert state["vocabulary"]["name"] == "coco" and model.config.num_labels == len(COCO) + 1
    assert model.config.head == "text" and state["text_classes"] == list(COCO.names)  # supervised: every name

    report, printed = evaluate(checkpoint, "coco", coco_eval_root, tmp_path / "coco.json", capsys)
    check_report(report, printed, COCO, split=2, images=3)


def test_user_vocabulary_from_build_to_zs3_table(ray_cluster, tmp_path, capsys):
    """street.yaml's three classes: the build labels them through their COCO detector classes,
    the export and the inspection name them, the segmenter has 4 outputs, and the evaluation of a
    VOC-layout set of street indices takes the vocabulary from the checkpoint."""
    street_file = str(RECIPE_DIR / "vocabularies" / "street.yaml")
    street, data = read_vocabulary(street_file), tmp_path / "street-set"
    assert build_dataset.main([
        "--out", str(data), "--recipe", "tiny", "--vocabulary", street_file, "--num-samples", "6",
        "--generator.steps", "2", "--generator.batch-size", "3", "--labeler.batch-size", "3",
        "--writer.preview-samples", "0"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["vocabulary"]["name"] == "street" and manifest["vocabulary"]["unseen"] == [["cyclist"]]
    classes = pq.read_table(data / "data", columns=["classes"]).column("classes").to_pylist()
    assert {name for names in classes for name in names} <= set(street.names)
    card = (data / "README.md").read_text()
    assert "vocabulary `street` (user-defined, defined in the recipe)" in card
    assert "| 1 | vehicle | car | automobile |" in card and "Unseen classes of each split: 1: cyclist." in card

    assert export_dataset.main([str(data), "--format", "mmseg", "--out", str(tmp_path / "mmseg")]) == 0
    metainfo = json.loads((tmp_path / "mmseg" / "metainfo.json").read_text())
    assert metainfo["classes"] == ["background", "vehicle", "pedestrian", "cyclist"]
    assert export_dataset.main([str(data), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    categories = json.loads(next((tmp_path / "coco" / "annotations").glob("*.json")).read_text())["categories"]
    assert [(c["id"], c["name"]) for c in categories] == [(1, "vehicle"), (2, "pedestrian"), (3, "cyclist")]
    assert inspect_dataset.main([str(data), "--out", str(tmp_path / "inspection")]) == 0
    report = json.loads((tmp_path / "inspection" / "report.json").read_text())
    assert report["vocabulary"] == "street"
    assert [c["name"] for c in report["classes"]] + report["classes_without_samples"] == list(street.names)

    checkpoint = train(data, tmp_path / "segmenter", 1, capsys)
    model, state = load_segmenter_checkpoint(str(checkpoint))
    assert model.config.num_labels == 4 and state["vocabulary"] == street.definition()
    root = write_voc_root(tmp_path / "street-voc", classes=len(street))
    report, printed = evaluate(checkpoint, "voc", root, tmp_path / "street.json", capsys)
    check_report(report, printed, street, split=1, images=5)
    assert set(report["results"]["1"]["per_class"]) <= {"background", *street.names}
