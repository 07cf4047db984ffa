"""One checkpoint format for every trained model (the grounding module, the segmenter).

A checkpoint is a folder, local or s3:// (``factory.core.storage``):

    model-<step>.safetensors       the weights
    optimizer-<step>.safetensors   the optimizer's state tensors (optional)
    checkpoint.json                written last: the format, the caller's metadata, the
                                   optimizer's scalars, and each file's name and sha256

Nothing is pickled. A reader trusts only what checkpoint.json names, and checks each file's
checksum. A save interrupted before its checkpoint.json leaves the previous checkpoint whole
(its files have other step numbers); files that checkpoint.json no longer names are deleted
after it is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection

import safetensors.torch
import torch
from torch import Tensor, nn

from factory.core.errors import FactoryError
from factory.core.storage import first_line, open_location

METADATA_FILE = "checkpoint.json"


class CheckpointError(FactoryError, RuntimeError):
    """A checkpoint that cannot be read or resumed; the message is one line."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state_dict -> safetensors tensors ("<param>.<name>") and JSON (scalars such as
    Adam's step counter, and the param groups)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value.item() if torch.is_tensor(value) else value
    return tensors, {"state": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: dict[str, Tensor], saved: dict) -> dict:
    # Optimizers turn plain-number step counters back into tensors when loading.
    state: dict[int, dict] = {int(index): dict(values) for index, values in saved["state"].items()}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}


def save_checkpoint(uri: str, kind: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    metadata: dict) -> None:
    """Write a checkpoint of format `kind` (e.g. "grounding-checkpoint/1") at training `step`."""
    location = open_location(uri)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files = {"model": (f"model-{step:08d}.safetensors", safetensors.torch.save(weights))}
    metadata = {**metadata, "format": kind}
    if optimizer is not None:
        tensors, metadata["optimizer"] = flatten_optimizer(optimizer.state_dict())
        files["optimizer"] = (f"optimizer-{step:08d}.safetensors", safetensors.torch.save(tensors))
    for name, data in files.values():
        location.write_bytes(name, data)
    metadata["files"] = {role: {"name": name, "sha256": sha256(data)} for role, (name, data) in files.items()}
    location.write_bytes(METADATA_FILE, json.dumps(metadata, indent=2).encode())
    current = {name for name, _ in files.values()}
    for path in location.list("", ".safetensors"):
        if path.rsplit("/", 1)[-1] not in current:
            location.delete(path.rsplit("/", 1)[-1])


def read_checkpoint_metadata(uri: str, kind: str) -> dict:
    """A checkpoint's checkpoint.json; CheckpointError when there is none of format `kind`."""
    location = open_location(uri)
    try:
        metadata = json.loads(location.read_bytes(METADATA_FILE))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no readable checkpoint at {uri}: {type(exc).__name__}: {first_line(exc)}") from None
    if metadata.get("format") != kind:
        raise CheckpointError(f"{uri}/{METADATA_FILE} is not a {kind} checkpoint")
    return metadata


def read_tensors(uri: str, metadata: dict, role: str) -> dict[str, Tensor]:
    """The tensors of one file ("model" or "optimizer") that checkpoint.json names, checksum checked."""
    entry = metadata["files"][role]
    try:
        data = open_location(uri).read_bytes(entry["name"])
    except OSError as exc:
        raise CheckpointError(f"cannot read {uri}/{entry['name']}: {first_line(exc)}") from None
    if sha256(data) != entry["sha256"]:
        raise CheckpointError(f"{uri}/{entry['name']} does not match its {METADATA_FILE}")
    return safetensors.torch.load(data)


def is_intact(uri: str, metadata: dict) -> bool:
    """Whether every file the checkpoint names is there with its checksum."""
    try:
        for role in metadata["files"]:
            read_tensors(uri, metadata, role)
    except CheckpointError:
        return False
    return True


def load_optimizer_state(uri: str, optimizer: torch.optim.Optimizer, metadata: dict) -> None:
    optimizer.load_state_dict(unflatten_optimizer(read_tensors(uri, metadata, "optimizer"), metadata["optimizer"]))


def check_same_run(out: str, saved: dict, now: dict, identity: Collection[str]) -> None:
    """A rerun resumes only the same experiment: the `identity` settings of the saved training
    config must equal this run's (others, such as the iteration count, may change)."""
    changed = [key for key in identity if saved.get(key) != now.get(key)]
    if changed:
        first = _first_difference(changed[0], saved.get(changed[0]), now.get(changed[0]))
        raise CheckpointError(f"{out} holds a run with different {', '.join(changed)} ({first}); "
                              f"use another --out or the same settings")


def _first_difference(name: str, saved: object, now: object) -> str:
    """'model.backbone_weights: "/a" there, "/b" here': the first setting under `name` that differs, so that
    a path resolved elsewhere (another checkout, another working directory) is seen at once."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(key for key in now if key not in saved)]:
            if saved.get(key) != now.get(key):
                return _first_difference(f"{name}.{key}", saved.get(key), now.get(key))
    return f"{name}: {json.dumps(saved, default=str)} there, {json.dumps(now, default=str)} here"
