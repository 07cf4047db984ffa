"""The docs' "Using a dataset" examples (docs/dataset-format.md), run as written on a dataset the factory built.

Every fenced ```python block of that section runs in a folder where `outputs/tiny` is the
tiny dataset; its S3 examples read a copy in a test bucket (`s3://my-bucket/datasets/tiny`
becomes that bucket). Each block's results are then checked against the Parquet files, and
a block without a check fails the test, so the docs cannot rot.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # the tiny dataset is built by the real job on the local Ray cluster

PAGE = Path(__file__).resolve().parent.parent / "docs" / "dataset-format.md"
PAGE_BUCKET = "s3://my-bucket/datasets/tiny"


def section_blocks(heading: str = "## Using a dataset") -> list[str]:
    text = PAGE.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


def check_pandas(ns, rows):
    assert sorted(ns["df"].sample_id) == sorted(r["sample_id"] for r in rows)
    assert list(ns["df"].columns) == ["sample_id", "prompt", "classes", "scores", "label"]


def check_duckdb(ns, rows):
    expected = Counter(c for r in rows for c in r["classes"])
    assert dict(zip(ns["per_class"]["class"], ns["per_class"]["samples"])) == expected


def check_huggingface(ns, rows):
    ds, by_id = ns["ds"], {r["sample_id"]: r for r in rows}
    assert sorted(ds["sample_id"]) == sorted(by_id)
    first = ds[0]
    assert first["label"].mode == "P" and first["image"].size == (first["width"], first["height"])
    stored = Image.open(io.BytesIO(by_id[first["sample_id"]]["label"]["bytes"]))
    assert np.array_equal(np.array(first["label"]), np.array(stored))


def check_torch(ns, rows):
    ds, loader = ns["ds"], ns["loader"]
    assert len(ds) == len(rows) and ds[0]["label"].dtype == torch.int64
    ids = [i for batch in loader for i in batch["sample_id"]]
    assert Counter(ids) == Counter(r["sample_id"] for r in rows)  # two workers, each sample once
    assert next(iter(loader))["image"].shape == (4, rows[0]["height"], rows[0]["width"], 3)


def check_ray(ns, rows):
    taken = ns["rows"].take_all()
    assert sorted(r["sample_id"] for r in taken) == sorted(r["sample_id"] for r in rows)
    assert taken[0]["image"].shape == (rows[0]["height"], rows[0]["width"], 3)
    assert taken[0]["masks"].dtype == bool


# What each example is recognised by, and what it must produce.
CHECKS = {"import pandas": check_pandas, "import duckdb": check_duckdb, "from datasets import": check_huggingface,
          "from factory.dataset.reader import IterableSegmentationDataset": check_torch,
          "from factory.dataset.reader import read_dataset": check_ray}


def check_for(block: str):
    matches = [check for marker, check in CHECKS.items() if marker in block]
    assert len(matches) == 1, f"docs example without exactly one check in {__file__}:\n{block}"
    return matches[0]


def test_section_has_every_reader():
    blocks = section_blocks()
    assert {check_for(block) for block in blocks} == set(CHECKS.values())
    assert any(PAGE_BUCKET in block for block in blocks)  # the S3 example


def test_docs_examples_run(tiny_dataset, tiny_dataset_on_s3, bucket, tmp_path, monkeypatch):
    import datasets

    s3_uri = tiny_dataset_on_s3
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "tiny").symlink_to(tiny_dataset)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [row for part in sorted(tiny_dataset.glob("data/*.parquet")) for row in pq.read_table(part).to_pylist()]

    for block in section_blocks():
        namespace: dict = {}
        exec(compile(block.replace(PAGE_BUCKET, s3_uri), str(PAGE), "exec"), namespace)  # noqa: S102
        check_for(block)(namespace, rows)
