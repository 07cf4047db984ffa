"""The labelers a recipe's ``labeler.model`` may name: each registered here by its import.

A new labeler is a module with a ``Labeler`` subclass (``base``) and one line in ``LABELERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.core.vocab import Vocabulary
from factory.pipeline.labelers.base import Labeler
from factory.pipeline.labelers.maskrcnn import MaskRCNN
from factory.pipeline.labelers.open_vocabulary import OpenVocabulary

if TYPE_CHECKING:  # annotations only: torch loads in the model actor; the section imports this registry
    import torch

    from factory.detection.detections import Detector
    from factory.pipeline.sections import LabelerConfig

LABELERS: dict[str, Labeler] = {name: labeler for labeler in (
    MaskRCNN(),
    OpenVocabulary(),
) for name in labeler.names}


def labeler_of(model: str) -> Labeler:
    """The registered labeler named ``model`` (``labeler.model``; ValueError naming the choices)."""
    try:
        return LABELERS[model]
    except KeyError:
        raise ValueError(f"unknown labeler {model!r} (choices: {', '.join(LABELERS)})") from None


def load_detector(config: LabelerConfig, vocabulary: Vocabulary, image_size: int, device: torch.device) -> Detector:
    """The labeler's models on ``device``, as a detector (in the model actor)."""
    return labeler_of(config.model).load(config, vocabulary, image_size, device)
