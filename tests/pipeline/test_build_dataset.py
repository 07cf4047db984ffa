"""End to end: jobs/build_dataset.py on a real local Ray cluster, to a folder and to S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from events import count, wait_until

from factory.dataset.codec import decode_png
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import recipe_from_args
from jobs import build_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Small and quick: 12 samples (one-class and pairs), batches of 4, parts of 4 rows.
SMALL = ["--recipe", "tiny", "--num-samples", "12", "--generator.steps", "3", "--generator.batch-size", "4",
         "--labeler.batch-size", "4", "--writer.rows-per-file", "4", "--writer.preview-samples", "4"]


def read_rows(root: Path) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    rows = []
    for entry in manifest["files"]:
        rows += pq.read_table(root / entry["path"]).to_pylist()
    return rows


def planned_ids(*args: str) -> list[str]:
    return [s.sample_id for s in build_plan(recipe_from_args(build_dataset.parse_args(list(args))))]


def test_the_default_build_is_the_mini_world_with_objects_found(ray_cluster, tmp_path, capsys):
    """`python jobs/build_dataset.py` as a new user runs it: the trained generator draws the
    prompted objects and the trained oracle labels them."""
    out = tmp_path / "default"
    assert build_dataset.main(["--out", str(out), "--num-samples", "8", "--writer.preview-samples", "8"]) == 0
    assert "preview" in capsys.readouterr().out and (out / "preview.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocabulary"]["name"] == "shapes" and manifest["models"]["generator"] == "models/shapes-generator"
    counts = manifest["counts"]  # a sample whose class the oracle misses is replaced, up to 4 tries
    assert counts["written"] + counts["given_up"] == 8 and counts["written"] >= 6, counts
    for row in read_rows(out):  # every prompted class has pixels in the label map
        label = decode_png(row["label"]["bytes"])
        assert all((label == index).sum() >= 20 for index in row["class_indices"]), row["prompt"]


def test_tiny_build_to_local_folder(ray_cluster, tmp_path, capsys):
    out = tmp_path / "ds"
    assert build_dataset.main(["--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"Dataset written to {out}" in printed and "preview" in printed
    assert f"card      {out}/README.md" in printed and (out / "README.md").is_file()

    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_rows(out)
    ids = [r["sample_id"] for r in rows]
    assert sorted(ids) == sorted(planned_ids(*SMALL)) and len(set(ids)) == 12
    assert manifest["counts"] == {"planned": 12, "attempted": 12, "written": 12, "dropped": {}, "given_up": 0}
    assert manifest["recipe"]["generator"]["steps"] == 3
    for entry in manifest["files"]:  # checksums and sizes match the files
        data = (out / entry["path"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert pq.read_metadata(out / entry["path"]).num_rows == entry["rows"]
    for row in rows:
        assert decode_png(row["image"]["bytes"]).shape == (64, 64, 3)
        label = decode_png(row["label"]["bytes"])
        assert label.shape == (64, 64)
        allowed = {0, 255, *row["class_indices"]}
        assert set(np.unique(label)) <= allowed
        assert len(row["masks"]) == len(row["classes"]) == len(row["scores"]) == len(row["found"])
        assert row["prompt"].startswith("a photograph of a")
    preview = out / "preview.png"
    assert preview.read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "data").glob(".*"))  # no temporaries left behind


def test_tiny_build_to_s3(ray_cluster, bucket, s3_endpoint):
    uri = f"s3://{bucket}/datasets/tiny"
    assert build_dataset.main(["--out", uri, *SMALL]) == 0

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="datasets/tiny/manifest.json")["Body"].read())
    assert {"datasets/tiny/manifest.json", "datasets/tiny/preview.png", "datasets/tiny/build.json"} <= keys
    ids = []
    for entry in manifest["files"]:
        body = s3.get_object(Bucket=bucket, Key=f"datasets/tiny/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        ids += pq.read_table(io.BytesIO(body)).column("sample_id").to_pylist()
    assert sorted(ids) == sorted(planned_ids(*SMALL))


def test_resume_after_killed_driver_completes_the_plan_exactly_once(ray_cluster, tmp_path):
    """Kill the driver mid-build (SIGKILL), rerun the same command: every id once, rows as
    an uninterrupted build of the same seed would have made them."""
    args = ["--recipe", "tiny", "--num-samples", "12", "--generator.steps", "3", "--generator.batch-size", "2",
            "--labeler.batch-size", "2", "--writer.rows-per-file", "2"]
    out = tmp_path / "killed"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "build_dataset.py"), "--out", str(out), *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    commits = out / "_commits"
    wait_until(lambda: count(commits, "*.json") >= 2, [commits], timeout=240)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = len(list(commits.glob("*.json")))
    assert 2 <= done_before < 6, "the kill must land mid-build"
    assert not (out / "manifest.json").exists()
    # A part whose commit record never got written is an orphan: resume must not count it.
    orphan = out / "data" / "part-orphan.parquet"
    orphan.write_bytes(next((out / "data").glob("part-*.parquet")).read_bytes())
    stale = out / "data" / ".part-x.parquet.0123.tmp"  # a writer killed mid-write
    stale.write_bytes(b"PAR1 half")

    assert build_dataset.main(["--out", str(out), *args]) == 0
    assert not orphan.exists() and not stale.exists()
    rows = {r["sample_id"]: r for r in read_rows(out)}
    assert sorted(rows) == sorted(planned_ids(*args))
    assert len(list(commits.glob("*.json"))) == 6

    reference = tmp_path / "uninterrupted"
    assert build_dataset.main(["--out", str(reference), *args]) == 0
    for sample_id, row in {r["sample_id"]: r for r in read_rows(reference)}.items():
        mine = rows[sample_id]
        assert (mine["prompt"], mine["seed"]) == (row["prompt"], row["seed"])
        difference = np.abs(decode_png(mine["image"]["bytes"]).astype(int) - decode_png(row["image"]["bytes"]))
        assert difference.max() <= 1  # float noise of other batch mates, at most one level


def test_rerun_of_a_finished_build_does_nothing(ray_cluster, tmp_path, capsys):
    out = tmp_path / "ds"
    assert build_dataset.main(["--out", str(out), *SMALL]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    assert build_dataset.main(["--out", str(out), *SMALL]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before
    assert "12 samples were already done; 0 made now" in capsys.readouterr().out


def test_help_documents_every_recipe_field(capsys):
    with pytest.raises(SystemExit):
        build_dataset.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--recipe", "--out", "--num-samples", "--seed", "--generator.steps", "--labeler.score-threshold",
                 "--labeler.on-missing", "--writer.rows-per-file", "--prompts.file", "--pairs"):
        assert flag in text


def test_triplet_build_stores_latent_attention_and_quality(ray_cluster, tmp_path):
    out = tmp_path / "triplets"
    args = ["--out", str(out), "--recipe", "tiny", "--num-samples", "4", "--generator.steps", "4",
            "--capture.features", "latent",
            "--capture.step", "2", "--capture.attention", "true", "--quality.model", "tiny",
            "--writer.preview-samples", "0"]
    assert build_dataset.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["capture"] == {"features": "latent", "attention": True, "steps_remaining": 2, "unet_call": 2,
                                   "dtype": "float16", "shapes": {"latent": [4, 32, 32], "daam": [32, 32]}}
    rows = read_rows(out)
    assert len(rows) == 4 and len({r["timestep"] for r in rows}) == 1
    for row in rows:
        latent = np.frombuffer(row["latent"], np.float16).reshape(4, 32, 32)
        assert np.isfinite(latent).all() and latent.std() > 0
        assert len(row["daam"]) == len(row["classes"])
        heat = np.frombuffer(row["daam"][0], np.float16).reshape(32, 32)
        assert heat.min() >= 0 and heat.max() == 1  # normalised per class
        assert 0.0 <= row["quality"] <= 1.0


def test_agreement_of_a_labeler_with_itself_is_recorded_carded_and_inspected(ray_cluster, tmp_path, capsys):
    """The tiny oracle checked by a second copy of itself under the same rules: every class of
    every sample agrees (IoU 1.0), in the rows, the manifest, the card and the inspection."""
    from jobs import inspect_dataset

    out = tmp_path / "checked"
    assert build_dataset.main(["--out", str(out), *SMALL, "--agreement.labeler",
                               "{model: tiny, score_threshold: 0.01, on_missing: ignore}",
                               "--agreement.min-iou", "0.9"]) == 0
    rows = read_rows(out)
    assert len(rows) == 12 and all(row["agreement"] == [1.0] * len(row["classes"]) for row in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    agreement = manifest["agreement"]
    assert (agreement["labeler"], agreement["min_iou"], agreement["action"]) == ("tiny", 0.9, "drop")
    assert sum(c["samples"] for c in agreement["classes"].values()) == sum(len(row["classes"]) for row in rows)
    assert all(c["mean"] == 1.0 and c["below"] == 0 for c in agreement["classes"].values())
    card = (out / "README.md").read_text()
    assert "### Label agreement" in card and "Samples with a class below IoU 0.9 were dropped." in card
    assert inspect_dataset.main([str(out), "--out", str(tmp_path / "inspection")]) == 0
    report = json.loads((tmp_path / "inspection" / "report.json").read_text())
    assert report["agreement"]["labeler"] == "tiny"
    assert all(c["agreement_mean"] == 1.0 for c in report["classes"])
    assert "agree" in capsys.readouterr().out


def test_real_models_ask_for_a_gpu_and_say_so_when_there_is_none(ray_cluster, caplog):
    from factory.pipeline.ray_executor import accelerator_resources
    from factory.pipeline.recipe import load_recipe

    assert accelerator_resources(load_recipe("tiny")) == {"num_cpus": 1}  # CPU-only cluster: tiny runs here
    assert not caplog.records
    real = load_recipe("voc-oracle-one")
    assert accelerator_resources(real) == {"num_gpus": 1, "num_cpus": 1}  # the request an autoscaler answers
    assert "the cluster has no GPU now" in caplog.text


FRUIT = "# detector: shapes\nname\tnatural\tdetector\napple\tred disc\tred disc\npear\tgreen triangle\tgreen triangle\n"


@pytest.mark.parametrize("args, names", [
    # README, "Your own classes": signs.yaml on the mini world, its classes mapped onto the oracle's shapes
    (["--vocabulary", "vocabularies/signs.yaml", "--num-samples", "4"], ("stop_sign", "warning_sign", "info_sign")),
    (["--recipe", "tiny", "--vocabulary", "vocabularies/street.yaml", "--classes", "all", "--num-samples", "4",
      "--generator.steps", "2"], ("vehicle", "pedestrian", "cyclist")),
    # a TSV file of your own, without seen/unseen splits, under the default recipe (split: 1)
    (["--vocabulary", "{tmp}/fruit.tsv", "--num-samples", "4"], ("apple", "pear")),
], ids=["signs.yaml", "street.yaml", "fruit.tsv"])
def test_your_own_vocabularies_build(ray_cluster, tmp_path, capsys, args, names):
    """(warehouse.tsv, labelled by an open-vocabulary model: tests/pipeline/test_openvocab.py.)"""
    (tmp_path / "fruit.tsv").write_text(FRUIT)
    out = tmp_path / "ds"
    argv = ["--out", str(out), "--writer.preview-samples", "0", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    assert build_dataset.main(argv) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert tuple(c["name"] for c in manifest["vocabulary"]["classes"]) == names
    if names[0] == "apple":
        assert manifest["recipe"]["split"] is None and "note: split 1 does not apply: vocabulary fruit has no seen" in printed
    rows = read_rows(out)
    assert rows and all(set(row["classes"]) <= set(names) for row in rows)
    if "--recipe" not in args:  # the mini world's oracle found each prompted class
        assert manifest["counts"]["written"] >= 3, manifest["counts"]
        for row in rows:
            label = decode_png(row["label"]["bytes"])
            assert all((label == index).sum() >= 20 for index in row["class_indices"]), row["prompt"]


def test_a_model_that_cannot_load_fails_at_once_and_the_corrected_command_builds(ray_cluster, tmp_path, capsys):
    """Weights of another model fail the same way on every try: one line saying what to change, no
    retries, and nothing left that would make the corrected command refuse the output."""
    out = tmp_path / "ds"
    args = ["--out", str(out), "--recipe", "tiny", "--num-samples", "2", "--generator.steps", "2",
            "--writer.preview-samples", "0"]
    assert build_dataset.main([*args, "--labeler.weights", str(REPO / "models/shapes-oracle/model.safetensors")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("build_dataset:")]
    assert line.startswith("build_dataset: error: cannot load labeler tiny weights ") and "attempt" not in line
    assert "the weights do not fit tiny" in line and "give weights trained as tiny" in line
    assert "resumes" not in line  # the same command would fail again
    assert not (out / "build.json").exists() and not list(out.rglob("*.parquet"))
    assert build_dataset.main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == 2
