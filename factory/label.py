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

from factory.detect import Detections, load_detector
from factory.devices import pick_device
from factory.loading import load_with_retries
from factory.recipe import LabelerConfig
from factory.vocab import ClassInfo, get_vocabulary

IGNORE = 255
MAX_CLASSES = 8  # per-sample class masks travel as the bits of one uint8 plane
CLASS_NOT_FOUND = "class_not_found"


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
        of_class = detections.coco_ids == info.coco_id
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


def pack_masks(labels: list[ClassLabel], shape: tuple[int, int]) -> np.ndarray:
    """Class masks as bits of one uint8 plane: bit k is the k-th prompt class."""
    bits = np.zeros(shape, np.uint8)
    for k, label in enumerate(labels):
        bits |= label.mask.astype(np.uint8) << k
    return bits


class LabelStage:
    """Ray Data actor around the detector: adds label maps, class masks and scores."""

    def __init__(self, config: LabelerConfig, vocabulary: str, image_size: int, load_attempts: int = 3):
        self.config = config
        self.vocabulary = get_vocabulary(vocabulary)
        self.detector = load_with_retries(f"labeler {config.model}" + (f" weights {config.weights}" if config.weights else ""),
                                          lambda: load_detector(config, image_size, pick_device()),
                                          load_attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        c = self.config
        images = batch["image"]
        outputs = {"label": [], "class_bits": [], "scores": [], "instances": [], "found": [], "drop_reason": []}
        for image, names, detections in zip(images, batch["classes"], self.detector(images)):
            if not len(detections.masks):  # nothing detected: empty masks of the image's size
                detections.masks = np.zeros((0, *image.shape[:2]), np.float32)
            classes = [self.vocabulary.lookup(name) for name in names]
            labels, owner, ignore = label_classes(
                detections, classes, score_threshold=c.score_threshold, mask_threshold=c.mask_threshold,
                ignore_threshold=c.ignore_threshold)
            complete = all(label.found for label in labels)
            outputs["label"].append(semantic_label_map(labels, owner, ignore,
                                                       unclaimed=0 if complete else IGNORE))
            outputs["class_bits"].append(pack_masks(labels, image.shape[:2]))
            outputs["scores"].append(np.array([label.score for label in labels], np.float32))
            outputs["instances"].append(np.array([label.instances for label in labels], np.int16))
            outputs["found"].append(np.array([label.found for label in labels]))
            outputs["drop_reason"].append("" if complete or c.on_missing == "ignore" else CLASS_NOT_FOUND)
        for key in ("label", "class_bits"):
            batch[key] = np.stack(outputs[key])
        for key in ("scores", "instances", "found"):
            batch[key] = ragged(outputs[key])
        batch["drop_reason"] = np.array(outputs["drop_reason"], dtype=object)
        batch["label_seconds"] = np.full(len(images), (time.perf_counter() - start) / len(images))
        return batch


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of arrays of different lengths: Ray Data turns it into a list column."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
