"""Protocol-I metrics (Li et al., ICCV 2023, Table 1): IoU per class, counted one way for training's
validation and for the evaluation of a test set.

``IoUCounts`` sums, per class, intersection and union pixel counts over the valid slots of the
samples it is given, leaving out pixels the label map marks 255 (exact integers, so counts of any
partition of a set merge into the same totals); a class's IoU is its intersection over its union,
and mIoU the mean IoU over the classes with a non-empty union. ``PresenceCounts`` tallies, per
named class, whether it got a mask (any pixel) against whether the oracle found it.

Validation keeps one of each for the whole validation set (``count_batch``). The evaluation
(``ProtocolIAccumulator``) files every sample, per seen/unseen split, into one of five groups by
how many objects its prompt names and whether they are seen in that split:

    one/seen   one/unseen   two/seen   two/seen+unseen   two/unseen

and keeps the IoU counts per split and group (reported in percent, as in the paper's tables),
presence counts per split, object count (one/two) and seen/unseen class, and how many images with
an absent class gave it a mask. ``format_table`` and ``format_presence_table`` print its results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from factory.core.tables import cell, text_table
from factory.core.vocab import Vocabulary, get_vocabulary
from grounding.data import Batch

GROUPS = ("one/seen", "one/unseen", "two/seen", "two/seen+unseen", "two/unseen")
SIZES = ("one", "two")
KINDS = ("seen", "unseen")
COLUMN_TITLES = ("One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen", "Two/Unseen")


def overlap(predicted: np.ndarray, truth: np.ndarray, counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union pixel counts of bool masks (..., H, W), over the `counted` pixels."""
    return (np.count_nonzero(predicted & truth & counted, axis=(-2, -1)),
            np.count_nonzero((predicted | truth) & counted, axis=(-2, -1)))


class IoUCounts:
    """Intersection and union pixel counts per class name (see the module docstring)."""

    def __init__(self, pixels: dict[str, list[int]] | None = None):
        self.pixels = {} if pixels is None else pixels  # class name -> [intersection, union]

    def add(self, names: Sequence[str], valid: Sequence[bool], intersection: Sequence[int],
            union: Sequence[int]) -> None:
        """Slots, each with its class name, whether it counts, and its pixel counts (``overlap``)."""
        for name, ok, i, u in zip(names, valid, intersection, union):
            if ok:
                counts = self.pixels.setdefault(name, [0, 0])
                counts[0] += int(i)
                counts[1] += int(u)

    def merge(self, other: IoUCounts) -> IoUCounts:
        """Add the counts of another part of the set; returns self."""
        for name, (i, u) in other.pixels.items():
            counts = self.pixels.setdefault(name, [0, 0])
            counts[0] += i
            counts[1] += u
        return self

    def iou(self, names: Sequence[str], scale: float = 1.0) -> dict[str, float]:
        """IoU times `scale` (100: percent) of each of `names`, in that order, with a non-empty union."""
        return {name: scale * self.pixels[name][0] / self.pixels[name][1]
                for name in names if name in self.pixels and self.pixels[name][1] > 0}


class PresenceCounts:
    """Per named class: masked & found, masked & not found, not masked & found, neither."""

    def __init__(self, counts: Sequence[int] = (0, 0, 0, 0)):
        self.counts = list(counts)

    def add(self, masked: np.ndarray, found: np.ndarray) -> None:
        """(N,) bool: whether each class got a mask, whether the oracle found it."""
        cells = 2 * ~np.asarray(masked, bool) + ~np.asarray(found, bool)
        self.counts = [c + int(n) for c, n in zip(self.counts, np.bincount(cells, minlength=4))]

    def merge(self, other: PresenceCounts) -> PresenceCounts:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        return self

    def rates(self, scale: float = 1.0) -> dict[str, float | None]:
        """Precision and recall (times `scale`) of "the class got a mask" against "the oracle found it"."""
        tp, fp, fn, _ = self.counts
        return {"precision": scale * tp / (tp + fp) if tp + fp else None,
                "recall": scale * tp / (tp + fn) if tp + fn else None}


def count_batch(iou: IoUCounts, presence: PresenceCounts, predicted: Tensor, batch: Batch,
                names: Sequence[str]) -> None:
    """Validation: bool (B, O, H, W) predicted masks of a batch; IoU over its valid slots, presence
    over its named ones; `names[i - 1]` is the class of label index i."""
    predicted, truth = predicted.cpu().numpy(), batch.targets.bool().cpu().numpy()
    intersection, union = overlap(predicted, truth, ~batch.ignore.cpu().numpy()[:, None])
    slots = [names[i - 1] if i else "" for i in batch.class_indices.flatten().tolist()]
    iou.add(slots, batch.valid.flatten().tolist(), intersection.ravel(), union.ravel())
    named = batch.named.cpu().numpy()
    presence.add(predicted.any(axis=(2, 3))[named], batch.present.cpu().numpy()[named])


