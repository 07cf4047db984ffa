"""Protocol-II chained end to end, each step through its job: the factory builds a tiny set ->
MaskFormer trains on it with 2 Ray Train workers -> eval_zs3 scores it on a real-format
fixture -> the seen / unseen / harmonic table. Once for VOC (closed head), once for COCO (text
head). The tiny sets are labelled by the tiny oracle, so the runs are "supervised" and every
result says it is not zero-shot."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.core.vocab import COCO, VOC
from jobs import build_dataset, eval_zs3, train_segmenter
from segmenter.model import load_segmenter_checkpoint

REPO = Path(__file__).resolve().parents[2]
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
    assert printed[header].split() == ["Split", "Seen", "Unseen", "Harmonic"]
    assert printed[header + 2].split()[0] == str(split)
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
