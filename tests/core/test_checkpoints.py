"""The one checkpoint format (factory/core/checkpoints.py), local and on S3."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import torch
from torch import nn

from factory.core.checkpoints import (
    CheckpointError,
    check_same_run,
    is_intact,
    load_optimizer_state,
    read_checkpoint_metadata,
    read_tensors,
    save_checkpoint,
)

KIND = "test-checkpoint/1"


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_and_the_files_it_writes(tmp_path):
    model, optimizer = model_and_optimizer()
    uri = str(tmp_path / "last")
    save_checkpoint(uri, KIND, 7, model, optimizer, {"note": "first"})
    assert sorted(p.name for p in Path(uri).iterdir()) == [
        "checkpoint.json", "model-00000007.safetensors", "optimizer-00000007.safetensors"]
    metadata = read_checkpoint_metadata(uri, KIND)
    assert metadata["note"] == "first" and metadata["format"] == KIND and is_intact(uri, metadata)
    weights = read_tensors(uri, metadata, "model")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    load_optimizer_state(uri, fresh, metadata)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_later_save_replaces_the_files_and_an_interrupted_one_leaves_the_last_whole(tmp_path):
    model, optimizer = model_and_optimizer()
    uri = str(tmp_path / "last")
    save_checkpoint(uri, KIND, 1, model, optimizer, {})
    save_checkpoint(uri, KIND, 2, model, None, {})
    assert sorted(p.name for p in Path(uri).iterdir()) == ["checkpoint.json", "model-00000002.safetensors"]
    # Killed after writing its weights, before its checkpoint.json: step 2 is still what is read.
    (Path(uri) / "model-00000003.safetensors").write_bytes(b"half")
    metadata = read_checkpoint_metadata(uri, KIND)
    assert metadata["files"]["model"]["name"] == "model-00000002.safetensors" and is_intact(uri, metadata)


def test_damage_and_other_formats_are_refused(tmp_path):
    model, _ = model_and_optimizer()
    uri = str(tmp_path / "ck")
    save_checkpoint(uri, KIND, 1, model, None, {})
    metadata = read_checkpoint_metadata(uri, KIND)
    (Path(uri) / "model-00000001.safetensors").write_bytes(b"other bytes")
    assert not is_intact(uri, metadata)
    with pytest.raises(CheckpointError, match="does not match its checkpoint.json"):
        read_tensors(uri, metadata, "model")
    with pytest.raises(CheckpointError, match="is not a other-checkpoint/1 checkpoint"):
        read_checkpoint_metadata(uri, "other-checkpoint/1")
    with pytest.raises(CheckpointError, match="no readable checkpoint at"):
        read_checkpoint_metadata(str(tmp_path / "none"), KIND)
    (Path(uri) / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        read_checkpoint_metadata(uri, KIND)


def test_on_s3(bucket, s3_endpoint):
    model, optimizer = model_and_optimizer()
    uri = f"s3://{bucket}/runs/a/last"
    save_checkpoint(uri, KIND, 1, model, optimizer, {})
    save_checkpoint(uri, KIND, 2, model, optimizer, {})
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow keeps folder markers
    assert keys == ["runs/a/last/checkpoint.json", "runs/a/last/model-00000002.safetensors",
                    "runs/a/last/optimizer-00000002.safetensors"]
    assert is_intact(uri, read_checkpoint_metadata(uri, KIND))


def test_only_the_same_run_resumes():
    check_same_run("out", {"data": "a", "epochs": 3}, {"data": "a", "epochs": 5}, ("data",))
    with pytest.raises(CheckpointError) as error:
        check_same_run("out", {"data": "a", "split": 1}, {"data": "b", "split": 2}, ("data", "split"))
    assert str(error.value) == ('out holds a run with different data, split (data: "a" there, "b" here); '
                                "use another --out or the same settings")
    # a nested setting is named down to its leaf: a path resolved in another checkout shows at once
    saved = {"model": {"preset": "world", "backbone_weights": "/old/models/backbone"}}
    moved = {"model": {"preset": "world", "backbone_weights": "/new/models/backbone"}}
    with pytest.raises(CheckpointError, match='different model [(]model.backbone_weights: "/old/models/backbone" '
                                              'there, "/new/models/backbone" here[)]'):
        check_same_run("out", saved, moved, ("model",))
    with pytest.raises(CheckpointError, match='[(]model.head: null there, "closed" here[)]'):
        check_same_run("out", saved, {"model": {**saved["model"], "head": "closed"}}, ("model",))
