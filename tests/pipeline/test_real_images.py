"""Builds from real images (factory/pipeline/real.py, jobs/annotate_images.py) on the mini world: the
drawn benchmark's images turned into triplets with their exact masks, and folders of images (local
and on S3) annotated by a grounding module, resumed after an interruption."""

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factory.dataset.codec import decode_label, decode_masks
from factory.dataset.layout import COMMIT_DIR
from factory.dataset.real import real_dataset
from factory.diffusion.features import feature_channels, unet_features
from factory.diffusion.pipelines import load_pipeline, unet_conditioning
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import load_recipe
from grounding.checkpoint import generation_record, save_grounding_checkpoint
from grounding.config import ModelSection, TextConfig, grounding_model_config
from grounding.data import TripletSource
from grounding.model import GroundingModule
from jobs import annotate_images, verify_dataset
from world.benchmark import write_benchmark

REPO = Path(__file__).resolve().parents[2]
GENERATOR = str(REPO / "models" / "shapes-generator")
STEPS, CAPTURE = 6, 2  # few steps: the plumbing, not the quality (bench/real_images.py measures that)
FAST = {"generator.model": GENERATOR, "generator.steps": STEPS, "capture.step": CAPTURE, "generator.batch_size": 4,
        "writer.rows_per_file": 4}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("voc"), val=6, train=0)


def rows_of(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for f in manifest["files"] for row in pq.read_table(out / f["path"]).to_pylist()]


