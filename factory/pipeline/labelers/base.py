"""The labeler interface: what labels a build's images, and everything the build asks of it.

Most labelers are named by a recipe's ``labeler.model`` and find instances in finished images
(``factory.detection.detections.Detector``) in a label stage of their own; label.py's rules turn
them into labels. The grounding annotator, DAAM and a real source's masks are chosen by the recipe's
other sections and label inside the stage that makes or reads the image. The interface says what it
loads, the recipe rules its section must meet, the files it needs, the classes it can label and was
trained on, its cost rates, its id and its provenance kind. Its model code is imported by ``load``
only: the driver checks and plans without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from factory.core.storage import check_model_source
from factory.core.vocab import Vocabulary

if TYPE_CHECKING:  # annotations only: torch loads in the model actor; the section imports this registry
    import torch

    from factory.detection.detections import Detector
    from factory.pipeline.recipe import Recipe
    from factory.pipeline.sections import LabelerConfig


class Labeler:
    """One labeler; a subclass instance registered in ``factory.pipeline.labelers`` (under ``names``
    when ``labeler.model`` picks it)."""

    names: tuple[str, ...] = ()  # the labeler.model values it answers to
    kind = "oracle"  # provenance (manifest "labels"): it knows every class it labels
    own_stage = True  # it labels finished images in a label stage (label.py); False: where they are made or read
    saved_config: str | None = None  # the file its weights folder holds (None: weights are one file)
    # Cost (factory.pipeline.cost): the Rates field of its images per second, its TFLOP an image (the
    # fallback when that rate is unset: Mask R-CNN's measured rate at the same FLOP/s), and whether its
    # models resize every image to their own input size (then its cost does not scale with pixels).
    rate = "label_images_per_s"
    tflop: float | None = None
    fixed_size = False
    cost_note: str | None = None  # what the estimate should say about it

    def validate(self, config: LabelerConfig) -> None:
        """The recipe rules of its section; a ValueError is the recipe's one-line error."""

    def check_classes(self, config: LabelerConfig, vocabulary: Vocabulary, classes: Sequence[str]) -> None:
        """It can label each of ``classes`` (ValueError otherwise)."""

    def check(self, config: LabelerConfig) -> None:
        """Its model files exist, when named by path (one-line StorageError otherwise)."""
        if config.weights is not None:
            check_model_source(config.weights, self.saved_config)

    def model_id(self, recipe: Recipe, config: LabelerConfig) -> str:
        """What the manifest and the rows name as this labeler (``config``: its section in ``recipe``)."""
        return ":".join([config.model, *filter(None, (config.weights, config.sam))])

    def trained_classes(self, recipe: Recipe, vocabulary: Vocabulary) -> tuple[set[str], int | None]:
        """The classes of ``vocabulary`` it was trained on, and the split they were (None: none)."""
        return set(vocabulary.names), None

    def load(self, config: LabelerConfig, vocabulary: Vocabulary, image_size: int, device: torch.device) -> Detector:
        raise NotImplementedError
