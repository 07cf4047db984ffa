"""Where models run: CUDA with half precision when a GPU is visible, CPU otherwise."""

from __future__ import annotations

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU, so "cuda" is that GPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device, gpu: str = "float16") -> torch.dtype:
    """'auto' is ``gpu`` on CUDA (float16, what SD 1.x was trained for; bfloat16 for the models trained in it)
    and float32 on CPU."""
    if name == "auto":
        return _DTYPES[gpu] if device.type == "cuda" else torch.float32
    return _DTYPES[name]
