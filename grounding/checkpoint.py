"""The grounding module's checkpoints, in the project's one checkpoint format
(``factory.core.checkpoints``); reading one never imports a trainer.

Besides the weights, checkpoint.json holds what the module was trained on: the epoch and
metrics, the model and text config, the generator, the capture step and the vocabulary of
its training data, and the trained classes.
"""

from __future__ import annotations

import torch

from factory.core.checkpoints import METADATA_FILE, is_intact, read_checkpoint_metadata, read_tensors, save_checkpoint
from factory.core.storage import Location
from grounding.config import GroundingModelConfig
from grounding.model import GroundingModule

FORMAT = "grounding-checkpoint/2"


def save_grounding_checkpoint(uri: str, module: GroundingModule, optimizer: torch.optim.Optimizer | None,
                              metadata: dict) -> None:
    """`metadata` must hold "epoch" (it names the weight files)."""
    save_checkpoint(uri, FORMAT, metadata["epoch"], module, optimizer,
                    {**metadata, "model": module.config.model_dump(mode="json")})


def read_grounding_metadata(uri: str) -> dict:
    return read_checkpoint_metadata(uri, FORMAT)


def load_grounding_checkpoint(uri: str) -> tuple[GroundingModule, dict]:
    """The trained module (eval mode, CPU) and its checkpoint.json."""
    metadata = read_grounding_metadata(uri)
    module = GroundingModule(GroundingModelConfig.model_validate(metadata["model"]))
    module.load_state_dict(read_tensors(uri, metadata, "model"))
    return module.eval(), metadata


def resume_point(location: Location) -> tuple[str, dict] | None:
    """The checkpoint a rerun continues from: last/, or best/ when last/ is damaged (a file
    no longer matches its checkpoint.json)."""
    for name in ("last", "best"):
        if not location.exists(f"{name}/{METADATA_FILE}"):
            continue
        metadata = read_grounding_metadata(location.url(name))
        if is_intact(location.url(name), metadata):
            return name, metadata
    return None
