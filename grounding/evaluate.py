"""Protocol-I metrics (Li et al., ICCV 2023, Table 1): mIoU over classes on synthetic test sets.

Every sample is filed, per seen/unseen split, into one of five groups by how many objects
its prompt names and whether they are seen in that split:

    one/seen   one/unseen   two/seen   two/seen+unseen   two/unseen

As in the paper, each split has a module of its own, trained on that split's seen classes:
a split is scored only with its module, a module that saw the split's unseen classes is
refused, and the Average over the splits is reported only when all of them have a module.

Per group and class the accumulator sums intersection and union pixel counts over all
samples (exact integers, so accumulators of any partition of the test set merge into the
same totals), leaving out pixels the label map marks 255; a class's IoU is its intersection
over its union, and a group's mIoU is the mean IoU over its classes with a non-empty union.
Values are reported in percent, as in the paper's tables.

The papers' protocol asks the module for a mask of every class (their test images show them
all); a module with a presence head is also scored as the annotator uses it ("presence-gated": a
class it judges absent gets no mask). Beside the paper's mIoU, which scores only classes the
oracle found, the accumulator counts label truth over every named class, found or not (a test
set built with ``on_missing: ignore`` keeps the images the generator drew without a prompted
class): per split, object count (one/two) and
seen/unseen class, whether the class got a mask against whether the oracle found it (presence
precision and recall), and how many images with an absent class gave it a mask. A text-blind
control ("text permuted") asks the same module about each class under another class's name (a
fixed derangement of the vocabulary) and scores the masks against the true class: what the
module owes to the text rather than to finding a salient object.

The metric code takes predictions and oracle masks as bool arrays;
``EvalStage`` is the Ray actor that makes them with a module and with DAAM, and
``prepare_evaluation`` / ``run_evaluation`` drive it over a test set
(``jobs/eval_grounding.py``): the batches are fixed by the driver and the counts are
integers, so the result does not depend on the worker count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.core.cluster import map_positions
from factory.core.devices import pick_device
from factory.core.errors import EvalError
from factory.core.storage import absolute_model_source, absolute_uri, check_reachable, split_file_uri
from factory.core.vocab import Vocabulary, get_vocabulary
from factory.diffusion.clip import select_top_fraction
from factory.diffusion.daam import DAAM_THRESHOLD, daam_masks
from factory.diffusion.features import from_fp16_bytes
from grounding.checkpoint import (
    check_generation,
    load_grounding_checkpoint,
    read_grounding_metadata,
    training_generation,
)
from grounding.data import Batch, Featurizer, TextConfig, TripletSource, text_class_embeddings
from grounding.model import GroundingModule

GROUPS = ("one/seen", "one/unseen", "two/seen", "two/seen+unseen", "two/unseen")
SIZES = ("one", "two")
KINDS = ("seen", "unseen")
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

    def __init__(self, vocabulary: Vocabulary | str | dict, splits: Sequence[int] = (1, 2, 3)):
        self.vocabulary = vocabulary if isinstance(vocabulary, Vocabulary) else get_vocabulary(vocabulary)
        self.splits = tuple(splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct and at least one, got {list(splits)}")
        self._unseen = {k: frozenset(self.vocabulary.unseen(k)) for k in self.splits}  # rejects unknown splits
        # (split, group) -> class name -> [intersection, union]; and samples per (split, group)
        self.pixels: dict[tuple[int, str], dict[str, list[int]]] = {(k, g): {} for k in self.splits for g in GROUPS}
        self.samples: dict[tuple[int, str], int] = {(k, g): 0 for k in self.splits for g in GROUPS}
        # (split, one|two, seen|unseen) -> [masked & found, masked & not found, not masked & found, neither]
        self.presence = {(k, n, c): [0, 0, 0, 0] for k in self.splits for n in SIZES for c in KINDS}
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
        intersection = np.count_nonzero(predicted & truth & counted, axis=(1, 2))
        union = np.count_nonzero((predicted | truth) & counted, axis=(1, 2))
        for split in self.splits if splits is None else splits:
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

    def _add_presence(self, names: list[str], masked: np.ndarray, present: np.ndarray, splits) -> None:
        size = SIZES[len(names) - 1]
        for split in splits:
            for name, got, there in zip(names, masked, present):
                kind = "unseen" if name in self._unseen[split] else "seen"
                self.presence[split, size, kind][(not got) * 2 + (not there)] += 1
            if not present.all():
                counts = self.absent[split, size]
                counts[0] += 1
                counts[1] += bool((masked & ~present).any())

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
        for counts, theirs in ((self.presence, other.presence), (self.absent, other.absent)):
            for key, values in theirs.items():
                counts[key] = [a + b for a, b in zip(counts[key], values)]
        return self

    def to_dict(self) -> dict:
        """JSON-ready counts (how Ray workers hand their accumulator to the driver)."""
        return {"vocabulary": self.vocabulary.spec(), "splits": list(self.splits),
                "groups": {str(k): {g: {"samples": self.samples[k, g], "pixels": dict(self.pixels[k, g])}
                                    for g in GROUPS} for k in self.splits},
                "presence": {f"{k}/{n}/{c}": v for (k, n, c), v in self.presence.items()},
                "absent": {f"{k}/{n}": v for (k, n), v in self.absent.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ProtocolIAccumulator:
        accumulator = cls(data["vocabulary"], data["splits"])
        for k in accumulator.splits:
            for g in GROUPS:
                saved = data["groups"][str(k)][g]
                accumulator.samples[k, g] = saved["samples"]
                accumulator.pixels[k, g] = {name: [int(i), int(u)] for name, (i, u) in saved["pixels"].items()}
        for key, values in data["presence"].items():
            k, n, c = key.split("/")
            accumulator.presence[int(k), n, c] = list(values)
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
                table = self.pixels[k, g]
                iou = {name: 100.0 * table[name][0] / table[name][1]
                       for name in self.vocabulary.names if name in table and table[name][1] > 0}
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


def _presence(counts: list[int]) -> dict:
    """Precision and recall (percent) of "got a mask" against "the oracle found it"."""
    tp, fp, fn, tn = counts
    return {"precision": 100.0 * tp / (tp + fp) if tp + fp else None,
            "recall": 100.0 * tp / (tp + fn) if tp + fn else None,
            "found": tp + fn, "not_found": fp + tn}


def _absent(counts: list[int]) -> dict:
    images, masked = counts
    return {"images": images, "masked": masked, "rate": 100.0 * masked / images if images else None}


def _cell(value: float | None, samples: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if samples is None else f"{value:.2f} ({samples})"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text rows under a header and a rule: names (the first two columns) left-aligned, numbers
    right-aligned, as in the paper's tables."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


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
                         *(_cell(groups[g]["miou"], groups[g]["samples"]) for g in GROUPS)])
    return _text_table(["Method", "Split", *COLUMN_TITLES], rows)


def _precision_recall(cell: dict) -> str:
    if cell["recall"] is None and cell["precision"] is None:
        return "-"
    return f"{_cell(cell['precision'])}/{_cell(cell['recall'])}"


def _masked(cell: dict) -> str:
    return "-" if cell["rate"] is None else f"{cell['rate']:.1f}% of {cell['images']}"


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
    return _text_table(header, rows)


MODULE = "grounding module"
GATED = "grounding module, presence-gated"
TEXT_PERMUTED = "grounding module, text permuted"
DAAM = "DAAM"


def derangement(names: Sequence[str], seed: int = 0) -> dict[str, str]:
    """A fixed permutation of `names` that moves every one (the text-blind control's class swap)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(names))
        if len(names) < 2 or not np.any(order == np.arange(len(names))):
            return {name: names[k] for name, k in zip(names, order)}


class EvalStage:
    """Ray Data actor: each split's module and the frozen Stable Diffusion parts, loaded once.

    Each call gets batches of row positions and returns, per batch, the JSON of a module
    accumulator (each split's counts made by that split's module, on the same features) and
    of a DAAM one (empty when DAAM is skipped).
    """

    def __init__(self, checkpoints: dict[int, str], data: str, generator: str, daam_threshold: float | None,
                 presence_threshold: float = 0.5, text_control: bool = True):
        device = pick_device()
        self.modules: dict[int, tuple[GroundingModule, TextConfig]] = {}  # split -> module, its text config
        for split, uri in sorted(checkpoints.items()):
            module, metadata = load_grounding_checkpoint(uri)
            self.modules[split] = module.to(device), TextConfig.model_validate(metadata["text"])
        self.splits = list(self.modules)
        self.source = TripletSource.open(data)
        self.featurizer = Featurizer(self.source, self.modules[self.splits[0]][1], ignore_empty=True, device=device,
                                     generator=generator)
        self.daam_threshold, self.presence_threshold = daam_threshold, presence_threshold
        vocabulary = self.source.vocabulary
        self.swap = ({vocabulary.lookup(name).natural: vocabulary.lookup(other).natural
                      for name, other in derangement(vocabulary.names).items()} if text_control else None)
        self.columns = self.source.columns + (["daam"] if daam_threshold is not None else [])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[str]] = {"module": [], "gated": [], "control": [], "daam": []}
        for positions in batch["positions"]:
            accumulators = self._evaluate(self.source.take(list(positions), self.columns))
            for key in out:
                out[key].append(json.dumps(accumulators[key].to_dict()) if key in accumulators else "")
        return {key: np.array(values) for key, values in out.items()}

    def _evaluate(self, rows) -> dict[str, ProtocolIAccumulator]:
        vocabulary = self.source.vocabulary
        inputs = self.featurizer(rows)  # the U-Net features and oracle targets serve every split's module
        prompts, words = rows.column("prompt").to_pylist(), rows.column("class_words").to_pylist()
        # The papers' Protocol-I asks for a mask of every class (their test images show them all);
        # gated, a class the presence head judges absent gets none, as the annotator labels.
        predicted = {"module": self._predict(inputs, prompts, words, swapped=False, gate=None)}
        if any(module.config.presence != "none" for module, _ in self.modules.values()):
            predicted["gated"] = self._predict(inputs, prompts, words, swapped=False, gate=self.presence_threshold)
        if self.swap is not None:  # each class asked for under another class's name, scored as itself
            swapped = [[self.swap.get(w, w) for w in row] for row in words]
            prompts = [_swap_words(p, row, new) for p, row, new in zip(prompts, words, swapped)]
            predicted["control"] = self._predict(inputs, prompts, swapped, swapped=True, gate=self.presence_threshold)
        truth, valid = inputs.targets.bool().cpu().numpy(), inputs.valid.cpu().numpy()
        present, ignore = inputs.present.cpu().numpy(), inputs.ignore.cpu().numpy()
        accumulators = {key: ProtocolIAccumulator(vocabulary, self.splits) for key in predicted}
        if self.daam_threshold is not None:
            accumulators["daam"] = ProtocolIAccumulator(vocabulary, self.splits)
            heatmaps = rows.column("daam").to_pylist()
        for i, classes in enumerate(rows.column("classes").to_pylist()):
            n = len(classes)
            for key, by_split in predicted.items():
                for split, masks in by_split.items():
                    accumulators[key].add(classes, masks[i, :n], truth[i, :n], valid[i, :n], ignore[i],
                                          splits=[split], present=present[i, :n])
            if "daam" in accumulators:
                maps = np.stack([from_fp16_bytes(m, self.source.shapes["daam"]) for m in heatmaps[i]])
                # DAAM's expand_as: bicubic from the latent grid to the oracle masks' (image) size, min-max, > tau
                masks = daam_masks(maps[None], self.daam_threshold, size=truth.shape[-2:])[0]
                accumulators["daam"].add(classes, masks, truth[i, :n], valid[i, :n], ignore[i], present=present[i, :n])
        return accumulators

    def _predict(self, inputs: Batch, prompts: list[str], words: list[list[str]], swapped: bool,
                 gate: float | None) -> dict[int, np.ndarray]:
        """Each split's module's masks for the classes that `words` name (the features are the images');
        the featurizer's class embeddings serve a module that reads the same text, unswapped."""
        out = {}
        for split, (module, text) in self.modules.items():
            if text == self.featurizer.text and not swapped:
                embeddings, mask = inputs.class_embeddings, inputs.class_mask
            else:
                embeddings, mask = text_class_embeddings(self.featurizer.pipe, text, prompts, words)
            out[split] = module.predict(inputs.features, embeddings, mask, gate).cpu().numpy()
        return out


