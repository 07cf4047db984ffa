"""Label: oracle masks for the prompt's classes from the detector's instances.

Unlike the reference code, which kept only the top-scoring instance per class, every
instance of a prompt class at or above the score threshold is merged into its
class mask, so a second dog never becomes background. Instances of a prompt class
scoring in the ignore band [ignore_threshold, score_threshold) become 255.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from factory.core.conventions import IGNORE
from factory.core.devices import pick_device
from factory.core.loading import load_with_retries
from factory.core.vocab import ClassInfo, get_vocabulary
from factory.dataset.batch import CLASS_NOT_FOUND, SampleLabels, attach_labels
from factory.detection.detections import Detections
from factory.pipeline.labelers import load_detector
from factory.pipeline.sections import LabelerConfig


@dataclass
class ClassLabel:
    info: ClassInfo
    mask: np.ndarray  # (H, W) bool: union of the merged instances
    score: float  # best merged instance score; 0.0 when none
    instances: int

    @property
    def found(self) -> bool:
        return self.instances > 0


def label_classes(detections: Detections, classes: list[ClassInfo], *, score_threshold: float,
                  mask_threshold: float, ignore_threshold: float | None = None
                  ) -> tuple[list[ClassLabel], np.ndarray, np.ndarray]:
    """Per-class masks, a per-pixel winning score map, and the ignore band.

    Returns (labels, owner, ignore): ``owner`` (H, W) int holds the position in
    ``classes`` of the class owning each pixel (-1 none); overlaps go to the higher
    instance score.
    """
    height, width = detections.masks.shape[1:]  # (K, H, W) even when K is 0
    binary = detections.masks >= mask_threshold
    best = np.full((height, width), -1.0, np.float32)  # below any score, so a 0.0 instance still owns pixels
    owner = np.full((height, width), -1, np.int64)
    ignore = np.zeros((height, width), bool)
    labels = []
    for position, info in enumerate(classes):
        of_class = detections.classes == info.index
        # an instance whose mask is empty after thresholding says nothing about where the class is
        kept = of_class & (detections.scores >= score_threshold) & binary.any(axis=(1, 2))
        mask = np.zeros((height, width), bool)
        for k in np.flatnonzero(kept):
            mask |= binary[k]
            wins = binary[k] & (detections.scores[k] > best)
            best[wins] = detections.scores[k]
            owner[wins] = position
        if ignore_threshold is not None:
            for k in np.flatnonzero(of_class & ~kept & (detections.scores >= ignore_threshold)):
                ignore |= binary[k]
        score = float(detections.scores[kept].max()) if kept.any() else 0.0
        labels.append(ClassLabel(info, mask, score, int(kept.sum())))
    return labels, owner, ignore


def semantic_label_map(labels: list[ClassLabel], owner: np.ndarray, ignore: np.ndarray,
                       *, unclaimed: int = 0) -> np.ndarray:
    """uint8 map: vocabulary index of the owning class, ``unclaimed`` elsewhere, 255 in the band.

    With a prompt class missing, ``unclaimed`` is 255: the missing object may be anywhere
    that no found class claims, so that area must not teach "background".
    """
    lut = np.array([label.info.index for label in labels] + [unclaimed], np.uint8)
    out = lut[owner]  # owner -1 picks the last entry
    out[ignore & (owner < 0)] = IGNORE
    return out


class LabelStage:
    """Ray Data actor around the detector: adds label maps, class masks and scores."""

    def __init__(self, config: LabelerConfig, vocabulary: str | dict, image_size: int, load_attempts: int = 3,
                 role: str = "labeler"):
        self.config = config
        self.vocabulary = get_vocabulary(vocabulary)
        models = "".join(f" {field} {value}" for field, value in (("weights", config.weights), ("sam", config.sam))
                         if value)
        self.detector = load_with_retries(f"{role} {config.model}{models}",
                                          lambda: load_detector(config, self.vocabulary, image_size, pick_device()),
                                          load_attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        return attach_labels(batch, self.labels(batch["image"], batch["classes"]), start)

    def labels(self, images: np.ndarray, names: np.ndarray) -> list[SampleLabels]:
        """Each image's labels of its classes (``names``: a list of class names per image)."""
        classes = [[self.vocabulary.lookup(name) for name in image_names] for image_names in names]
        return [oracle_labels(detections, image_classes, self.config, image.shape[:2])
                for image, image_classes, detections in zip(images, classes, self.detector(images, classes))]


def oracle_labels(detections: Detections, classes: list[ClassInfo], config: LabelerConfig,
                  image_size: tuple[int, int]) -> SampleLabels:
    """One image's labels under the recipe's rules (module docstring)."""
    if not len(detections.masks):  # nothing detected: empty masks of the image's size
        detections.masks = np.zeros((0, *image_size), np.float32)
    labels, owner, ignore = label_classes(detections, classes, score_threshold=config.score_threshold,
                                          mask_threshold=config.mask_threshold,
                                          ignore_threshold=config.ignore_threshold)
    complete = all(label.found for label in labels)
    return SampleLabels(
        label=semantic_label_map(labels, owner, ignore, unclaimed=0 if complete else IGNORE),
        masks=np.stack([label.mask for label in labels]),
        scores=np.array([label.score for label in labels], np.float32),
        instances=np.array([label.instances for label in labels], np.int16),
        drop_reason="" if complete or config.on_missing == "ignore" else CLASS_NOT_FOUND)
