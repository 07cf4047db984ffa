"""Protocol-II metrics against torchmetrics (the independent reference) and by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from segmenter.metrics import IGNORE, ConfusionMatrix, zs3_scores

NUM_CLASSES = 6  # background + 5 classes


def random_maps(seed: int, shape=(3, 17, 23), num_classes=NUM_CLASSES, ignore_fraction=0.15):
    """Label and prediction maps with some ignore pixels and a skewed class mix."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(num_classes))
    label = rng.choice(num_classes, size=shape, p=p).astype(np.uint8)
    label[rng.random(shape) < ignore_fraction] = IGNORE
    # Half the predictions right, the rest random: IoUs spread between 0 and 1.
    prediction = np.where(rng.random(shape) < 0.5, label, rng.integers(0, num_classes, shape)).astype(np.uint8)
    prediction[label == IGNORE] = rng.integers(0, num_classes, int((label == IGNORE).sum()))
    return prediction, label


def reference_iou(prediction, label, num_classes=NUM_CLASSES) -> np.ndarray:
    metric = MulticlassJaccardIndex(num_classes=num_classes, average=None, ignore_index=IGNORE)
    return metric(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(label.astype(np.int64))).numpy()


@pytest.mark.parametrize("seed", range(6))
def test_per_class_iou_equals_torchmetrics_exactly(seed):
    prediction, label = random_maps(seed)
    matrix = ConfusionMatrix(NUM_CLASSES).update(prediction, label)

    reference = MulticlassConfusionMatrix(num_classes=NUM_CLASSES, ignore_index=IGNORE)
    counts = reference(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
    assert np.array_equal(matrix.counts, counts.numpy())

    # torchmetrics divides in float32; rounding our float64 quotient of the same integers
    # to float32 gives the correctly rounded float32 quotient, so the bits must match.
    ours = matrix.iou_per_class()
    assert not np.isnan(ours).any()
    assert np.array_equal(ours.astype(np.float32), reference_iou(prediction, label))


def test_ignore_pixels_count_for_nothing_whatever_is_predicted():
    prediction, label = random_maps(7)
    ignored = label == IGNORE
    assert ignored.any()
    base = ConfusionMatrix(NUM_CLASSES).update(prediction, label)
    for value in range(NUM_CLASSES):
        other = prediction.copy()
        other[ignored] = value
        assert np.array_equal(ConfusionMatrix(NUM_CLASSES).update(other, label).counts, base.counts)
    assert base.counts.sum() == (~ignored).sum()


def test_merge_of_parts_equals_the_whole_and_survives_json():
    prediction, label = random_maps(8, shape=(6, 11, 13))
    whole = ConfusionMatrix(NUM_CLASSES).update(prediction, label)
    parts = [ConfusionMatrix(NUM_CLASSES).update(prediction[i], label[i]) for i in range(6)]
    merged = ConfusionMatrix(NUM_CLASSES)
    for part in reversed(parts):
        merged.merge(ConfusionMatrix.from_dict(json.loads(json.dumps(part.to_dict()))))
    assert np.array_equal(merged.counts, whole.counts)
    assert merged.counts.dtype == np.int64


def test_scores_by_hand_with_background_ignored_or_seen():
    # Truth: a row each of background (0), class 1, class 2, class 3; 4 pixels a row.
    label = np.repeat(np.arange(4, dtype=np.uint8), 4).reshape(4, 4)
    prediction = label.copy()
    prediction[0, :2] = 1  # background taken for class 1 twice
    prediction[1, 0] = 0   # class 1 taken for background once
    prediction[2, :2] = 3  # class 2 taken for class 3 twice
    matrix = ConfusionMatrix(4).update(prediction, label)

    # background ignored: class 1 loses its 2 false positives on background.
    ignored = zs3_scores(matrix, seen_indices=[1, 2], unseen_indices=[3])
    assert ignored["per_class"] == pytest.approx({1: 75.0, 2: 50.0, 3: 100 * 4 / 6})
    s, u = (75.0 + 50.0) / 2, 100 * 4 / 6
    assert ignored["seen"] == pytest.approx(s)
    assert ignored["unseen"] == pytest.approx(u)
    assert ignored["harmonic"] == pytest.approx(2 * s * u / (s + u))

    # background seen: background is a seen class, and the false positives count.
    counted = zs3_scores(matrix, seen_indices=[1, 2], unseen_indices=[3], background="seen")
    assert counted["per_class"] == pytest.approx({0: 40.0, 1: 50.0, 2: 50.0, 3: 100 * 4 / 6})
    s = (40.0 + 50.0 + 50.0) / 3
    assert counted["seen"] == pytest.approx(s)
    assert counted["harmonic"] == pytest.approx(2 * s * u / (s + u))


def test_painting_background_as_a_class_costs_only_when_background_is_counted():
    # Truth: 6 background pixels, 2 of seen class 1, 2 of unseen class 2; every class found exactly.
    label = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 2, 2]], np.uint8)
    exact = ConfusionMatrix(3).update(label, label)
    painted = label.copy()
    painted[0, :3] = 2  # half of the background painted as the unseen class
    matrix = ConfusionMatrix(3).update(painted, label)
    assert matrix.counts.tolist() == [[3, 0, 3], [0, 2, 0], [0, 0, 2]]

    # (a) background ignored: the background row is dropped, so the paint costs nothing.
    for m in (exact, matrix):
        assert zs3_scores(m, [1], [2]) == {"seen": 100.0, "unseen": 100.0, "harmonic": 100.0,
                                           "per_class": {1: 100.0, 2: 100.0}}

    # (b) background counted: background keeps 3 of its 6 pixels, IoU 3 / (6 + 0 + 3 - 3) = 1/2;
    # class 2 gains 3 false positives, IoU 2 / (2 + 3) = 2/5; seen = (50 + 100) / 2 = 75,
    # harmonic = 2 * 75 * 40 / (75 + 40) = 1200/23.
    assert zs3_scores(exact, [1], [2], background="seen")["harmonic"] == 100.0
    counted = zs3_scores(matrix, [1], [2], background="seen")
    assert counted["per_class"] == {0: 50.0, 1: 100.0, 2: 40.0}
    assert counted["seen"] == 75.0 and counted["unseen"] == 40.0
    assert counted["harmonic"] == pytest.approx(1200 / 23)