def _swap_words(prompt: str, words: Sequence[str], new: Sequence[str]) -> str:
    """`prompt` with each class word replaced by its substitute (a text made from the prompt then names
    the substitutes); placeholders first, so that one substitution cannot hit another's output."""
    for k, word in enumerate(words):
        prompt = prompt.replace(word, f"\x00{k}\x00", 1)
    for k, word in enumerate(new):
        prompt = prompt.replace(f"\x00{k}\x00", word)
    return prompt


FORMAT = "protocol-i-results/2"
MODULE_THRESHOLD = 0.5  # GroundingModule.predict: sigmoid(logits) > 0.5
_CHECKPOINT_KEYS = ("model", "text", "capture", "vocabulary", "classes")


class GroundingEvalOptions(BaseModel):
    """The options of a Protocol-I evaluation (``jobs/eval_grounding.py``)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    checkpoints: dict[int, str] = Field(
        min_length=1, strict=False, description="one grounding checkpoint folder (local or s3://) per seen/unseen "
        "split, trained on that split's seen classes, as a YAML mapping: '{1: URI, 2: URI, 3: URI}'; each split "
        "is scored with its own module, and the paper's Average needs all three")
    data: str = Field(description="triplet test set (local or s3://)")
    out: str | None = Field(None, description="results JSON file, local or s3:// (null: print only)")
    daam_threshold: float = Field(DAAM_THRESHOLD, ge=0.0, le=1.0,
                                  description="DAAM heat-map threshold (Tang et al.'s; heat maps are normalised)")
    presence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="in the presence-gated rows (and the text "
                                      "control), a module with a presence head gives a class scoring below this no "
                                      "mask, as the annotator (its presence_threshold); the plain rows ask for a mask "
                                      "of every class, as the papers' protocol")
    text_control: bool = Field(True, description="also score the text-blind control: every class asked for under "
                               "another class's name (a fixed derangement), its masks scored as the true class")
    batch_size: int = Field(8, ge=1, description="rows per module call")
    num_workers: int | None = Field(None, ge=1, description="actors (null: one per GPU in the cluster, else 1)")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="automatic test-set filter, detector "
                                    "agreement: keep samples whose every class the oracle found with this score")
    keep_quality: float | None = Field(None, gt=0.0, le=1.0, description="automatic test-set filter, image "
                                       "quality: keep this best fraction by the CLIP quality score (the follow-up "
                                       "paper keeps 0.8; needs a build with quality.model)")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _per_split(cls, value):
        if isinstance(value, str):  # one checkpoint for every split: what the paper does not do
            # pydantic turns a ValueError (not a TypeError) into the option's one-line error
            raise ValueError(f"one checkpoint per split, as a mapping: '{{1: URI, 2: URI, 3: URI}}' "  # noqa: TRY004
                             f"(got {value!r})")
        return value


@dataclass
class EvalPlan:
    checkpoints: dict[int, str]  # split -> checkpoint URI, splits in order
    data: str
    out: str | None
    vocabulary: str | dict  # Vocabulary.spec()
    daam_threshold: float | None  # None: the dataset has no heat maps, DAAM is skipped
    presence_threshold: float
    text_control: bool
    batches: list[list[int]]  # row positions of each module call, fixed here
    num_workers: int | None
    report: dict  # the JSON's fields other than the results


def select_test_rows(source: TripletSource, min_score: float | None, keep_quality: float | None) -> list[int]:
    """Row positions that pass the automatic filter replacing the papers' manual check."""
    columns = ["found", "scores"] + (["quality"] if keep_quality is not None else [])
    try:
        table = source.read(columns)
    except (KeyError, pa.ArrowInvalid):
        raise EvalError(f"--keep-quality needs quality scores: build {source.uri} with --quality.model") from None
    keep = np.ones(table.num_rows, bool)
    if min_score is not None:
        keep &= np.array([all(found) and min(scores) >= min_score for found, scores in
                          zip(table.column("found").to_pylist(), table.column("scores").to_pylist())])
    if keep_quality is not None and keep.any():
        quality = table.column("quality").to_numpy()
        keep &= select_top_fraction(np.where(keep, quality, -np.inf), keep_quality * keep.mean())
    return [int(i) for i in np.flatnonzero(keep)]


