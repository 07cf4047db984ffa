"""Protocol-II metrics: seen, unseen and harmonic mIoU from a confusion matrix.

``ConfusionMatrix`` counts pixels exactly (int64, rows = ground truth, columns =
prediction) over the K + 1 labels of a label map, 0 being background; pixels labelled 255
are left out whatever was predicted there. Counts of disjoint parts of a dataset add up,
so matrices filled by any number of workers merge into the same totals.

A class's IoU is TP / (TP + FP + FN). A class with no ground-truth pixel and no predicted
pixel has no IoU (NaN) and counts in no mean.

Background. The ZS3 literature has two conventions on PASCAL VOC:

- ``"ignore"`` (ZegFormer, Ding et al. 2022; its VOC preparation maps background to 255): background
  pixels are turned into 255 before scoring, so background is in neither mean and a class
  predicted over background costs nothing. The paper compares itself with ZegFormer using
  ZegFormer's published VOC numbers (Li et al. 2023, Table 2: "the results on PASCAL VOC are from
  [7]"), so this is the default here.
- ``"seen"`` (ZS3Net, Bucher et al. 2019, whose code scores every label but the unseen ones as
  seen): background is a class among the seen ones and its pixels are scored, so a class
  predicted over background loses IoU by it.

The two can differ a lot: on images that are mostly background (the mini world's 500 drawn
benchmark val images are 70-94% background, 87% on average), a segmenter that paints classes
over background loses nothing under "ignore". ``zs3_scores`` takes the convention as a
parameter; both come from the same matrix, and the evaluation (segmenter/evaluate.py)
reports both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from factory.core.conventions import BACKGROUND, IGNORE

BACKGROUND_MODES = ("ignore", "seen")


class ConfusionMatrix:
    """Pixel counts of (ground truth, prediction) over ``num_classes`` labels, background included."""

    def __init__(self, num_classes: int):
        if not 2 <= num_classes < IGNORE:
            raise ValueError(f"num_classes must be in 2..{IGNORE - 1} (background plus classes), got {num_classes}")
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def update(self, prediction: np.ndarray, label: np.ndarray) -> ConfusionMatrix:
        """Add one map (or a batch of maps of one size); label 255 pixels are skipped. Returns self."""
        prediction, label = np.asarray(prediction), np.asarray(label)
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in shape")
        scored = label != IGNORE
        truth, predicted = label[scored].astype(np.int64), prediction[scored].astype(np.int64)
        n = self.num_classes
        # Labels outside 0..K other than 255 would be silently counted as another class.
        for what, values in (("label", truth), ("prediction", predicted)):
            if values.size and (values.min() < 0 or values.max() >= n):
                raise ValueError(f"{what} values must be in 0..{n - 1} (or 255 in labels), "
                                 f"got {values.min()}..{values.max()}")
        self.counts += np.bincount(truth * n + predicted, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (of a disjoint part of the data); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.counts += other.counts
        return self

    def to_dict(self) -> dict:
        """JSON-ready (how Ray workers hand their counts to the driver)."""
        return {"num_classes": self.num_classes, "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ConfusionMatrix:
        matrix = cls(data["num_classes"])
        counts = np.asarray(data["counts"], np.int64)
        if counts.shape != matrix.counts.shape:
            raise ValueError(f"counts of shape {counts.shape} for {matrix.num_classes} classes")
        matrix.counts = counts
        return matrix

    def iou_per_class(self, ignore_background: bool = False) -> np.ndarray:
        """IoU of every label as a fraction, NaN where the class is neither in the truth nor predicted.

        ``ignore_background`` scores as if background pixels had been labelled 255: their
        row of the matrix is dropped (background's own IoU is then NaN).
        """
        counts = self.counts.copy()
        if ignore_background:
            counts[BACKGROUND] = 0
        tp = np.diag(counts)
        union = counts.sum(0) + counts.sum(1) - tp
        iou = np.full(self.num_classes, np.nan)
        present = union > 0
        iou[present] = tp[present] / union[present]
        return iou


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def zs3_scores(confusion: ConfusionMatrix, seen_indices: Sequence[int], unseen_indices: Sequence[int],
               background: str = "ignore") -> dict:
    """Seen mIoU, unseen mIoU and their harmonic mean 2SU / (S + U), in percent.

    ``seen_indices`` and ``unseen_indices`` are the foreground labels (1..K) of a split;
    ``background`` is "ignore" or "seen" (see the module docstring). A mean is None when
    none of its classes is present, and so is the harmonic mean then. ``per_class`` maps
    each scored label to its IoU in percent (None when absent).
    """
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}")
    seen, unseen = list(seen_indices), list(unseen_indices)
    labels = seen + unseen
    if len(set(labels)) != len(labels) or not set(labels) <= set(range(1, confusion.num_classes)):
        raise ValueError(f"seen {seen} and unseen {unseen} must be distinct labels in 1..{confusion.num_classes - 1}")
    if background == "seen":
        seen = [BACKGROUND, *seen]
    iou = confusion.iou_per_class(ignore_background=background == "ignore")
    per_class = {i: None if np.isnan(iou[i]) else 100.0 * float(iou[i]) for i in sorted(seen + unseen)}
    s = _mean([per_class[i] for i in seen if per_class[i] is not None])
    u = _mean([per_class[i] for i in unseen if per_class[i] is not None])
    harmonic = None if s is None or u is None else (0.0 if s + u == 0 else 2 * s * u / (s + u))
    return {"seen": s, "unseen": u, "harmonic": harmonic, "per_class": per_class}
