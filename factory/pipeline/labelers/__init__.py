"""The labelers a build may use, each registered here by its import; ``labeler_for`` picks a recipe's.

A new labeler is a module with a ``Labeler`` subclass (``base``) and one line in ``LABELERS``, the
choices of ``labeler.model``. The grounding annotator, DAAM and a real source's masks are chosen by
the recipe's annotator and source sections instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.core.vocab import Vocabulary
from factory.pipeline.labelers.base import Labeler
from factory.pipeline.labelers.daam import DAAM
from factory.pipeline.labelers.grounding import Grounding
from factory.pipeline.labelers.maskrcnn import MaskRCNN
from factory.pipeline.labelers.masks import RealMasks
from factory.pipeline.labelers.open_vocabulary import OpenVocabulary

if TYPE_CHECKING:  # annotations only: torch loads in the model actor; the section imports this registry
    import torch

    from factory.detection.detections import Detector
    from factory.pipeline.recipe import Recipe
    from factory.pipeline.sections import LabelerConfig

LABELERS: dict[str, Labeler] = {name: labeler for labeler in (
    MaskRCNN(),
    OpenVocabulary(),
) for name in labeler.names}
GROUNDING, DAAM_MAPS, MASKS = Grounding(), DAAM(), RealMasks()  # no labeler.model names them


def labeler_of(model: str) -> Labeler:
    """The registered labeler named ``model`` (``labeler.model``; ValueError naming the choices)."""
    try:
        return LABELERS[model]
    except KeyError:
        raise ValueError(f"unknown labeler {model!r} (choices: {', '.join(LABELERS)})") from None


def labeler_for(recipe: Recipe) -> Labeler:
    """The labeler of a build: the annotator section's (a grounding checkpoint, or DAAM), a real
    source's own masks (the source section without an annotator), or the one ``labeler.model`` names."""
    if recipe.annotator.checkpoint:
        return GROUNDING
    if recipe.annotator.daam:
        return DAAM_MAPS
    if recipe.source.enabled:
        return MASKS
    return labeler_of(recipe.labeler.model)


def load_detector(config: LabelerConfig, vocabulary: Vocabulary, image_size: int, device: torch.device) -> Detector:
    """The labeler's models on ``device``, as a detector (in the model actor)."""
    return labeler_of(config.model).load(config, vocabulary, image_size, device)