@pytest.mark.slow  # builds through the world's generator
@pytest.mark.parametrize("route", ["noised", "inversion"])
def test_real_triplets_keep_each_images_exact_masks(voc, tmp_path, route):
    out = tmp_path / "triplets"
    recipe = load_recipe("shapes-real-triplets", {**FAST, "out": str(out), "source.images": str(voc),
                                                  "source.split": "val", "source.route": route})
    summary = run_build(prepare_build(recipe), in_process=True)
    assert summary.written == summary.planned == 6
    truth = {s.image_id: s.label for s in real_dataset("voc", voc, "val", "shapes")}
    rows = rows_of(out)
    assert sorted(row["source_image"] for row in rows) == sorted(truth)
    for row in rows:
        label = decode_label(row["label"])
        np.testing.assert_array_equal(label, truth[row["source_image"]])
        masks = decode_masks(row["masks"])
        for k, index in enumerate(row["class_indices"]):
            np.testing.assert_array_equal(masks[k], label == index)
        assert all(row["found"]) and row["labeler"] == "masks:voc"
        assert (row["psnr"] is not None and row["psnr"] > 10) if route == "inversion" else "psnr" not in row
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"]["kind"] == "masks" and all(manifest["labels"]["trained"].values())
    assert "real images of" in (out / "README.md").read_text()
    source = TripletSource.open(str(out))  # what grounding training reads, beside the generated triplets
    assert source.mode == "latent" and source.capture_step == CAPTURE and source.shapes["latent"] == (4, 16, 16)

    # A finished dataset is a source too: the same images and masks again.
    again = tmp_path / "again"
    recipe = load_recipe("shapes-real-triplets", {**FAST, "out": str(again), "source.images": str(out),
                                                  "source.format": "dataset", "source.route": "noised"})
    run_build(prepare_build(recipe), in_process=True)
    first = {row["sample_id"]: decode_label(row["label"]) for row in rows}
    again_rows = rows_of(again)
    assert sorted(row["source_image"] for row in again_rows) == sorted(first)  # its refs: the sample ids
    for row in again_rows:
        np.testing.assert_array_equal(decode_label(row["label"]), first[row["source_image"]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained world-preset module in the training code's checkpoint format, reading the world
    generator's features at this module's capture step (labels are noise; the plumbing is tested)."""
    pipe = load_pipeline(GENERATOR)
    channels = feature_channels(unet_features(pipe.unet, torch.zeros(1, 4, 16, 16), 0, unet_conditioning(pipe, [""], 64, 64)))
    torch.manual_seed(0)
    module = GroundingModule(grounding_model_config(ModelSection(preset="world"), channels,
                                                    pipe.text_encoder.config.hidden_size, 64))
    recipe = load_recipe("shapes-annotate", FAST).model_dump(mode="json")
    path = tmp_path_factory.mktemp("grounding") / "best"
    save_grounding_checkpoint(str(path), module, None, {
        "epoch": 0, "text": TextConfig().model_dump(), "generation": generation_record(recipe, CAPTURE),
        "capture": {"features": "latent", "steps_remaining": CAPTURE}, "vocabulary": {"name": "shapes"},
        "classes": ["red_square", "blue_cross"], "split": 1})
    return str(path)


@pytest.mark.slow
def test_annotate_a_folder_on_s3_and_resume_after_an_interruption(ray_cluster, voc, checkpoint, bucket, s3_endpoint,
                                                                  tmp_path, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in sorted((voc / "JPEGImages").iterdir()):
        s3.upload_file(str(path), bucket, f"photos/{path.name}")
    out = tmp_path / "annotated"
    args = ["--images", f"s3://{bucket}/photos", "--classes", "red_disc,blue_cross", "--checkpoint", checkpoint,
            "--out", str(out), "--generator.model", GENERATOR, "--generator.steps", str(STEPS),
            "--generator.batch-size", "2", "--writer.rows-per-file", "2", "--source.route", "noised"]
    assert annotate_images.main(args) == 0
    assert "6 written of 6 planned" in capsys.readouterr().out
    rows = rows_of(out)
    names = sorted(path.name for path in (voc / "JPEGImages").iterdir())
    assert sorted(row["source_image"] for row in rows) == names
    for row in rows:
        assert row["classes"] == ["red_disc", "blue_cross"] and row["labeler"] == f"grounding:{checkpoint}"
        # every class asked of every image: one not found is absent, never 255 over the rest
        assert set(np.unique(decode_label(row["label"]))) <= {0, *row["class_indices"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["annotator"]["on_missing"] == "absent"

    # Interrupted after its first parts: the last part's commit record never landed.
    commits = sorted((out / COMMIT_DIR).iterdir())
    lost = json.loads(commits[-1].read_text())
    commits[-1].unlink()
    assert annotate_images.main(args) == 0
    printed = capsys.readouterr().out
    assert f"resumed   {6 - len(lost['written'])} samples were already done; {len(lost['written'])} made now" in printed
    assert "deleted 1 orphan part" in printed
    again = rows_of(out)
    # none lost, none twice
    assert sorted(row["sample_id"] for row in again) == sorted(row["sample_id"] for row in rows)
    for a, b in zip(sorted(rows, key=lambda r: r["sample_id"]), sorted(again, key=lambda r: r["sample_id"])):
        np.testing.assert_array_equal(decode_label(a["label"]), decode_label(b["label"]))  # deterministic


def give_two_rows_one_source_image(root: Path) -> None:
    """A part whose second row names its first row's image, recorded as the build would have
    (sizes and checksums agree): what a resume keyed by position wrote."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(entry for entry in manifest["files"] if entry["rows"] > 1)
    path = root / entry["path"]
    table = pq.read_table(path)
    refs = table.column("source_image").to_pylist()
    column = table.schema.get_field_index("source_image")
    table = table.set_column(column, "source_image", pa.array([refs[0], refs[0], *refs[2:]]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))
    commit_path = root / COMMIT_DIR / f"{path.stem}.json"
    commit_path.write_text(json.dumps({**json.loads(commit_path.read_text()), "bytes": len(data),
                                       "sha256": entry["sha256"]}))


@pytest.mark.slow
def test_an_image_added_to_the_folder_is_the_only_one_annotated_on_the_rerun(ray_cluster, voc, checkpoint, tmp_path,
                                                                            capsys):
    """Samples are keyed by each image's name and content: an image that sorts first, added after
    a run, is annotated alone on the next, and no image is annotated twice; verify_dataset checks it."""
    photos, out = tmp_path / "photos", tmp_path / "annotated"
    photos.mkdir()
    for path in sorted((voc / "JPEGImages").iterdir())[:3]:
        shutil.copy(path, photos / path.name)
    args = ["--images", str(photos), "--classes", "red_disc,blue_cross", "--checkpoint", checkpoint,
            "--out", str(out), "--generator.model", GENERATOR, "--generator.steps", str(STEPS),
            "--generator.batch-size", "2", "--writer.rows-per-file", "2", "--source.route", "noised"]
    assert annotate_images.main(args) == 0
    assert "3 written of 3 planned" in capsys.readouterr().out
    before = {row["source_image"]: row["sample_id"] for row in rows_of(out)}

    wide = np.zeros((48, 80, 3), np.uint8)
    wide[10:30, 20:50] = (220, 30, 30)
    Image.fromarray(wide).save(photos / "0-added.png")  # sorts before every image annotated
    assert annotate_images.main(args) == 0
    assert "resumed   3 samples were already done; 1 made now" in capsys.readouterr().out
    rows = rows_of(out)
    assert sorted(row["source_image"] for row in rows) == sorted(path.name for path in photos.iterdir())
    assert {row["source_image"]: row["sample_id"] for row in rows if row["source_image"] in before} == before
    sizes = {row["source_image"]: (row["source_height"], row["source_width"]) for row in rows}
    assert sizes["0-added.png"] == (48, 80) and {sizes[name] for name in before} == {(64, 64)}
    card = (out / "README.md").read_text()
    assert "one list for every image, `['red_disc', 'blue_cross']`" in card and "(`source.resize: squash`" in card
    assert "Synthetic images" not in card

    assert verify_dataset.main([str(out)]) == 0
    assert "sources   4 distinct source images" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    give_two_rows_one_source_image(broken)
    assert verify_dataset.main([str(broken)]) == 1
    report = capsys.readouterr().out
    assert "1 source images in more than one row" in report
    assert "1 ids whose row holds another source image than the plan's" in report

    (photos / "0-added.png").rename(photos / "0-renamed.png")  # another image: its row is not in the plan
    assert annotate_images.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"annotate_images: error: {out} holds 1 samples of images no longer in {photos} (removed, renamed or "
        f"changed since); restore them, or write to another --out")
