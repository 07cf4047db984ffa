"""jobs/verify_dataset.py on a real build, locally and on S3, and on copies broken in each way it checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import build_dataset, verify_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Six samples in parts of up to two (the tiny recipe keeps samples whose class is missed).
BUILD = ["--recipe", "tiny", "--num-samples", "6", "--generator.steps", "2", "--generator.batch-size", "3", "--labeler.batch-size", "3",
         "--writer.rows-per-file", "2", "--writer.preview-samples", "0"]


@pytest.fixture(scope="module")
def dataset(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "ds"
    assert build_dataset.main(["--out", str(out), *BUILD]) == 0
    return out


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def record_first_part_as_dropped(root: Path) -> None:
    """What the build writes when the detector misses every sample of a part: a commit
    record of dropped ids and no file, with one attempt per plan entry (so the dropped ones
    are given up, not replaced). The tiny detector finds nothing, so a real build drops all
    samples or (on_missing: ignore) none; this makes a dataset with both."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["files"].pop(0)
    path = root / entry["path"]
    commit_path = root / "_commits" / f"{path.stem}.json"
    commit = json.loads(commit_path.read_text())
    commit.update(file=None, rows=0, bytes=0, sha256=None, written=[],
                  dropped={i: "class_not_found" for i in commit["written"]})
    commit_path.write_text(json.dumps(commit))
    path.unlink()
    manifest["recipe"]["attempts"] = 1  # not part of the content key: the plan's ids stay
    manifest["counts"].update(written=manifest["counts"]["written"] - entry["rows"],
                              dropped={"class_not_found": entry["rows"]}, given_up=entry["rows"])
    (root / "manifest.json").write_text(json.dumps(manifest))


def verify(uri: str, capsys) -> tuple[int, str]:
    code = verify_dataset.main([uri])
    return code, capsys.readouterr().out


def first_part(root: Path) -> Path:
    return root / json.loads((root / "manifest.json").read_text())["files"][0]["path"]


def rewrite_part(root: Path, change) -> None:
    """Replace the first part by ``change(table)`` and record it as the build would have:
    manifest and commit record agree with the new file, so only the content is wrong."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["files"][0]
    path = root / entry["path"]
    table = change(pq.read_table(path))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    record = {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["counts"]["written"] += table.num_rows - entry["rows"]
    entry.update(record)
    (root / "manifest.json").write_text(json.dumps(manifest))
    commit_path = root / "_commits" / f"{path.stem}.json"
    commit_path.write_text(json.dumps({**json.loads(commit_path.read_text()), **record}))


def flip_a_byte(root: Path) -> None:
    path = first_part(root)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def duplicate_a_row(root: Path) -> None:
    rewrite_part(root, lambda table: pa.concat_tables([table, table.slice(0, 1)]))


def truncate_a_label(root: Path) -> None:
    def change(table):
        labels = table.column("label").to_pylist()
        labels[0] = {**labels[0], "bytes": labels[0]["bytes"][:40]}
        return table.set_column(table.schema.get_field_index("label"), "label",
                                pa.array(labels, table.schema.field("label").type))
    rewrite_part(root, change)


def drop_a_row(root: Path) -> None:
    rewrite_part(root, lambda table: table.slice(1))


def stray_part(root: Path) -> None:  # a part of a killed run that nobody cleaned up
    shutil.copy(first_part(root), root / "data" / "part-stray.parquet")


def leave_drops_unreplaced(root: Path) -> None:  # the build stopped before replacing them
    record_first_part_as_dropped(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["recipe"]["attempts"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))


def lose_the_drop_records(root: Path) -> None:
    record_first_part_as_dropped(root)
    for path in (root / "_commits").glob("*.json"):
        if json.loads(path.read_text())["dropped"]:
            path.unlink()


@pytest.mark.parametrize("damage, message", [
    (flip_a_byte, "differs from the manifest's"),
    (lambda root: first_part(root).unlink(), ": missing"),
    (duplicate_a_row, "1 sample ids in more than one row"),
    (truncate_a_label, "label does not decode"),
    (drop_a_row, "1 planned ids neither written nor dropped"),
    (stray_part, "data/part-stray.parquet: not in the manifest"),
    (lose_the_drop_records, "planned ids neither written nor dropped"),
    (leave_drops_unreplaced, "planned ids neither written nor dropped"),
    (lambda root: (root / "manifest.json").unlink(), "manifest.json not found (missing, or its build has not finished); run the same"),
], ids=["flipped-byte", "deleted-file", "duplicated-row", "corrupt-label", "lost-row", "stray-part",
        "lost-drop-records", "unreplaced-drops", "no-manifest"])
def test_damaged_copies_fail_with_a_clear_message(copy, damage, message, capsys):
    damage(copy)
    code, report = verify(str(copy), capsys)
    assert code == 1 and "FAILED" in report
    assert message in report, report


def test_finished_build_verifies_locally(dataset, capsys):
    code, report = verify(str(dataset), capsys)
    assert code == 0, report
    assert report.splitlines()[-1] == "OK"
    assert "6 planned, 6 written, dropped: none" in report and "6 images, 6 label maps" in report


def test_recorded_drops_are_subtracted_from_the_plan(copy, capsys):
    dropped = json.loads((copy / "manifest.json").read_text())["files"][0]["rows"]
    record_first_part_as_dropped(copy)
    code, report = verify(str(copy), capsys)
    assert code == 0, report
    assert f"6 planned, {6 - dropped} written, dropped: {dropped} class_not_found" in report


def test_verifies_on_s3_and_finds_a_missing_object(dataset, bucket, s3_endpoint, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in dataset.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"ds/{path.relative_to(dataset)}")
    uri = f"s3://{bucket}/ds"
    assert verify(uri, capsys)[0] == 0
    s3.delete_object(Bucket=bucket, Key=f"ds/{first_part(dataset).relative_to(dataset)}")
    code, report = verify(uri, capsys)
    assert code == 1 and ": missing" in report


def test_command_line_exit_code_and_report(copy):
    flip_a_byte(copy)
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "verify_dataset.py"), str(copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.startswith(f"verify_dataset: {copy}") and "differs from the manifest's" in result.stdout
