"""Checkpoint pieces shared by the training jobs: optimizer state as safetensors + JSON."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state_dict -> safetensors tensors ("<param>.<name>") and JSON (scalars such as
    Adam's step counter, and the param groups): no pickle."""
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
