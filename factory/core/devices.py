"""Where models run: CUDA with half precision when a GPU is visible, CPU otherwise."""

from __future__ import annotations

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU, so "cuda" is that GPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (what SD 1.x was trained for) and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
