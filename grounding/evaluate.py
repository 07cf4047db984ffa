"""Protocol-I metrics (spec section 8; 003, Table 1): mIoU over classes on synthetic test sets.

Every sample is filed, per seen/unseen split, into one of five groups by how many objects
its prompt names and whether they are seen in that split:

    one/seen   one/unseen   two/seen   two/seen+unseen   two/unseen

Per group and class the accumulator sums intersection and union pixel counts over all
samples (exact integers, so accumulators of any partition of the test set merge into the
same totals); a class's IoU is its intersection over its union, and a group's mIoU is the
mean IoU over its classes with a non-empty union. Values are reported in percent, as in
the paper's tables. The metric code takes predictions and oracle masks as bool arrays;
``EvalStage`` at the end is the Ray actor that makes them with a module and with DAAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import json

import numpy as np

from factory.daam import daam_masks
from factory.devices import pick_device
from factory.features import from_fp16_bytes
from factory.vocab import Vocabulary, get_vocabulary
from grounding.data import Featurizer, TextConfig, TripletSource
from grounding.train import load_grounding_checkpoint

GROUPS = ("one/seen", "one/unseen", "two/seen", "two/seen+unseen", "two/unseen")
COLUMN_TITLES = ("One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen", "Two/Unseen")


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
    """Intersection and union pixel counts per split, group and class.

    `add` one sample at a time; `merge` accumulators of disjoint parts of the test set
    (Ray workers each fill one, the driver merges); `result` gives the mIoU table.
    """

    def __init__(self, vocabulary: Vocabulary | str, splits: Sequence[int] = (1, 2, 3)):
        self.vocabulary = get_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
        self.splits = tuple(splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct and at least one, got {list(splits)}")
        self._unseen = {k: frozenset(self.vocabulary.unseen(k)) for k in self.splits}  # rejects unknown splits
        # (split, group) -> class name -> [intersection, union]; and samples per (split, group)
        self.pixels: dict[tuple[int, str], dict[str, list[int]]] = {(k, g): {} for k in self.splits for g in GROUPS}
        self.samples: dict[tuple[int, str], int] = {(k, g): 0 for k in self.splits for g in GROUPS}

    def add(self, classes: Sequence[str], predicted: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        """One sample: its class names, bool (O, H, W) predicted and oracle masks, and (O,) valid
        slots (only those count; the sample still files into the group all its classes make).
        A sample counts in a group's `samples` when at least one of its classes is valid."""
        predicted, truth, valid = np.asarray(predicted, bool), np.asarray(truth, bool), np.asarray(valid, bool)
        if not (predicted.shape == truth.shape and predicted.ndim == 3
                and predicted.shape[0] == len(classes) == valid.shape[0] and valid.ndim == 1):
            raise ValueError(f"{len(classes)} classes need (O, H, W) masks and (O,) valid with O={len(classes)}; "
                             f"got predicted {predicted.shape}, truth {truth.shape}, valid {valid.shape}")
        if not valid.any():
            return
        names = [self.vocabulary.lookup(name).name for name in classes]
        intersection = np.count_nonzero(predicted & truth, axis=(1, 2))
        union = np.count_nonzero(predicted | truth, axis=(1, 2))
        for split in self.splits:
            group = group_of(names, self._unseen[split])
            if group is None:
                continue
            self.samples[split, group] += 1
            table = self.pixels[split, group]
            for name, ok, i, u in zip(names, valid, intersection, union):
                if ok:
                    counts = table.setdefault(name, [0, 0])
                    counts[0] += int(i)
                    counts[1] += int(u)

    def merge(self, other: ProtocolIAccumulator) -> ProtocolIAccumulator:
        """Add another accumulator's counts to this one (same vocabulary and splits); returns self."""
        if other.vocabulary.name != self.vocabulary.name or other.splits != self.splits:
            raise ValueError(f"cannot merge an accumulator of {other.vocabulary.name} splits {list(other.splits)} "
                             f"into one of {self.vocabulary.name} splits {list(self.splits)}")
        for key, table in other.pixels.items():
            self.samples[key] += other.samples[key]
            mine = self.pixels[key]
            for name, (i, u) in table.items():
                counts = mine.setdefault(name, [0, 0])
                counts[0] += i
                counts[1] += u
        return self

    def to_dict(self) -> dict:
        """JSON-ready counts (how Ray workers hand their accumulator to the driver)."""
        return {"vocabulary": self.vocabulary.name, "splits": list(self.splits),
                "groups": {str(k): {g: {"samples": self.samples[k, g], "pixels": dict(self.pixels[k, g])}
                                    for g in GROUPS} for k in self.splits}}

    @classmethod
    def from_dict(cls, data: dict) -> ProtocolIAccumulator:
        accumulator = cls(data["vocabulary"], data["splits"])
        for k in accumulator.splits:
            for g in GROUPS:
                saved = data["groups"][str(k)][g]
                accumulator.samples[k, g] = saved["samples"]
                accumulator.pixels[k, g] = {name: [int(i), int(u)] for name, (i, u) in saved["pixels"].items()}
        return accumulator

    def result(self) -> dict:
        """Per split and group: mIoU (percent, None when no class has a non-empty union), the
        per-class IoUs (percent, classes in vocabulary order) and the sample count; "mean" is
        each group's mIoU averaged over the splits, None unless every split has one."""
        splits = {}
        for k in self.splits:
            groups = {}
            for g in GROUPS:
                table = self.pixels[k, g]
                iou = {name: 100.0 * table[name][0] / table[name][1]
                       for name in self.vocabulary.names if name in table and table[name][1] > 0}
                groups[g] = {"miou": sum(iou.values()) / len(iou) if iou else None, "iou": iou,
                             "samples": self.samples[k, g]}
            splits[str(k)] = groups
        mean = {}
        for g in GROUPS:
            values = [splits[str(k)][g]["miou"] for k in self.splits]
            mean[g] = None if None in values else sum(values) / len(values)
        return {"vocabulary": self.vocabulary.name, "splits": splits, "mean": mean}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(results_by_method: dict[str, dict]) -> str:
    """A plain-text table like Table 1 of 003: one block of rows per method (its splits, then
    their mean), one column per group; empty groups print as "-"."""
    header = ["Method", "Split", *COLUMN_TITLES]
    rows = []
    for method, result in results_by_method.items():
        lines = [(k, groups) for k, groups in result["splits"].items()]
        lines.append(("mean", {g: {"miou": result["mean"][g]} for g in GROUPS}))
        for n, (split, groups) in enumerate(lines):
            rows.append([method if n == 0 else "", split, *(_cell(groups[g]["miou"]) for g in GROUPS)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned, as in the paper's tables.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


MODULE = "grounding module"
DAAM = "DAAM"


class EvalStage:
    """Ray Data actor: the module and the frozen Stable Diffusion parts, loaded once.

    Each call gets batches of row positions and returns, per batch, the JSON of a
    module accumulator and of a DAAM one (empty when DAAM is skipped).
    """

    def __init__(self, checkpoint: str, data: str, splits: list[int], daam_threshold: float | None):
        device = pick_device()
        module, metadata = load_grounding_checkpoint(checkpoint)
        self.module = module.to(device)
        self.source = TripletSource(data)
        self.featurizer = Featurizer(self.source, TextConfig.model_validate(metadata["text"]), ignore_empty=True,
                                     device=device)
        self.splits, self.daam_threshold = splits, daam_threshold
        self.columns = self.source.columns + (["daam"] if daam_threshold is not None else [])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module_json, daam_json = [], []
        for positions in batch["positions"]:
            module_acc, daam_acc = self._evaluate(self.source.take(list(positions), self.columns))
            module_json.append(json.dumps(module_acc.to_dict()))
            daam_json.append(json.dumps(daam_acc.to_dict()) if daam_acc else "")
        return {"module": np.array(module_json), "daam": np.array(daam_json)}

    def _evaluate(self, rows) -> tuple[ProtocolIAccumulator, ProtocolIAccumulator | None]:
        vocabulary = self.source.vocabulary
        inputs = self.featurizer(rows)
        predicted = self.module.predict(inputs.features, inputs.class_embeddings, inputs.class_mask).cpu().numpy()
        truth, valid = inputs.targets.bool().cpu().numpy(), inputs.valid.cpu().numpy()
        module_acc = ProtocolIAccumulator(vocabulary, self.splits)
        daam_acc = ProtocolIAccumulator(vocabulary, self.splits) if self.daam_threshold is not None else None
        heatmaps = rows.column("daam").to_pylist() if daam_acc else None
        for i, classes in enumerate(rows.column("classes").to_pylist()):
            n = len(classes)
            module_acc.add(classes, predicted[i, :n], truth[i, :n], valid[i, :n])
            if daam_acc:
                maps = np.stack([from_fp16_bytes(m, self.source.shapes["daam"]) for m in heatmaps[i]])
                masks = daam_masks(maps[None], self.daam_threshold, size=truth.shape[-2:])[0]
                daam_acc.add(classes, masks, truth[i, :n], valid[i, :n])
        return module_acc, daam_acc