def group_of(classes: Sequence[str], unseen: frozenset[str]) -> str | None:
    """The Protocol-I group of a sample's classes, given a split's unseen class names.

    Samples with more than two classes belong to no group: the paper's test sets hold one
    or two objects (its Table 1 has no column for more), so they are not counted at all.
    """
    n_unseen = sum(name in unseen for name in classes)
    if len(classes) == 1:
        return "one/unseen" if n_unseen else "one/seen"
    if len(classes) == 2:
        return ("two/seen", "two/seen+unseen", "two/unseen")[n_unseen]
    return None


class ProtocolIAccumulator:
    """IoU counts per split and group, presence counts per split, size and kind (module docstring).

    `add` one sample at a time; `merge` accumulators of disjoint parts of the test set
    (Ray workers each fill one, the driver merges); `result` gives the mIoU table.
    """

    def __init__(self, vocabulary: Vocabulary | str | dict, splits: Sequence[int] = (1, 2, 3)):
        self.vocabulary = vocabulary if isinstance(vocabulary, Vocabulary) else get_vocabulary(vocabulary)
        self.splits = tuple(splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct and at least one, got {list(splits)}")
        self._unseen = {k: frozenset(self.vocabulary.unseen(k)) for k in self.splits}  # rejects unknown splits
        self.iou = {(k, g): IoUCounts() for k in self.splits for g in GROUPS}
        self.samples: dict[tuple[int, str], int] = {(k, g): 0 for k in self.splits for g in GROUPS}
        self.presence = {(k, n, c): PresenceCounts() for k in self.splits for n in SIZES for c in KINDS}
        # (split, one|two) -> [images with a class the oracle did not find, those where it got a mask]
        self.absent = {(k, n): [0, 0] for k in self.splits for n in SIZES}

    def add(self, classes: Sequence[str], predicted: np.ndarray, truth: np.ndarray, valid: np.ndarray,
            ignore: np.ndarray | None = None, *, splits: Sequence[int] | None = None,
            present: np.ndarray | None = None) -> None:
        """One sample: its class names, bool (O, H, W) predicted and oracle masks, (O,) valid
        slots (only those count; the sample still files into the group all its classes make)
        and (H, W) pixels to ignore (255 in the label map: counted in no intersection or union).
        A sample counts in a group's `samples` when at least one of its classes is valid.
        `splits`: the splits these predictions are scored for (default: all of this accumulator's),
        when each split has a module of its own. `present`: (O,) whether the oracle found each
        class (default: valid), which the presence counts judge against."""
        predicted, truth, valid = np.asarray(predicted, bool), np.asarray(truth, bool), np.asarray(valid, bool)
        counted = np.ones(truth.shape[1:], bool) if ignore is None else ~np.asarray(ignore, bool)
        if not (predicted.shape == truth.shape and predicted.ndim == 3 and counted.shape == truth.shape[1:]
                and predicted.shape[0] == len(classes) == valid.shape[0] and valid.ndim == 1):
            raise ValueError(f"{len(classes)} classes need (O, H, W) masks, (O,) valid and (H, W) ignore with "
                             f"O={len(classes)}; got predicted {predicted.shape}, truth {truth.shape}, "
                             f"valid {valid.shape}, ignore {counted.shape}")
        if splits is not None and not set(splits) <= set(self.splits):
            raise ValueError(f"splits {list(splits)} are not all among this accumulator's {list(self.splits)}")
        names = [self.vocabulary.lookup(name).name for name in classes]
        if len(names) <= len(SIZES):
            self._add_presence(names, predicted.any(axis=(1, 2)),
                               valid if present is None else np.asarray(present, bool),
                               self.splits if splits is None else splits)
        if not valid.any():
            return
        intersection, union = overlap(predicted, truth, counted)
        for split in self.splits if splits is None else splits:
            group = group_of(names, self._unseen[split])
            if group is None:
                continue
            self.samples[split, group] += 1
            self.iou[split, group].add(names, valid, intersection, union)

    def _add_presence(self, names: list[str], masked: np.ndarray, present: np.ndarray, splits) -> None:
        size = SIZES[len(names) - 1]
        for split in splits:
            unseen = np.array([name in self._unseen[split] for name in names])
            for kind, of_kind in (("seen", ~unseen), ("unseen", unseen)):
                self.presence[split, size, kind].add(masked[of_kind], present[of_kind])
            if not present.all():
                counts = self.absent[split, size]
                counts[0] += 1
                counts[1] += bool((masked & ~present).any())

    def merge(self, other: ProtocolIAccumulator) -> ProtocolIAccumulator:
        """Add another accumulator's counts to this one (same vocabulary and splits); returns self."""
        if other.vocabulary.name != self.vocabulary.name or other.splits != self.splits:
            raise ValueError(f"cannot merge an accumulator of {other.vocabulary.name} splits {list(other.splits)} "
                             f"into one of {self.vocabulary.name} splits {list(self.splits)}")
        for key, counts in other.iou.items():
            self.samples[key] += other.samples[key]
            self.iou[key].merge(counts)
        for key, counts in other.presence.items():
            self.presence[key].merge(counts)
        for key, values in other.absent.items():
            self.absent[key] = [a + b for a, b in zip(self.absent[key], values)]
        return self

    def to_dict(self) -> dict:
        """JSON-ready counts (how Ray workers hand their accumulator to the driver)."""
        return {"vocabulary": self.vocabulary.spec(), "splits": list(self.splits),
                "groups": {str(k): {g: {"samples": self.samples[k, g], "pixels": dict(self.iou[k, g].pixels)}
                                    for g in GROUPS} for k in self.splits},
                "presence": {f"{k}/{n}/{c}": v.counts for (k, n, c), v in self.presence.items()},
                "absent": {f"{k}/{n}": v for (k, n), v in self.absent.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ProtocolIAccumulator:
        accumulator = cls(data["vocabulary"], data["splits"])
        for k in accumulator.splits:
            for g in GROUPS:
                saved = data["groups"][str(k)][g]
                accumulator.samples[k, g] = saved["samples"]
                accumulator.iou[k, g] = IoUCounts({name: [int(i), int(u)] for name, (i, u) in saved["pixels"].items()})
        for key, values in data["presence"].items():
            k, n, c = key.split("/")
            accumulator.presence[int(k), n, c] = PresenceCounts(values)
        for key, values in data["absent"].items():
            k, n = key.split("/")
            accumulator.absent[int(k), n] = list(values)
        return accumulator

    def result(self) -> dict:
        """Per split and group: mIoU (percent, None when no class has a non-empty union), the
        per-class IoUs (percent, classes in vocabulary order) and the sample count. "average" is
        the paper's Average: each group's mIoU averaged over all the vocabulary's splits (None for
        a group that some split has no mIoU for); None when this accumulator lacks a split."""
        splits = {}
        for k in self.splits:
            groups = {}
            for g in GROUPS:
                iou = self.iou[k, g].iou(self.vocabulary.names, scale=100.0)
                groups[g] = {"miou": sum(iou.values()) / len(iou) if iou else None, "iou": iou,
                             "samples": self.samples[k, g]}
            splits[str(k)] = groups
            splits[str(k)]["presence"] = {n: {c: _presence(self.presence[k, n, c]) for c in KINDS} for n in SIZES}
            splits[str(k)]["absent"] = {n: _absent(self.absent[k, n]) for n in SIZES}
        average = None
        if set(self.splits) == set(range(1, len(self.vocabulary.unseen_splits) + 1)):
            average = {}
            for g in GROUPS:
                values = [splits[str(k)][g]["miou"] for k in self.splits]
                average[g] = None if None in values else sum(values) / len(values)
        return {"vocabulary": self.vocabulary.name, "splits": splits, "average": average}


def _presence(counts: PresenceCounts) -> dict:
    """Precision and recall (percent) of "got a mask" against "the oracle found it"."""
    tp, fp, fn, tn = counts.counts
    return {**counts.rates(scale=100.0), "found": tp + fn, "not_found": fp + tn}


def _absent(counts: list[int]) -> dict:
    images, masked = counts
    return {"images": images, "masked": masked, "rate": 100.0 * masked / images if images else None}


def format_table(results_by_method: dict[str, dict]) -> str:
    """A plain-text table like Table 1 of Li et al. 2023: one block of rows per method (its splits, then
    their Average when every split was evaluated), one column per group, each cell the mIoU and, in
    parentheses, the images it was scored on; empty groups print as "-"."""
    rows = []
    for method, result in results_by_method.items():
        lines = [(k, groups) for k, groups in result["splits"].items()]
        if result["average"] is not None:
            lines.append(("Average", {g: {"miou": result["average"][g], "samples": None} for g in GROUPS}))
        for n, (split, groups) in enumerate(lines):
            rows.append([method if n == 0 else "", split,
                         *(cell(groups[g]["miou"], samples=groups[g]["samples"]) for g in GROUPS)])
    return text_table(["Method", "Split", *COLUMN_TITLES], rows)


def _precision_recall(counts: dict) -> str:
    if counts["recall"] is None and counts["precision"] is None:
        return "-"
    return f"{cell(counts['precision'])}/{cell(counts['recall'])}"


def _masked(counts: dict) -> str:
    return "-" if counts["rate"] is None else f"{counts['rate']:.1f}% of {counts['images']}"


def format_presence_table(results_by_method: dict[str, dict]) -> str:
    """Label truth per method and split: presence precision / recall (percent) of seen and unseen classes
    in one- and two-object images, against the oracle's found flags, and the share of images with an
    absent class in which it got a mask; "-" where the test set has no such case."""
    header = ["Method", "Split", *(f"{n}/{c} P/R" for n in SIZES for c in KINDS), "Absent masked one",
              "Absent masked two"]
    rows = [[method if n == 0 else "", split,
             *(_precision_recall(groups["presence"][size][kind]) for size in SIZES for kind in KINDS),
             *(_masked(groups["absent"][size]) for size in SIZES)]
            for method, result in results_by_method.items()
            for n, (split, groups) in enumerate(result["splits"].items())]
    return text_table(header, rows)