def _check_checkpoint(split: int, uri: str, metadata: dict, source: TripletSource) -> list[str]:
    """One split's checkpoint against the test set: refuses (one line) a module that cannot read
    these features or that saw the split's unseen classes; returns the notes to print."""
    missing = [key for key in _CHECKPOINT_KEYS if key not in metadata]
    if missing:
        raise EvalError(f"{uri} lacks {', '.join(missing)} in its checkpoint.json")
    vocabulary = source.vocabulary
    if metadata["vocabulary"]["name"] != vocabulary.name:
        raise EvalError(f"{source.uri} was made with vocabulary {vocabulary.name}, the training data of {uri} "
                        f"with {metadata['vocabulary']['name']}")
    features, others = check_generation(training_generation(uri, metadata), source.generation)
    if features:
        raise EvalError(f"{source.uri} does not have the features {uri} (split {split}) was trained on: "
                        f"{'; '.join(features)} (its training data vs the test set)")
    height, width = source.image_size
    if not metadata["model"]["mask_resolution"] == height == width:
        raise EvalError(f"{uri} makes {metadata['model']['mask_resolution']}-pixel masks, "
                        f"{source.uri} has {height}x{width} images")
    shown = sorted(set(metadata["classes"]).intersection(vocabulary.unseen(split)))
    if shown:
        raise EvalError(f"{uri} was trained on {', '.join(shown)}, unseen classes of split {split}: it is not "
                        f"zero-shot there; give split {split} a module trained on its seen classes "
                        f"(jobs/train_grounding.py --split {split})")
    if not others:
        return []
    note = (f"split {split}: {uri} was trained on images made otherwise than the test set's: {'; '.join(others)} "
            f"(its training data vs the test set); the features are alike")
    return [note]


