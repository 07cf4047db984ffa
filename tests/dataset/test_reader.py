"""The readers on a tiny dataset built by the factory, from a local folder and from S3:
the PyTorch map-style and iterable datasets, the Ray Data reader, and Hugging Face
`datasets` through the features the Parquet files carry.

Every expected value is read straight from the Parquet files with pyarrow and PIL.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factory.dataset.reader import IterableSegmentationDataset, SegmentationDataset, huggingface_features, read_dataset
from factory.dataset.source import DatasetError, DatasetSource

pytestmark = pytest.mark.slow  # the tiny dataset is built by the real job on the local Ray cluster


def stored_rows(path) -> dict[str, dict]:
    """sample_id -> the row as stored, image and label decoded by PIL directly."""
    rows = {}
    for part in sorted(path.glob("data/*.parquet")):
        for row in pq.read_table(part).to_pylist():
            row["image"] = np.array(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
            row["label"] = np.array(Image.open(io.BytesIO(row["label"]["bytes"])))
            rows[row["sample_id"]] = row
    return rows


@pytest.fixture(scope="module")
def expected(tiny_dataset):
    rows = stored_rows(tiny_dataset)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert len(rows) == manifest["counts"]["written"] > 0
    return rows


def check_sample(sample: dict, expected: dict) -> None:
    row = expected[sample["sample_id"]]
    assert sample["image"].dtype == torch.uint8 and sample["label"].dtype == torch.int64
    assert sample["image"].shape == (row["height"], row["width"], 3)
    assert np.array_equal(sample["image"].numpy(), row["image"])
    assert np.array_equal(sample["label"].numpy(), row["label"].astype(np.int64))
    assert sample["index"] == row["index"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_map_style_dataset(where, tiny_dataset, expected, request):
    uri = str(tiny_dataset) if where == "local" else request.getfixturevalue("tiny_dataset_on_s3")
    ds = SegmentationDataset(uri)
    assert len(ds) == len(expected)
    samples = [ds[i] for i in range(len(ds))]
    assert sorted(s["sample_id"] for s in samples) == sorted(expected)
    for sample in samples:
        check_sample(sample, expected)
    assert ds[-1]["sample_id"] == samples[-1]["sample_id"]
    with pytest.raises(IndexError):
        ds[len(ds)]

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # default collate
    assert batch["image"].shape == (4, *samples[0]["image"].shape) and batch["label"].shape[0] == 4


def test_map_style_columns_and_transform(tiny_dataset, expected):
    def to_float(sample):
        return sample["image"].permute(2, 0, 1).float() / 255, sample["masks"], sample["classes"]

    ds = SegmentationDataset(tiny_dataset, columns=["sample_id", "image", "masks", "classes"], transform=to_float)
    image, masks, classes = ds[0]
    first = expected[pq.read_table(sorted(tiny_dataset.glob("data/*.parquet"))[0]).column("sample_id")[0].as_py()]
    assert image.shape == (3, first["height"], first["width"]) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert classes == first["classes"] and masks.dtype == torch.bool and masks.shape[0] == len(classes)


def ids_of(loader) -> Counter:
    return Counter(sample["sample_id"] for sample in loader)


def test_iterable_dataset_two_workers_each_sample_once(tiny_dataset, expected):
    ds = IterableSegmentationDataset(tiny_dataset)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert ids_of(loader) == Counter(list(expected))  # every id exactly once

    # Two ranks of two workers each: four readers, still every sample once.
    seen = Counter()
    for rank in range(2):
        ranked = IterableSegmentationDataset(tiny_dataset, rank=rank, world_size=2)
        ids = ids_of(torch.utils.data.DataLoader(ranked, batch_size=None, num_workers=2))
        assert sum(ids.values()) == len(ranked) and abs(len(ranked) - len(expected) / 2) <= 1  # balanced ranks
        seen += ids
    assert seen == Counter(list(expected))


def test_iterable_dataset_shuffles_per_epoch(tiny_dataset, expected):
    ds = IterableSegmentationDataset(tiny_dataset, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append([s["sample_id"] for s in ds])
    assert all(Counter(order) == Counter(list(expected)) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # not one fixed order
    ds.set_epoch(1)
    assert [s["sample_id"] for s in ds] == orders[1]  # reproducible from seed and epoch
    for sample in ds:
        check_sample(sample, expected)


def test_iterable_dataset_from_s3(tiny_dataset_on_s3, expected):
    ds = IterableSegmentationDataset(tiny_dataset_on_s3)
    samples = list(ds)
    assert Counter(s["sample_id"] for s in samples) == Counter(list(expected))
    for sample in samples:
        check_sample(sample, expected)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ray_data_reader(where, tiny_dataset, expected, request):
    uri = str(tiny_dataset) if where == "local" else request.getfixturevalue("tiny_dataset_on_s3")
    rows = read_dataset(uri, columns=["sample_id", "image", "label", "masks", "classes"]).take_all()
    assert sorted(row["sample_id"] for row in rows) == sorted(expected)
    for row in rows:
        stored = expected[row["sample_id"]]
        assert row["image"].dtype == np.uint8 and np.array_equal(row["image"], stored["image"])
        assert row["label"].dtype == np.uint8 and np.array_equal(row["label"], stored["label"])
        assert row["masks"].dtype == bool and row["masks"].shape == (len(stored["classes"]), *stored["label"].shape)


def test_missing_or_unfinished_dataset_is_one_line_error(tmp_path):
    with pytest.raises(DatasetError, match="manifest.json not found") as error:
        SegmentationDataset(str(tmp_path / "nothing"))
    assert "\n" not in str(error.value)


def test_parquet_carries_huggingface_features(tiny_dataset):
    import datasets

    schema = pq.read_schema(sorted(tiny_dataset.glob("data/*.parquet"))[0])
    features = datasets.Features.from_arrow_schema(schema)
    assert features["image"] == datasets.Image() and features["label"] == datasets.Image()
    assert features["masks"] == datasets.List(datasets.Image())
    assert features["classes"] == datasets.List(datasets.Value("string"))
    assert features["scores"] == datasets.List(datasets.Value("float32"))
    assert b"dataset-factory" in schema.metadata  # the build's own metadata is kept beside it


def check_hf(ds, expected) -> None:
    import datasets

    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    assert sorted(ds["sample_id"]) == sorted(expected)
    for row in ds:
        stored = expected[row["sample_id"]]
        assert row["label"].mode == "P" and np.array_equal(np.array(row["label"]), stored["label"])
        assert np.array_equal(np.array(row["image"].convert("RGB")), stored["image"])
        assert len(row["masks"]) == len(stored["classes"]) and row["masks"][0].mode == "1"


def test_huggingface_load_dataset_local(tiny_dataset, expected, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(tiny_dataset / "data" / "*.parquet"), split="train",
                      cache_dir=str(tmp_path / "hf"))
    check_hf(ds, expected)


def test_huggingface_load_dataset_from_s3(tiny_dataset_on_s3, expected, s3_endpoint, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=f"{tiny_dataset_on_s3}/data/*.parquet", split="train",
                      storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}},
                      cache_dir=str(tmp_path / "hf"))
    check_hf(ds, expected)


def test_features_for_datasets_written_before_the_metadata(tiny_dataset, expected, tmp_path):
    """Files without the Hugging Face metadata: `huggingface_features` gives the same features."""
    import shutil

    import datasets

    old = tmp_path / "old"
    shutil.copytree(tiny_dataset, old)
    for part in old.glob("data/*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items()
                                                      if k != b"huggingface"}), part)
    plain = datasets.load_dataset("parquet", data_files=str(old / "data" / "*.parquet"), split="train",
                         cache_dir=str(tmp_path / "hf-plain"))
    assert not isinstance(plain.features["image"], datasets.Image)  # what the metadata is for
    ds = datasets.load_dataset("parquet", data_files=str(old / "data" / "*.parquet"), split="train",
                      features=huggingface_features(DatasetSource.open(str(old))), cache_dir=str(tmp_path / "hf"))
    check_hf(ds, expected)


def test_supervised_classes_come_from_the_manifest(tiny_dataset, tmp_path):
    source = DatasetSource.open(str(tiny_dataset))
    assert source.manifest["labels"]["kind"] == "oracle"  # the tiny Mask R-CNN labels every class it knows
    assert source.supervised_classes == frozenset(source.vocabulary.names)
    older = tmp_path / "older"
    older.mkdir()
    manifest = {key: value for key, value in source.manifest.items() if key != "labels"}
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="does not record which labeler was trained on which class"):
        _ = DatasetSource.open(str(older)).supervised_classes
