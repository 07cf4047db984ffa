"""Protocol-I metrics: the IoU and presence counts on hand-made masks, per split and group, and
their tables.

VOC unseen classes: split 1 tvmonitor, car, dog, sofa, train; split 2 horse, motorbike,
person, pottedplant, sheep; split 3 bus, cat, chair, cow, diningtable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factory.core.vocab import VOC
from grounding.data import Batch
from grounding.metrics import (
    IoUCounts,
    PresenceCounts,
    ProtocolIAccumulator,
    count_batch,
    format_presence_table,
    format_table,
    group_of,
)


def masks(*rows_on: range, size: int = 4) -> np.ndarray:
    """(O, size, size) bool: object o has the rows rows_on[o] fully on."""
    out = np.zeros((len(rows_on), size, size), bool)
    for o, rows in enumerate(rows_on):
        out[o, rows] = True
    return out


def test_validation_counts_pixels_of_valid_slots():
    batch = Batch(
        features={}, class_embeddings=torch.zeros(2, 2, 1), class_mask=torch.ones(2, 2, dtype=torch.bool),
        class_indices=torch.tensor([[1, 2], [1, 3]]), targets=torch.zeros(2, 2, 2, 2),
        valid=torch.tensor([[True, True], [True, False]]), ignore=torch.zeros(2, 2, 2, dtype=torch.bool),
        present=torch.tensor([[True, True], [True, False]]), named=torch.ones(2, 2, dtype=torch.bool))
    batch.targets[0, 0, 0] = 1  # class 1: 2 target pixels in sample 0, 1 in sample 1
    batch.targets[1, 0, 0, 0] = 1
    predicted = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    predicted[0, 0, 0, 0] = predicted[1, 0, 0, 0] = predicted[1, 0, 1, 1] = True
    predicted[0, 1] = True  # class 2: 4 predicted pixels, no target
    predicted[1, 1] = True  # class 3: invalid slot, not counted
    iou, presence = IoUCounts(), PresenceCounts()
    count_batch(iou, presence, predicted, batch, VOC.names)
    assert iou.iou(VOC.names) == {"aeroplane": 2 / 4, "bicycle": 0.0}
    # Every named slot got a mask; three of the four were found: precision 3/4, recall 1.
    assert presence.rates() == {"precision": 0.75, "recall": 1.0}

    # Pixel (1, 1) of sample 1 is 255 in its label map: class 1's prediction there is no longer
    # a false positive (I = 2, U = 3), and sample 0's ignored row takes class 2's union to 2.
    batch.ignore[1, 1, 1] = True
    batch.ignore[0, 1] = True
    iou = IoUCounts()
    count_batch(iou, PresenceCounts(), predicted, batch, VOC.names)
    assert iou.iou(VOC.names) == {"aeroplane": 2 / 3, "bicycle": 0.0}
    assert iou.pixels == {"aeroplane": [2, 3], "bicycle": [0, 2]}


def test_groups_for_voc_split_1():
    unseen = frozenset(VOC.unseen(1))
    assert unseen == {"tvmonitor", "car", "dog", "sofa", "train"}
    assert group_of(["cat"], unseen) == "one/seen"
    assert group_of(["dog"], unseen) == "one/unseen"
    assert group_of(["cat", "horse"], unseen) == "two/seen"
    assert group_of(["car", "person"], unseen) == "two/seen+unseen"
    assert group_of(["person", "car"], unseen) == "two/seen+unseen"
    assert group_of(["dog", "sofa"], unseen) == "two/unseen"
    assert group_of(["cat", "dog", "horse"], unseen) is None


def test_each_sample_is_filed_per_split():
    acc = ProtocolIAccumulator(VOC)
    full = masks(range(4))
    acc.add(["dog"], full, full, [True])  # unseen in split 1, seen in splits 2 and 3
    acc.add(["car", "person"], masks(range(4), range(4)), masks(range(4), range(4)), [True, True])
    filed = {(k, g) for (k, g), n in acc.samples.items() if n}
    # car: unseen in split 1; person: unseen in split 2; both seen in split 3.
    assert filed == {(1, "one/unseen"), (2, "one/seen"), (3, "one/seen"),
                     (1, "two/seen+unseen"), (2, "two/seen+unseen"), (3, "two/seen")}
    assert acc.iou[1, "two/seen+unseen"].pixels == {"car": [16, 16], "person": [16, 16]}


def test_iou_pools_pixels_over_samples_and_miou_averages_classes():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    # cat, sample 1: truth rows 0-1 (8 px), prediction row 0 (4 px): I = 4, U = 8.
    acc.add(["cat"], masks(range(1)), masks(range(2)), [True])
    # cat, sample 2: truth row 3 (4 px), prediction rows 2-3 (8 px): I = 4, U = 8.
    acc.add(["cat"], masks(range(2, 4)), masks(range(3, 4)), [True])
    # cat: I = 8, U = 16 -> 50 %.
    # horse: truth all 16 px, prediction rows 0-2 (12 px): I = 12, U = 16 -> 75 %.
    acc.add(["horse"], masks(range(3)), masks(range(4)), [True])
    # bird, two samples of very different size: pooled 1 / (1 + 8) = 11.11 %, not the mean
    # of per-sample IoUs (100 % and 0 %, i.e. 50 %).
    one_pixel = np.zeros((1, 4, 4), bool)
    one_pixel[0, 0, 0] = True
    acc.add(["bird"], one_pixel, one_pixel, [True])  # I = 1, U = 1
    acc.add(["bird"], masks(range(2, 3)), masks(range(3, 4)), [True])  # disjoint rows: I = 0, U = 8
    group = acc.result()["splits"]["1"]["one/seen"]
    assert group["iou"] == pytest.approx({"bird": 100 / 9, "cat": 50.0, "horse": 75.0})
    assert list(group["iou"]) == ["bird", "cat", "horse"]  # vocabulary order
    assert group["miou"] == pytest.approx((100 / 9 + 50 + 75) / 3)  # 45.37
    assert group["samples"] == 5


def test_seen_plus_unseen_pair_counts_both_classes_and_invalid_slots_not_at_all():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    # cat (seen) + dog (unseen) in split 1.
    # cat: truth rows 0-1 (8 px), prediction rows 0-1: I = 8, U = 8 -> 100 %.
    # dog: truth rows 2-3 (8 px), prediction row 3 (4 px): I = 4, U = 8 -> 50 %.
    acc.add(["cat", "dog"], masks(range(2), range(3, 4)), masks(range(2), range(2, 4)), [True, True])
    # A second pair whose dog slot is not valid (the oracle missed it): only cat counts.
    # cat: truth row 0 (4 px), prediction rows 0-1 (8 px): I = 4, U = 8. Pooled: 12 / 16 = 75 %.
    acc.add(["cat", "dog"], masks(range(2), range(4)), masks(range(1), range(0)), [True, False])
    group = acc.result()["splits"]["1"]["two/seen+unseen"]
    assert group["iou"] == pytest.approx({"cat": 75.0, "dog": 50.0})
    assert group["miou"] == pytest.approx(62.5)
    assert group["samples"] == 2
    # A sample without any valid slot counts nowhere.
    acc.add(["cat", "dog"], masks(range(4), range(4)), masks(range(4), range(4)), [False, False])
    assert acc.result()["splits"]["1"]["two/seen+unseen"]["samples"] == 2


def test_classes_with_empty_union_are_skipped():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    empty = masks(range(0))
    acc.add(["sheep"], empty, empty, [True])  # nothing predicted, nothing there: U = 0
    assert acc.result()["splits"]["1"]["one/seen"] == {"miou": None, "iou": {}, "samples": 1}
    acc.add(["cow"], masks(range(2)), masks(range(4)), [True])  # I = 8, U = 16 -> 50 %
    assert acc.result()["splits"]["1"]["one/seen"]["iou"] == {"cow": 50.0}
    assert acc.result()["splits"]["1"]["one/seen"]["miou"] == 50.0  # sheep is not a 0 in the mean


def test_more_than_two_classes_are_ignored():
    acc = ProtocolIAccumulator(VOC)
    three = masks(range(4), range(4), range(4))
    acc.add(["cat", "dog", "horse"], three, three, [True, True, True])
    assert all(n == 0 for n in acc.samples.values())
    assert all(not counts.pixels for counts in acc.iou.values())


def test_average_over_splits_needs_every_split():
    acc = ProtocolIAccumulator(VOC)
    # cat: seen in splits 1 and 2, unseen in 3. I = 8, U = 16 -> 50 %.
    acc.add(["cat"], masks(range(2)), masks(range(4)), [True])
    assert acc.result()["average"]["one/seen"] is None  # split 3 has no one/seen sample
    # dog: unseen in split 1, seen in 2 and 3. I = 4, U = 16 -> 25 %.
    acc.add(["dog"], masks(range(1)), masks(range(4)), [True])
    result = acc.result()
    # one/seen: split 1 cat 50; split 2 (cat 50 + dog 25) / 2 = 37.5; split 3 dog 25.
    assert [result["splits"][k]["one/seen"]["miou"] for k in "123"] == [50.0, 37.5, 25.0]
    assert result["average"]["one/seen"] == pytest.approx((50 + 37.5 + 25) / 3)  # 37.5
    # one/unseen: split 1 dog 25, split 2 none (cat and dog are seen there).
    assert result["average"]["one/unseen"] is None


def test_no_average_without_every_split():
    """The paper's Average is over the modules of all three splits: two splits give none at all,
    not the mean of those two."""
    acc = ProtocolIAccumulator(VOC, splits=(1, 2))
    acc.add(["cat"], masks(range(2)), masks(range(4)), [True])  # one/seen in both: 50 %
    result = acc.result()
    assert [result["splits"][k]["one/seen"]["miou"] for k in "12"] == [50.0, 50.0]
    assert result["average"] is None


def test_each_split_is_scored_with_its_own_predictions():
    acc = ProtocolIAccumulator(VOC)
    truth = masks(range(4))
    # The same dog image, predicted by each split's module: split 1's finds half, split 2's a
    # quarter, split 3's all of it.
    for split, rows in ((1, range(2)), (2, range(1)), (3, range(4))):
        acc.add(["dog"], masks(rows), truth, [True], splits=[split])
    result = acc.result()
    assert result["splits"]["1"]["one/unseen"]["iou"] == {"dog": 50.0}
    assert result["splits"]["2"]["one/seen"]["iou"] == {"dog": 25.0}
    assert result["splits"]["3"]["one/seen"]["iou"] == {"dog": 100.0}
    assert sum(acc.samples.values()) == 3  # one sample per split, not three
    with pytest.raises(ValueError, match="not all among"):
        ProtocolIAccumulator(VOC, splits=(1,)).add(["dog"], truth, truth, [True], splits=[2])


def test_pixels_255_in_the_label_map_count_nowhere():
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    # cat: truth rows 0-1 (8 px); prediction rows 0-2 (12 px). Row 2 is 255 in the label map
    # (the oracle's unsure band): I = 8, U = 8 -> 100 %, not 8 / 12.
    ignore = np.zeros((4, 4), bool)
    ignore[2] = True
    acc.add(["cat"], masks(range(3)), masks(range(2)), [True], ignore)
    assert acc.result()["splits"]["1"]["one/seen"]["iou"] == {"cat": 100.0}
    acc.add(["cat"], masks(range(3)), masks(range(2)), [True])  # the same without the band: 8 / 12
    assert acc.iou[1, "one/seen"].pixels == {"cat": [16, 20]}
    with pytest.raises(ValueError, match=r"\(H, W\) ignore"):
        acc.add(["cat"], masks(range(3)), masks(range(2)), [True], np.zeros((2, 2), bool))


def random_samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = VOC.names
    for _ in range(n):
        k = int(rng.integers(1, 4))  # 1, 2, or 3 objects (3: ignored)
        classes = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
        yield (classes, rng.random((k, 8, 8)) > 0.5, rng.random((k, 8, 8)) > 0.6, rng.random(k) > 0.2)


def test_merge_equals_one_accumulator():
    single, first, second = (ProtocolIAccumulator(VOC) for _ in range(3))
    for i, sample in enumerate(random_samples(60)):
        single.add(*sample)
        (first if i % 3 else second).add(*sample)
    merged = ProtocolIAccumulator.from_dict(json.loads(json.dumps(first.to_dict())))  # as from a Ray worker
    merged.merge(second)
    assert merged.to_dict() == single.to_dict()
    assert merged.result() == single.result()
    with pytest.raises(ValueError, match="cannot merge"):
        single.merge(ProtocolIAccumulator(VOC, splits=(1,)))


def test_unknown_split_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown split 4"):
        ProtocolIAccumulator(VOC, splits=(1, 4))
    with pytest.raises(ValueError, match="2 classes"):
        ProtocolIAccumulator(VOC).add(["cat", "dog"], masks(range(4)), masks(range(4)), [True])


def test_table_text():
    module = ProtocolIAccumulator(VOC)
    # cat: one/seen in splits 1, 2 (I = 12, U = 16 -> 75 %) and one/unseen in split 3.
    module.add(["cat"], masks(range(3)), masks(range(4)), [True])
    # dog: one/unseen in split 1 and one/seen in splits 2 and 3 (I = 4, U = 16 -> 25 %).
    module.add(["dog"], masks(range(1)), masks(range(4)), [True])
    daam = ProtocolIAccumulator(VOC)  # nothing at all: every cell "-"
    table = format_table({"grounding module": module.result(), "DAAM": daam.result()})
    lines = table.splitlines()
    assert lines[0].split() == ["Method", "Split", "One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen",
                                "Two/Unseen"]
    assert set(lines[1]) == {"-"}
    cells = [line.split() for line in lines[2:]]
    # Each cell: the mIoU and, in parentheses, the images it was scored on.
    assert cells[0] == ["grounding", "module", "1", "75.00", "(1)", "25.00", "(1)", "-", "-", "-"]
    assert cells[1] == ["2", "50.00", "(2)", "-", "-", "-", "-"]  # (75 + 25) / 2
    assert cells[2] == ["3", "25.00", "(1)", "75.00", "(1)", "-", "-", "-"]
    assert cells[3] == ["Average", "50.00", "-", "-", "-", "-"]  # (75 + 50 + 25) / 3; one/unseen lacks split 2
    assert cells[4] == ["DAAM", "1", "-", "-", "-", "-", "-"]
    assert len(cells) == 8
    # Numbers are right-aligned under their column titles.
    assert lines[2].index("75.00 (1)") + len("75.00 (1)") == lines[0].index("One/Seen") + len("One/Seen")

    # Splits 1 and 2 only: their rows, and no Average row.
    partial = ProtocolIAccumulator(VOC, splits=(1, 2))
    partial.add(["cat"], masks(range(3)), masks(range(4)), [True])
    cells = [line.split() for line in format_table({"grounding module": partial.result()}).splitlines()[2:]]
    assert [row[-7] for row in cells] == ["1", "2"]


def test_presence_counts_judge_every_named_class_against_found():
    """Label truth: a mask on a class the oracle did not find is a false positive, an empty mask on a
    found one a false negative; an image with an absent class counts once, masked or not."""
    acc = ProtocolIAccumulator(VOC, splits=(1,))
    unseen = VOC.unseen(1)[0]
    seen = next(name for name in VOC.names if name not in VOC.unseen(1))
    empty = np.zeros((1, 4, 4), bool)
    full = np.ones((1, 4, 4), bool)
    # One object, seen, found and masked; another seen one not found but masked (painted over nothing).
    acc.add([seen], full, full, [True])
    acc.add([seen], full, empty, [False], present=[False])
    # Two objects: the unseen class absent and given no mask, the seen one found and missed.
    acc.add([seen, unseen], np.zeros((2, 4, 4), bool), np.stack([full[0], empty[0]]), [True, False],
            present=[True, False])
    result = acc.result()["splits"]["1"]
    assert result["presence"]["one"]["seen"] == {"precision": 50.0, "recall": 100.0, "found": 1, "not_found": 1}
    assert result["presence"]["two"]["seen"] == {"precision": None, "recall": 0.0, "found": 1, "not_found": 0}
    assert result["presence"]["two"]["unseen"] == {"precision": None, "recall": None, "found": 0, "not_found": 1}
    assert result["absent"]["one"] == {"images": 1, "masked": 1, "rate": 100.0}
    assert result["absent"]["two"] == {"images": 1, "masked": 0, "rate": 0.0}
    # The counts survive the trip through JSON and a merge.
    merged = ProtocolIAccumulator(VOC, splits=(1,)).merge(ProtocolIAccumulator.from_dict(acc.to_dict()))
    assert merged.result()["splits"]["1"]["presence"] == result["presence"]
    table = format_presence_table({"grounding module": acc.result()})
    assert "50.00/100.00" in table and "100.0% of 1" in table and "0.0% of 1" in table
