"""The open-vocabulary oracle (``factory.pipeline.openvocab``): every instance of each prompt class
found by its name and synonyms, by SAM 3 or by a text-prompted detector whose boxes SAM segments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.core.conventions import TORCHVISION_WEIGHTS
from factory.core.storage import check_model_source
from factory.pipeline.labelers.base import Labeler

if TYPE_CHECKING:  # the section imports this registry: annotations only
    from factory.pipeline.sections import LabelerConfig

# Counted by bench/gpu.py (FlopCounterMode, docs/performance.md) at real sizes, an image asked for two
# classes: SAM 3, or OWLv2 B/16 + SAM ViT-H on 4 boxes. Which route a recipe takes is a matter of its
# saved models, so the estimate takes the costlier one.
SAM3_TFLOP = 6.49
OWLV2_SAM_TFLOP = 7.09
OPEN_VOCABULARY_TFLOP = max(SAM3_TFLOP, OWLV2_SAM_TFLOP)


class OpenVocabulary(Labeler):
    names = ("open_vocabulary",)
    saved_config = "config.json"  # a save_pretrained folder
    rate, tflop, fixed_size = "open_vocabulary_images_per_s", OPEN_VOCABULARY_TFLOP, True
    cost_note = (f"labeler open_vocabulary is counted as its costlier route ({OPEN_VOCABULARY_TFLOP:.2g} TFLOP an "
                 f"image asked for two classes; SAM 3 {SAM3_TFLOP:.2g}, OWLv2 + SAM ViT-H {OWLV2_SAM_TFLOP:.2g})")

    def validate(self, config: LabelerConfig) -> None:
        # Whether weights is SAM 3 (no sam) or a detector (sam needed) is known when its config loads.
        if config.weights is None:
            raise ValueError("labeler open_vocabulary needs weights: a SAM 3, OWLv2 or Grounding DINO model")
        if config.weights == TORCHVISION_WEIGHTS:
            raise ValueError(f"weights: torchvision needs a torchvision COCO architecture, not {config.model}")

    def check(self, config: LabelerConfig) -> None:
        super().check(config)
        if config.sam:
            check_model_source(config.sam, "config.json")

    def load(self, config, vocabulary, image_size, device):
        from factory.pipeline.openvocab import load_open_vocabulary  # transformers' models load only here

        return load_open_vocabulary(config, device)
