"""Agreement: a second labeler checks each sample's labels, class by class.

The recipe's ``agreement.labeler`` (a Mask R-CNN oracle or the open-vocabulary labeler) labels
every image again under its own rules (``label.oracle_labels``). Each sample records, per
prompt class, the IoU of the two labelers' masks (``agreement``; 1.0 when both are empty: they
agree the class is not there). A class agreeing less than ``min_iou`` drops the sample
(``action: drop``) or becomes 255 wherever either labeler put it (``action: ignore``), so a
segmenter is taught neither labeler's guess there.
"""

from __future__ import annotations

import time

import numpy as np

from factory.build.detect import load_detector
from factory.build.label import oracle_labels
from factory.build.recipe import AgreementConfig
from factory.core.conventions import IGNORE
from factory.core.devices import pick_device
from factory.core.loading import load_with_retries
from factory.core.vocab import get_vocabulary
from factory.dataset.codec import objects

DISAGREE = "labelers_disagree"  # the drop reason of a sample with a disagreeing class


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def unpack_masks(class_bits: np.ndarray, count: int) -> np.ndarray:
    """(H, W) uint8 bits -> (count, H, W) bool class masks (``batch.pack_masks`` reversed)."""
    return np.stack([(class_bits >> k) & 1 for k in range(count)]).astype(bool)


def apply_agreement(label: np.ndarray, indices: list[int], first: np.ndarray, second: np.ndarray, *,
                    min_iou: float, action: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(label map, per-class IoU (O,) float32, drop reason) of one sample whose O classes have
    label-map ``indices`` and masks ``first`` (the labels') and ``second`` (the checker's)."""
    iou = np.array([mask_iou(a, b) for a, b in zip(first, second)], np.float32)
    disagree = iou < min_iou
    if action == "drop":
        return label, iou, DISAGREE if disagree.any() else ""
    label = label.copy()
    for k in np.flatnonzero(disagree):
        label[(label == indices[k]) | second[k]] = IGNORE
    return label, iou, ""


class AgreementStage:
    """Ray Data actor stage: the second labeler's masks against the batch's labels."""

    def __init__(self, config: AgreementConfig, vocabulary: str | dict, image_size: int, load_attempts: int = 3):
        self.config, self.vocabulary = config, get_vocabulary(vocabulary)
        lab = config.labeler
        self.detector = load_with_retries(f"agreement labeler {lab.model}" + (f" weights {lab.weights}" if lab.weights
                                                                             else ""),
                                          lambda: load_detector(lab, self.vocabulary, image_size, pick_device()),
                                          load_attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n, c = len(batch["classes"]), self.config
        classes = [[self.vocabulary.lookup(name) for name in names] for names in batch["classes"]]
        ious = []
        for i, (image_classes, found) in enumerate(zip(classes, self.detector(batch["image"], classes))):
            second = oracle_labels(found, image_classes, c.labeler, batch["image"].shape[1:3]).masks
            first = unpack_masks(batch["class_bits"][i], len(image_classes))
            batch["label"][i], iou, reason = apply_agreement(
                batch["label"][i], [info.index for info in image_classes], first, second,
                min_iou=c.min_iou, action=c.action)
            batch["drop_reason"][i] = batch["drop_reason"][i] or reason
            ious.append(iou)
        batch["agreement"] = objects(ious)
        batch["label_seconds"] = batch["label_seconds"] + (time.perf_counter() - start) / n
        return batch
