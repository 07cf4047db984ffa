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

from factory.core.conventions import IGNORE
from factory.dataset.codec import objects
from factory.pipeline.label import LabelStage
from factory.pipeline.sections import AgreementConfig

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
        self.config = config
        self.checker = LabelStage(config.labeler, vocabulary, image_size, load_attempts, role="agreement labeler")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n, c = len(batch["classes"]), self.config
        ious, checked = [], self.checker.labels(batch["image"], batch["classes"])
        for i, (names, second) in enumerate(zip(batch["classes"], checked)):
            first = unpack_masks(batch["class_bits"][i], len(names))
            batch["label"][i], iou, reason = apply_agreement(
                batch["label"][i], [self.checker.vocabulary.lookup(name).index for name in names], first,
                second.masks, min_iou=c.min_iou, action=c.action)
            batch["drop_reason"][i] = batch["drop_reason"][i] or reason
            ious.append(iou)
        batch["agreement"] = objects(ious)
        batch["label_seconds"] = batch["label_seconds"] + (time.perf_counter() - start) / n
        return batch
