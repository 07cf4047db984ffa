"""factory/dataset/export*.py and jobs/export_dataset.py: every export of a factory-built dataset, read
back with the consuming library's own reader (pycocotools, mmengine + mmcv, PIL).

mmsegmentation itself cannot be imported here (its datasets import mmcv's compiled ops,
which mmcv-lite lacks), so the mmseg layout is read with mmengine's config loader and mmcv's
image reader following BaseSegDataset.load_data_list's rules for an ``ann_file``.
"""

from __future__ import annotations

import io
import json
import os.path as osp
from pathlib import Path

import boto3
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from factory.core.vocab import COCO as COCO_VOCAB
from factory.core.vocab import VOC_NAMES
from factory.dataset.codec import decode_png, encode_image, encode_label, encode_mask
from factory.dataset.export import split_of
from factory.dataset.schema import SCHEMA
from jobs import export_dataset

REPO = Path(__file__).resolve().parents[2]


def dataset_rows(root: Path) -> dict[str, dict]:
    table = pq.read_table(root / "data")
    return {row["sample_id"]: row for row in table.to_pylist()}


def rgb(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def export(source, out, *extra) -> int:
    return export_dataset.main([str(source), "--out", str(out), "--val-fraction", "0.3", *extra])


# ---- pure parts ----------------------------------------------------------------------


def test_split_is_fixed_by_the_id_and_near_the_fraction():
    ids = [f"{i:07d}-abc" for i in range(4000)]
    splits = [split_of(i, 0.2) for i in ids]
    assert splits == [split_of(i, 0.2) for i in ids]
    assert abs(splits.count("val") / len(ids) - 0.2) < 0.03  # 5 standard deviations
    assert {split_of(i, 0.0) for i in ids} == {"train"}
    # a larger fraction only moves samples from train to val
    assert all(split_of(i, 0.3) == "val" for i, s in zip(ids, splits) if s == "val")


# ---- the factory's tiny dataset through every export ---------------------------------


@pytest.mark.slow
def test_mmseg_export_reads_back_with_mmengine_and_mmcv(tiny_dataset, tmp_path, capsys):
    import mmcv
    import mmengine
    from mmengine import Config

    out = tmp_path / "mmseg"
    assert export(tiny_dataset, out, "--format", "mmseg") == 0
    assert "export mmseg" in capsys.readouterr().out
    rows = dataset_rows(tiny_dataset)

    config = Config.fromfile(str(out / "maskformer_config.py"))  # the dataset config comes in as _base_
    head = config.model.decode_head
    assert config.model.type == "EncoderDecoder" and head.type == "MaskFormerHead"
    classes = ["background", *VOC_NAMES]
    assert head.num_classes == len(classes) and len(head.loss_cls.class_weight) == len(classes) + 1
    seen: dict[str, str] = {}
    for split, loader in (("train", config.train_dataloader), ("val", config.val_dataloader)):
        dataset = loader.dataset
        assert dataset.type == "BaseSegDataset" and dataset.data_root == str(out.resolve())
        assert list(dataset.metainfo.classes) == classes and len(dataset.metainfo.palette) == len(classes)
        assert dataset.reduce_zero_label is False and dataset.ignore_index == 255
        # BaseSegDataset.load_data_list with an ann_file: one name per line, prefix + name + suffix
        img_dir = osp.join(dataset.data_root, dataset.data_prefix.img_path)
        ann_dir = osp.join(dataset.data_root, dataset.data_prefix.seg_map_path)
        for name in mmengine.list_from_file(osp.join(dataset.data_root, dataset.ann_file)):
            seen[name] = split
            # LoadImageFromFile (cv2, BGR) and LoadAnnotations (pillow, unchanged) as mmseg reads them
            image = mmcv.imfrombytes(Path(osp.join(img_dir, name + dataset.img_suffix)).read_bytes())
            label = mmcv.imfrombytes(Path(osp.join(ann_dir, name + dataset.seg_map_suffix)).read_bytes(),
                                     flag="unchanged", backend="pillow")
            assert (image[..., ::-1] == rgb(rows[name]["image"]["bytes"])).all()
            assert (label == decode_png(rows[name]["label"]["bytes"])).all()
    assert seen == {i: split_of(i, 0.3) for i in rows}
    assert set(seen.values()) == {"train", "val"}  # 8 samples at 0.3: both splits have some
    metainfo = json.loads((out / "metainfo.json").read_text())
    assert metainfo["classes"] == classes and metainfo["palette"][1] == [128, 0, 0]  # VOC's aeroplane


@pytest.mark.slow
@pytest.mark.parametrize("per", ["instance", "class"])
def test_coco_export_reads_back_with_pycocotools(tiny_dataset, tmp_path, per):
    out = tmp_path / "coco"
    assert export(tiny_dataset, out, "--format", "coco", "--coco-masks", per) == 0
    check_coco(out, dataset_rows(tiny_dataset), per, {c: i for i, c in enumerate(VOC_NAMES, start=1)})


@pytest.mark.slow
def test_folders_export_reads_back_with_pil(tiny_dataset, tmp_path):
    out = tmp_path / "folders"
    assert export(tiny_dataset, out, "--format", "folders") == 0
    rows = dataset_rows(tiny_dataset)
    assert (out / "classes.txt").read_text().splitlines() == ["background", *VOC_NAMES]
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(rows)
    for sample_id, row in rows.items():
        assert (out / "images" / f"{sample_id}.png").read_bytes() == row["image"]["bytes"]
        mask = np.array(Image.open(out / "masks" / f"{sample_id}.png"))
        assert (mask == decode_png(row["label"]["bytes"])).all()
        assert set(np.unique(mask)) <= {0, 255, *row["class_indices"]}


@pytest.mark.slow
def test_export_from_s3_to_s3(tiny_dataset, tiny_dataset_on_s3, bucket, s3_endpoint, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    out = f"s3://{bucket}/exports/coco"
    assert export(tiny_dataset_on_s3, out, "--format", "coco") == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="exports/coco/")["Contents"]}
    rows = dataset_rows(tiny_dataset)
    assert {f"exports/coco/{split_of(i, 0.3)}/{i}.png" for i in rows} <= keys
    document = json.loads(s3.get_object(Bucket=bucket, Key="exports/coco/annotations/instances_train.json")
                          ["Body"].read())
    assert sorted(image["file_name"] for image in document["images"]) == \
        sorted(f"{i}.png" for i in rows if split_of(i, 0.3) == "train")
    capsys.readouterr()
    assert export(tiny_dataset_on_s3, out, "--format", "coco") == 2  # not empty now
    assert "--overwrite" in capsys.readouterr().err
    assert export(tiny_dataset_on_s3, "s3://no-such-bucket/x", "--format", "coco") == 2
    assert "does not exist" in capsys.readouterr().err


