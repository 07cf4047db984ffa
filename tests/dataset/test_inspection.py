"""factory/inspection.py and jobs/inspect_dataset.py on the factory's tiny dataset, and on a
copy with one sample turned into a recorded drop and a quality column added."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.dataset.preview import TILE
from jobs import inspect_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def expected_per_class(root: Path) -> dict[str, dict]:
    """Counts and coverage computed here from the Parquet rows, independently of the inspector."""
    out: dict[str, dict] = {}
    for row in pq.read_table(root / "data").to_pylist():
        label = np.array(Image.open(io.BytesIO(row["label"]["bytes"])))
        for name, index, found in zip(row["classes"], row["class_indices"], row["found"]):
            entry = out.setdefault(name, {"samples": 0, "found": 0, "coverage": []})
            entry["samples"] += 1
            entry["found"] += int(found)
            entry["coverage"].append((label == index).mean())
    return out


def test_report_page_and_galleries(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "inspection"
    assert inspect_dataset.main([str(tiny_dataset), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    expected = expected_per_class(tiny_dataset)
    assert {c["name"] for c in report["classes"]} == set(expected)
    for c in report["classes"]:
        e = expected[c["name"]]
        assert (c["samples"], c["found"], c["missed"]) == (e["samples"], e["found"], e["samples"] - e["found"])
        assert c["coverage_mean"] == pytest.approx(np.mean(e["coverage"]))
        assert c["dropped"] == 0  # the plan was rebuilt and nothing was dropped
        assert re.search(rf"^  {re.escape(c['name'][:16])}\s+{c['samples']}\s+{c['found']}\s", printed, re.M)
    assert report["counts"] == json.loads((tiny_dataset / "manifest.json").read_text())["counts"]
    assert report["quality"] is None  # the tiny recipe scores no quality

    page = (out / "index.html").read_text()
    assert "<script" not in page and not re.search(r"(src|href)=\"https?:", page)  # works offline
    charts = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(charts) >= 2
    for chart in charts:
        Image.open(io.BytesIO(base64.b64decode(chart))).verify()
    for c in report["classes"]:
        gallery = out / "gallery" / f"{c['name'].replace(' ', '_')}.png"
        assert f'src="gallery/{gallery.name}"' in page
        with Image.open(gallery) as image:  # at least one sample: an image tile and its overlay
            assert image.width >= 2 * TILE and image.height > TILE


def test_drops_per_class(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # record the first row of the first part as dropped, as a build with on_missing: drop would
    entry = manifest["files"][0]
    table = pq.read_table(copy / entry["path"])
    dropped = table.slice(0, 1).to_pylist()[0]
    pq.write_table(table.slice(1), copy / entry["path"])
    entry["rows"] -= 1
    manifest["counts"]["written"] -= 1
    manifest["counts"]["dropped"] = {"class_not_found": 1}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    commit_path = copy / "_commits" / f"{Path(entry['path']).stem}.json"
    commit = json.loads(commit_path.read_text())
    commit["written"].remove(dropped["sample_id"])
    commit["dropped"][dropped["sample_id"]] = "class_not_found"
    commit_path.write_text(json.dumps(commit))

    out = tmp_path / "inspection"
    assert inspect_dataset.main([str(copy), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    by_name = {c["name"]: c for c in report["classes"]}
    for name in dropped["classes"]:
        assert by_name[name]["dropped"] == 1
    assert sum(c["dropped"] for c in report["classes"]) == len(dropped["classes"])
    assert report["counts"]["dropped"] == {"class_not_found": 1}
    page = (out / "index.html").read_text()
    assert "class_not_found" in page and 'alt="drop reasons"' in page


def test_quality_scores(tiny_dataset, tmp_path):
    """A recipe with quality.model writes a quality column in every part."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["recipe"]["quality"]["model"] = "tiny"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    quality = []
    for entry in manifest["files"]:
        table = pq.read_table(copy / entry["path"])
        values = np.linspace(0.05, 0.95, table.num_rows).astype(np.float32)
        quality += values.tolist()
        pq.write_table(table.append_column("quality", pa.array(values)), copy / entry["path"])

    out = tmp_path / "inspection"
    assert inspect_dataset.main([str(copy), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["mean"] == pytest.approx(float(np.mean(quality)))
    assert report["quality"]["histogram"] == np.histogram(quality, bins=10, range=(0, 1))[0].tolist()
    # another recipe makes another plan: drops per class are unknown, not zero
    assert all(c["dropped"] is None for c in report["classes"])
    assert 'alt="quality scores"' in (out / "index.html").read_text()


def test_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "inspection"
    assert inspect_dataset.main([str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inspect_dataset:") and len(err.splitlines()) == 1
    assert not out.exists()


def test_unwritable_out_is_one_line_and_exit_2(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert inspect_dataset.main([str(tiny_dataset), "--out", str(blocker / "inspection")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inspect_dataset:") and "not writable" in err and len(err.splitlines()) == 1
