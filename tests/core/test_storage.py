import os
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import torch
from safetensors.torch import save_file

from factory.core.conventions import TINY
from factory.core.storage import (
    StorageError,
    absolute_model_source,
    check_model_source,
    check_reachable,
    local_copy,
    open_location,
)
from factory.detection.maskrcnn import build_maskrcnn
from factory.diffusion.pipelines import generate, load_pipeline
from factory.diffusion.tiny import tiny_pipeline
from factory.pipeline import ray_executor
from factory.pipeline.recipe import load_recipe


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_local_model_paths_are_made_absolute_for_the_actors(tmp_path, monkeypatch):
    (tmp_path / "models" / "gen").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert absolute_model_source("models/gen") == str(tmp_path / "models" / "gen")
    for kept in ("org/model-id", "s3://bucket/model", "tiny", None):  # ids, S3 and built-ins stay as named
        assert absolute_model_source(kept) == kept


def test_local_writes_are_atomic_and_listing_skips_temporaries(tmp_path):
    location = open_location(str(tmp_path / "out"))
    location.write_bytes("data/a.bin", b"1")
    location.write_bytes("data/a.bin", b"22")  # replaced whole
    (tmp_path / "out" / "data" / ".b.bin.123.tmp").write_bytes(b"half")
    assert location.read_bytes("data/a.bin") == b"22"
    assert location.list("data") == ["data/a.bin"]
    assert location.remove_temporaries("data") == 1
    assert sorted(os.listdir(tmp_path / "out" / "data")) == ["a.bin"]
    assert location.list("missing") == []


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="is not a writable folder"):
        check_reachable(str(tmp_path / "a-file" / "ds"))


def test_bad_uris():
    with pytest.raises(StorageError, match="expected s3://bucket/prefix"):
        open_location("s3:///nobucket")
    with pytest.raises(StorageError, match="unsupported URI"):
        open_location("gs://bucket/x")


def test_s3_round_trip_through_the_aws_client_code(bucket, s3_endpoint):
    location = check_reachable(f"s3://{bucket}/some/prefix")
    location.write_bytes("data/x.json", b"{}")
    assert location.exists("data/x.json") and not location.exists("data/y.json")
    assert location.list("data", ".json") == ["data/x.json"]
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key="some/prefix/data/x.json")
    assert body["Body"].read() == b"{}"


def test_model_sources_must_exist(tmp_path, bucket):
    with pytest.raises(StorageError, match="model not found"):
        check_model_source(str(tmp_path / "sd"), "model_index.json")
    with pytest.raises(StorageError, match="model not found"):
        check_model_source(f"s3://{bucket}/models/sd", "model_index.json")
    check_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5", "model_index.json")  # hub ids: left to the hub


def test_generator_loads_by_local_path_and_by_s3_prefix(tmp_path, bucket, s3_endpoint, monkeypatch):
    """The real-model path: a pipeline saved with diffusers' own save_pretrained, read back."""
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(folder)
    assert list(folder.rglob("*.safetensors"))
    upload_folder(boto3.client("s3", endpoint_url=s3_endpoint), folder, bucket, "models/tiny-sd")
    check_model_source(f"s3://{bucket}/models/tiny-sd", "model_index.json")

    args = dict(steps=3, guidance_scale=5.0, height=64, width=64)
    expected = generate(tiny_pipeline().to("cpu"), ["a photograph of a dog"], [5], **args)
    for source in (str(folder), f"s3://{bucket}/models/tiny-sd"):
        np.testing.assert_array_equal(generate(load_pipeline(source), ["a photograph of a dog"], [5], **args),
                                      expected)
    assert (Path(local_copy(f"s3://{bucket}/models/tiny-sd")) / "model_index.json").is_file()  # cached once


def test_detector_weights_load_from_s3(tmp_path, bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    reference = build_maskrcnn(TINY, 64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.01)  # differ from the seeded initial weights
    path = tmp_path / "maskrcnn.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(path), bucket, "models/maskrcnn.safetensors")
    loaded = build_maskrcnn(TINY, 64, weights=f"s3://{bucket}/models/maskrcnn.safetensors")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_gpu_clusters_get_one_gpu_per_model_actor(monkeypatch):
    tiny = load_recipe("tiny")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert ray_executor.accelerator_resources(tiny) == {"num_cpus": 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert ray_executor.accelerator_resources(tiny) == {"num_gpus": 1, "num_cpus": 1}
    # real models ask for GPUs even before an autoscaler has started any GPU node
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    real = load_recipe("voc-oracle-one")
    assert ray_executor.accelerator_resources(real) == {"num_gpus": 1, "num_cpus": 1}
