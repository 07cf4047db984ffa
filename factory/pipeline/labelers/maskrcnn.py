"""Mask R-CNN oracles (``factory.detection.maskrcnn``): torchvision's COCO architectures, the
tiny random one, and the mini world's slim one, whose labels are the vocabulary's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from factory.core.conventions import SMALL, TINY, TORCHVISION_WEIGHTS
from factory.core.storage import check_model_source
from factory.core.vocab import Vocabulary
from factory.pipeline.labelers.base import Labeler

if TYPE_CHECKING:  # the section imports this registry: annotations only
    from factory.pipeline.sections import LabelerConfig


class MaskRCNN(Labeler):
    names = (TINY, "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", SMALL)

    def validate(self, config: LabelerConfig) -> None:
        if config.model != TINY and config.weights is None:
            raise ValueError(f"labeler {config.model} needs weights (a COCO-pretrained checkpoint path)")
        if config.model in (TINY, SMALL) and config.weights == TORCHVISION_WEIGHTS:
            raise ValueError(f"weights: torchvision needs a torchvision COCO architecture, not {config.model}")
        if config.sam is not None:
            raise ValueError(f"sam is for labeler open_vocabulary with a detector, not {config.model}")

    def check_classes(self, config: LabelerConfig, vocabulary: Vocabulary, classes: Sequence[str]) -> None:
        knows = "shapes" if config.model == SMALL else "coco"  # the tiny model's random head fits either
        if config.model != TINY and vocabulary.detector_space != knows:
            raise ValueError(f"labeler {config.model} detects {knows} classes, and vocabulary {vocabulary.name}'s "
                             f"detector names {vocabulary.detector_space} classes: set the vocabulary's detector to "
                             f"{knows} and name its classes, or use an oracle of {vocabulary.detector_space} "
                             f"({'maskrcnn_small, the mini world' if knows == 'coco' else 'a COCO Mask R-CNN'})")
        blind = [name for name in classes if not vocabulary.lookup(name).coco_id]
        if blind:
            raise ValueError(f"the {config.model} oracle has no class for {', '.join(blind)} (vocabulary "
                             f"{vocabulary.name} names no detector class): label them with labeler.model "
                             f"open_vocabulary or annotator.checkpoint")

    def check(self, config: LabelerConfig) -> None:
        if config.weights not in (None, TORCHVISION_WEIGHTS):
            check_model_source(config.weights)

    def load(self, config, vocabulary, image_size, device):
        from factory.detection.maskrcnn import MaskRCNNDetector  # torch in the model actor only

        return MaskRCNNDetector(config.model, vocabulary, image_size, device, weights=config.weights,
                                score_threshold=config.candidate_threshold, nms_threshold=config.nms_threshold)
