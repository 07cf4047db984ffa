"""Shared fixtures: one local Ray cluster and one S3 endpoint (moto, loopback) per session, a tiny
finished dataset, and small real-format VOC and COCO evaluation sets."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

# Each pytest-xdist worker gets its share of the cores for torch's and numpy's thread pools (set
# before either loads; the jobs the tests start inherit it): two workers of two threads each on
# two cores spin against each other, which doubled the fast tier's diffusion tests here.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

import numpy as np  # noqa: E402 (after the thread count)
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from factory.core import storage  # noqa: E402
from factory.dataset.codec import encode_label  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server on 127.0.0.1, reached through the same client code as AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION")}
    # Set before Ray starts so that its workers inherit them, as nodes of a real cluster
    # inherit their instance credentials.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    storage.s3_filesystem.cache_clear()
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.s3_filesystem.cache_clear()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray cluster shared by the end-to-end tests (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# A small finished dataset: 8 one-object and two-object samples in 3 parts, preview on.
TINY_BUILD = ["--recipe", "tiny", "--num-samples", "8", "--per-class", "0", "--generator.steps", "2", "--generator.batch-size", "4",
              "--labeler.batch-size", "4", "--writer.rows-per-file", "3", "--writer.preview-samples", "4"]


@pytest.fixture(scope="session")
def tiny_dataset(ray_cluster, tmp_path_factory):
    """Built once per session by the real job on the local Ray cluster; treat it as read-only."""

    from jobs import build_dataset

    out = tmp_path_factory.mktemp("tiny-dataset") / "ds"
    assert build_dataset.main(["--out", str(out), *TINY_BUILD]) == 0
    return out


@pytest.fixture
def tiny_dataset_on_s3(tiny_dataset, bucket) -> str:
    """The tiny dataset copied to a fresh bucket with pyarrow (as `aws s3 sync` would); its URI."""
    import pyarrow.fs as pafs

    uri = f"s3://{bucket}/datasets/tiny"
    location = storage.open_location(uri)
    pafs.copy_files(str(tiny_dataset), location.root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=location.fs)
    return uri


@pytest.fixture
def faulty_s3(s3_endpoint):
    """A fault-injecting proxy in front of the session's S3 endpoint (tests/s3_faults.py)."""
    from s3_faults import FaultyEndpoint

    endpoint = FaultyEndpoint(s3_endpoint)
    yield endpoint
    endpoint.stop()


# ------------------------------------------- real-format evaluation sets (VOC, COCO)

def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def voc_eval_root(tmp_path_factory) -> Path:
    """Five VOC images of different sizes: boxes of classes in 255 borders on background."""
    return write_voc_root(tmp_path_factory.mktemp("voc") / "VOCdevkit" / "VOC2012", classes=20)


def write_voc_root(root: Path, classes: int) -> Path:
    """Five images in VOC's layout, each with boxes of two of the label indices 1..classes."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for n, (height, width) in enumerate([(40, 56), (56, 40), (36, 36), (44, 64), (30, 50)]):
        image_id = f"2007_{n:06d}"
        label = np.zeros((height, width), np.uint8)
        for index in rng.choice(np.arange(1, classes + 1), size=2, replace=False):
            top, left = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 12))
            label[top:top + 12, left:left + 12] = 255
            label[top + 2:top + 10, left + 2:left + 10] = index
        Image.fromarray(random_image(rng, height, width)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_label(label))
        ids.append(image_id)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture(scope="session")
def coco_eval_root(tmp_path_factory) -> Path:
    """Three COCO images with polygon annotations under official ids: person 1, dog 18, chair 62,
    mouse 74 (dropped from the vocabulary: its pixels are ignored)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(1)
    images, annotations = [], []
    boxes = {139: [(1, 4, 4, 30, 24), (74, 20, 20, 40, 36)], 285: [(18, 2, 10, 26, 40)], 632: [(62, 6, 6, 20, 20)]}
    for image_id, objects in boxes.items():
        height, width = 44, 52
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(random_image(rng, height, width)).save(root / "val2017" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category_id, x0, y0, x1, y1 in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": (x1 - x0) * (y1 - y0),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in
                  ((1, "person"), (18, "dog"), (62, "chair"), (74, "mouse"))]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root