# ---- a hand-made COCO-vocabulary dataset: JPEG images, several regions per class ------


def blob(shape, box) -> np.ndarray:
    mask = np.zeros(shape, bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def coco_vocabulary_dataset(tmp_path) -> Path:
    """Three samples written with the factory's encoders and SCHEMA: two dogs (one mask of two
    regions) and a person; a person overlapping a chair; a missed class (empty mask)."""
    shape, rng = (32, 48), np.random.default_rng(1)
    dog, person, chair = (COCO_VOCAB.lookup(n) for n in ("dog", "person", "chair"))
    samples = [
        [(dog, blob(shape, (2, 2, 10, 12)) | blob(shape, (20, 30, 30, 44))), (person, blob(shape, (12, 14, 30, 24)))],
        [(person, blob(shape, (0, 0, 20, 20))), (chair, blob(shape, (10, 10, 32, 40)))],
        [(dog, np.zeros(shape, bool))],
    ]
    rows = []
    for n, classes in enumerate(samples):
        label = np.zeros(shape, np.uint8)
        for info, mask in classes:
            label[mask] = info.index
        rows.append({
            "sample_id": f"{n:07d}-handmade", "index": n, "prompt": "a photograph",
            "classes": [c.name for c, _ in classes], "class_words": [c.natural for c, _ in classes],
            "class_indices": [c.index for c, _ in classes], "seed": n,
            "image": {"bytes": encode_image(rng.integers(0, 255, (*shape, 3), np.uint8), "jpeg"), "path": None},
            "label": {"bytes": encode_label(label), "path": None},
            "masks": [{"bytes": encode_mask(mask), "path": None} for _, mask in classes],
            "scores": [0.9 if mask.any() else 0.0 for _, mask in classes],
            "instances": [int(mask.any()) for _, mask in classes], "found": [bool(mask.any()) for _, mask in classes],
            "width": shape[1], "height": shape[0], "generator": "hand", "labeler": "hand"})
    root = tmp_path / "handmade"
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "data" / "part-0.parquet")
    manifest = {"name": "handmade", "recipe": {"writer": {"image_format": "jpeg"}},
                "vocabulary": {"name": "coco"}, "plan": {"digest": "none"},
                "counts": {"planned": 3, "written": 3, "dropped": {}},
                "files": [{"path": "data/part-0.parquet", "rows": 3}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("per", ["instance", "class"])
def test_coco_export_of_coco_classes_uses_coco_ids(coco_vocabulary_dataset, tmp_path, per):
    out = tmp_path / "coco"
    assert export(coco_vocabulary_dataset, out, "--format", "coco", "--coco-masks", per) == 0
    rows = dataset_rows(coco_vocabulary_dataset)
    annotations = check_coco(out, rows, per, {c.name: c.coco_id for c in COCO_VOCAB.classes})
    # the dog mask of sample 0 is two regions: two instances, or one class annotation
    assert annotations[("0000000-handmade", "dog")] == (2 if per == "instance" else 1)
    assert annotations[("0000002-handmade", "dog")] == 0  # missed: no annotation


def check_coco(out: Path, rows: dict[str, dict], per: str, category_ids: dict[str, int]) -> dict:
    """Each split's JSON through pycocotools: images, categories, and masks equal to the dataset's."""
    counted = {}
    listed = set()
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())} == category_ids
        for image in coco.loadImgs(coco.getImgIds()):
            sample_id = Path(image["file_name"]).stem
            row = rows[sample_id]
            listed.add(sample_id)
            assert split_of(sample_id, 0.3) == split and image["id"] == row["index"]
            assert (rgb((out / split / image["file_name"]).read_bytes()) == rgb(row["image"]["bytes"])).all()
            for name, struct in zip(row["classes"], row["masks"]):
                mask = decode_png(struct["bytes"]).astype(bool)
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]], catIds=[category_ids[name]]))
                decoded = [coco.annToMask(ann).astype(bool) for ann in anns]
                union = np.logical_or.reduce(decoded) if decoded else np.zeros_like(mask)
                assert (union == mask).all()
                expected = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
                assert len(anns) == (expected if per == "instance" else int(mask.any()))
                assert all(ann["area"] == m.sum() and ann["iscrowd"] == 0 for ann, m in zip(anns, decoded))
                counted[(sample_id, name)] = len(anns)
    assert listed == set(rows)
    return counted


# ---- refusals ------------------------------------------------------------------------


def test_refuses_a_non_empty_target_unless_overwrite(coco_vocabulary_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(coco_vocabulary_dataset, out, "--format", "folders") == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export(coco_vocabulary_dataset, out, "--format", "folders", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "images", "masks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["handmade", "out"]  # no staging folder left


@pytest.mark.parametrize("args", [
    ["/nonexistent/dataset", "--format", "coco"],
    ["ftp://host/dataset", "--format", "coco"],
    ["DATASET", "--format", "coco", "--val-fraction", "1.5"],
])
def test_bad_input_is_one_line_and_exit_2(coco_vocabulary_dataset, tmp_path, capsys, args):
    out = tmp_path / "out"
    args = [str(coco_vocabulary_dataset) if a == "DATASET" else a for a in args]
    assert export_dataset.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export_dataset:") and len(err.splitlines()) == 1
    assert not out.exists()


def test_refuses_a_target_inside_the_dataset(coco_vocabulary_dataset, capsys):
    assert export(coco_vocabulary_dataset, coco_vocabulary_dataset / "export", "--format", "coco") == 2
    assert "overlaps" in capsys.readouterr().err
    assert not (coco_vocabulary_dataset / "export").exists()