def test_absent_classes_are_left_out_of_the_means():
    prediction, label = random_maps(9, num_classes=4)  # labels 0..3 only
    matrix = ConfusionMatrix(NUM_CLASSES).update(prediction, label)
    iou = matrix.iou_per_class()
    assert np.isnan(iou[4:]).all() and not np.isnan(iou[:4]).any()
    # torchmetrics reports 0 for them, which would drag a mean down.
    assert (reference_iou(prediction, label)[4:] == 0).all()

    scores = zs3_scores(matrix, seen_indices=[1, 2, 4], unseen_indices=[3, 5])
    assert scores["per_class"][4] is None and scores["per_class"][5] is None
    iou = matrix.iou_per_class(ignore_background=True)  # the default convention
    assert scores["seen"] == pytest.approx(100 * (iou[1] + iou[2]) / 2)
    assert scores["unseen"] == pytest.approx(100 * iou[3])

    # No unseen class present at all: no unseen mIoU, no harmonic mean.
    empty = zs3_scores(matrix, seen_indices=[1, 2, 3], unseen_indices=[4, 5])
    assert empty["unseen"] is None and empty["harmonic"] is None


def test_a_class_predicted_only_on_background_is_absent_when_background_is_ignored():
    label = np.array([[0, 0, 1, 1]], np.uint8)
    prediction = np.array([[2, 0, 1, 1]], np.uint8)
    matrix = ConfusionMatrix(3).update(prediction, label)
    assert zs3_scores(matrix, [1], [2])["unseen"] is None
    assert zs3_scores(matrix, [1], [2], background="seen")["unseen"] == 0.0


def test_zero_seen_and_unseen_give_a_zero_harmonic_mean():
    label = np.array([[1, 2]], np.uint8)
    matrix = ConfusionMatrix(3).update(np.array([[2, 1]], np.uint8), label)
    assert zs3_scores(matrix, [1], [2])["harmonic"] == 0.0


@pytest.mark.parametrize("prediction, label", [
    (np.array([[3]]), np.array([[0]])),      # prediction beyond the classes
    (np.array([[0]]), np.array([[7]])),      # label neither a class nor 255
    (np.array([[0, 1]]), np.array([[0]])),   # shapes differ
])
def test_bad_maps_are_rejected(prediction, label):
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(prediction, label)


def test_bad_index_lists_are_rejected():
    matrix = ConfusionMatrix(4)
    for seen, unseen in (([1, 2], [2, 3]), ([0, 1], [2]), ([1], [4]), ([1, 1], [2])):
        with pytest.raises(ValueError):
            zs3_scores(matrix, seen, unseen)
    with pytest.raises(ValueError):
        zs3_scores(matrix, [1], [2], background="unseen")
