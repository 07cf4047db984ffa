"""The segmenter's checkpoints, in the project's one checkpoint format (``factory.core.checkpoints``):
checkpoint.json holds the model config and the caller's metadata (iteration, vocabulary, setting,
split, ...)."""

from __future__ import annotations

import torch

from factory.core.checkpoints import read_checkpoint_metadata, read_tensors, save_checkpoint
from segmenter.config import SegmenterModelConfig
from segmenter.model import Segmenter

FORMAT = "segmenter-checkpoint/1"


def save_segmenter_checkpoint(uri: str, model: Segmenter, optimizer: torch.optim.Optimizer | None,
                              metadata: dict) -> None:
    """`metadata` must hold "iteration" (it names the weight files); the rest (vocabulary,
    setting, split, seen, unseen, ...) is stored as given."""
    save_checkpoint(uri, FORMAT, metadata["iteration"], model, optimizer,
                    {**metadata, "model": model.config.model_dump(mode="json")})


def read_segmenter_metadata(uri: str) -> dict:
    return read_checkpoint_metadata(uri, FORMAT)


def load_segmenter_checkpoint(uri: str) -> tuple[Segmenter, dict]:
    """The segmenter (eval mode, CPU) and its checkpoint.json: iteration, model config,
    vocabulary {name, classes: [{index, name, natural}]}, setting, split, seen, unseen, train config."""
    metadata = read_segmenter_metadata(uri)
    model = Segmenter(SegmenterModelConfig.model_validate(metadata["model"]))
    model.load_state_dict(read_tensors(uri, metadata, "model"))
    return model.eval(), metadata
