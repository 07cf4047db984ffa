"""Protocol-I evaluation (Li et al., ICCV 2023, Table 1): mIoU over classes on synthetic test sets,
counted by ``grounding.metrics``.

As in the paper, each split has a module of its own, trained on that split's seen classes:
a split is scored only with its module, a module that saw the split's unseen classes is
refused, and the Average over the splits is reported only when all of them have a module.

The papers' protocol asks the module for a mask of every class (their test images show them
all); a module with a presence head is also scored as the annotator uses it ("presence-gated": a
class it judges absent gets no mask). Beside the paper's mIoU, which scores only classes the
oracle found, the accumulator counts label truth over every named class, found or not (a test
set built with ``on_missing: ignore`` keeps the images the generator drew without a prompted
class). A text-blind control ("text permuted") asks the same module about each class under another
class's name (a fixed derangement of the vocabulary) and scores the masks against the true class:
what the module owes to the text rather than to finding a salient object.

``EvalStage`` is the Ray actor that makes the masks with a module and with DAAM, and
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

from factory.core.cluster import map_positions
from factory.core.devices import pick_device
from factory.core.errors import EvalError
from factory.core.storage import absolute_model_source, absolute_uri, check_reachable, split_file_uri
from factory.diffusion.clip import select_top_fraction
from factory.diffusion.daam import daam_masks
from factory.diffusion.features import from_fp16_bytes
from grounding.checkpoint import (
    check_generation,
    load_grounding_checkpoint,
    read_grounding_metadata,
    training_generation,
)
from grounding.config import GroundingEvalOptions, TextConfig
from grounding.data import Batch, Featurizer, TripletSource, text_class_embeddings
from grounding.metrics import ProtocolIAccumulator
from grounding.model import GroundingModule

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
    """Ray Data actor: each split's module and the frozen generator parts, loaded once.

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