def prepare_evaluation(args: GroundingEvalOptions) -> EvalPlan:
    """Every check that needs no model; raises a FactoryError (one line) on bad input."""
    checkpoints = {k: absolute_uri(uri) for k, uri in sorted(args.checkpoints.items())}
    metadata = {k: read_grounding_metadata(uri) for k, uri in checkpoints.items()}
    data = absolute_uri(args.data)
    source = TripletSource.open(data)
    vocabulary = source.vocabulary
    try:
        ProtocolIAccumulator(vocabulary, list(checkpoints))  # rejects unknown splits
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    notes = [note for k, uri in checkpoints.items() for note in _check_checkpoint(k, uri, metadata[k], source)]
    out = args.out and absolute_uri(args.out)
    if out:
        check_reachable(split_file_uri(out)[0])

    absent = [k for k in range(1, len(vocabulary.unseen_splits) + 1) if k not in checkpoints]
    if absent:
        notes.append(f"no Average: it is the mean over the modules of all {len(vocabulary.unseen_splits)} splits, "
                     f"and split(s) {', '.join(map(str, absent))} have none here")
    daam_threshold = args.daam_threshold
    if "daam" not in source.shapes:
        daam_threshold = None
        notes.append(f"{data} has no DAAM heat maps (built without --capture.attention true): DAAM skipped")
    kept = select_test_rows(source, args.min_score, args.keep_quality)
    n = len(kept)
    if n == 0:
        raise EvalError(f"no sample of {data} passes the test-set filter")
    batches = [kept[start:start + args.batch_size] for start in range(0, n, args.batch_size)]
    if n < source.rows:
        notes.append(f"test-set filter (min score {args.min_score}, best quality fraction {args.keep_quality}) "
                     f"kept {n} of {source.rows} samples")
    thresholds = ({MODULE: MODULE_THRESHOLD, "presence": args.presence_threshold}
                  | ({DAAM: daam_threshold} if daam_threshold is not None else {}))
    report = {"format": FORMAT, "checkpoints": {str(k): uri for k, uri in checkpoints.items()},
              "checkpoint_epochs": {str(k): m.get("epoch") for k, m in metadata.items()},
              "trained_classes": {str(k): m["classes"] for k, m in metadata.items()}, "data": data,
              "plan_digest": source.manifest["plan"]["digest"], "samples": n, "vocabulary": vocabulary.name,
              "splits": list(checkpoints), "thresholds": thresholds,
              "scored": "mIoU: classes the oracle found with a non-empty mask, on pixels the label map does not mark "
                        "255; presence: every named class, a mask (any pixel) against the oracle's found flag",
              "notes": notes}
    return EvalPlan(checkpoints, data, out, vocabulary.spec(), daam_threshold, args.presence_threshold,
                    args.text_control, batches, args.num_workers, report)


def run_evaluation(plan: EvalPlan) -> dict:
    """The report: plan.report plus "results" per method (ProtocolIAccumulator.result)."""
    pool = map_positions(EvalStage, {"checkpoints": plan.checkpoints, "data": plan.data,
                                     "generator": absolute_model_source(TripletSource.open(plan.data).generator),
                                     "daam_threshold": plan.daam_threshold,
                                     "presence_threshold": plan.presence_threshold,
                                     "text_control": plan.text_control}, plan.batches, plan.num_workers)
    methods = {"module": MODULE, "gated": GATED, "control": TEXT_PERMUTED, "daam": DAAM}
    totals: dict[str, ProtocolIAccumulator] = {}
    for row in pool.rows:  # integer counts: the merge order does not matter
        for key, method in methods.items():
            if row[key]:
                part = ProtocolIAccumulator.from_dict(json.loads(row[key]))
                totals[method] = totals[method].merge(part) if method in totals else part
    return {**plan.report, "results": {method: totals[method].result() for method in methods.values()
                                       if method in totals}}
