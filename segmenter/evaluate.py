"""Protocol-II inference on real images, for jobs/eval_zs3.py.

Inference is single-scale resize inference, MaskFormer's standard test-time setting
(detectron2's ResizeShortestEdge): each image is resized (bilinear) so that its short
side is ``size`` pixels, keeping its aspect ratio, and run whole, one image per forward
pass, so no padding and no batch composition touch its scores. The argmax label map is
resized back to the label's size by nearest neighbour and scored there: the metric sees
every ground-truth pixel at its original resolution.

``ZS3Stage`` is the Ray Data actor: it loads the segmenter and the dataset reader once
and turns each batch of sample positions into one integer confusion matrix.
``prepare_evaluation`` / ``run_evaluation`` drive it over a real dataset
(``jobs/eval_zs3.py``): the batches are fixed by the driver and the counts are exact, so
the result does not depend on the worker count; the scores are computed from the summed
matrix for every split.

Background (segmenter/metrics.py): every split is scored under both conventions from the same
matrix, background ignored (ZegFormer, Ding et al. 2022, the papers' comparison point) and
background counted as a seen class (ZS3Net, Bucher et al. 2019), under the keys
``background_ignored`` and ``background_counted``; the table prints both, each row naming its
convention. The split's top-level seen/unseen/harmonic/per_class keep their meaning: the
``background`` option's convention (ignored by default).

Every result says how its model was trained: the setting, whether that is zero-shot (a
"supervised" model learnt unseen classes from oracle labels: an upper bound, labelled so in
the JSON and the table), and, for the text head, the class names it had never embedded and
that are added here, at test time, with the checkpoint's own text encoder (the inductive
setting: the unseen classes).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from factory.core.cluster import map_positions
from factory.core.devices import pick_device
from factory.core.errors import EvalError
from factory.core.storage import absolute_uri, check_reachable, first_line, is_s3, open_location, split_file_uri
from factory.core.tables import cell, text_table
from factory.core.vocab import Vocabulary, get_vocabulary
from factory.dataset.codec import COLORS
from factory.dataset.real import DEFAULT_SPLITS, real_dataset
from segmenter.checkpoint import load_segmenter_checkpoint, read_segmenter_metadata
from segmenter.config import SegmenterModelConfig, ZS3EvalOptions
from segmenter.data import normalize
from segmenter.metrics import ConfusionMatrix, zs3_scores
from segmenter.model import Segmenter
from segmenter.text import check_text_encoder, encode_class_names

SETTING_LABELS = {"transductive": "transductive zero-shot", "inductive": "inductive zero-shot",
                  "supervised": "supervised (oracle upper bound), not zero-shot"}
# Background convention (segmenter/metrics.py) -> its results key, its table label, what it means.
BACKGROUND_KEYS = {"ignore": "background_ignored", "seen": "background_counted"}
BACKGROUND_LABELS = {"ignore": "ignored (ZegFormer)", "seen": "a seen class (ZS3Net)"}
BACKGROUND_MEANINGS = {
    "ignore": "background pixels left out (ZegFormer, Ding et al. 2022): a class predicted on background costs "
              "nothing",
    "seen": "background a seen class (ZS3Net, Bucher et al. 2019): a class predicted on background loses IoU by it, "
            "and background's own IoU is in the seen mean"}


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) scaled so that the short side is `size`."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.inference_mode()
def predict(model: Segmenter, image: np.ndarray, size: int, device: torch.device) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 label map (H, W), labels 0..K (see the module docstring)."""
    height, width = image.shape[:2]
    new_height, new_width = short_side_size(height, width, size)
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR))
    pixels = normalize(torch.from_numpy(resized.copy())[None].to(device))
    labels = model.semantic_logits(pixels)[0].argmax(0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))


def render_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> bytes:
    """PNG of image | ground truth | prediction, label maps in VOC colours (255 cream)."""
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([image, gap, COLORS[label], gap, COLORS[prediction]], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG")
    return buffer.getvalue()


class ZS3Stage:
    """Ray Data actor: batches of {"positions": sample positions} -> per batch, the JSON of its
    confusion matrix, its image count and the seconds spent on it.

    `panels` maps sample positions to file names in `panel_folder` (local or s3://): those
    samples' panels are written there as they are predicted. `added` maps the labels of
    classes added to a text head at test time to their text embeddings.
    """

    def __init__(self, checkpoint: str, format: str, root: str, split: str, vocabulary: str | dict, size: int,
                 panels: dict[int, str], panel_folder: str | None, added: dict[int, list[float]]):
        self.device = pick_device()
        model, _ = load_segmenter_checkpoint(checkpoint)
        if added:
            model.add_class_embeddings(list(added), torch.tensor(list(added.values())))
        self.model = model.to(self.device)
        self.num_labels = model.config.num_labels
        self.reader = real_dataset(format, root, split, vocabulary)
        self.size = size
        self.panels = panels
        self.panel_location = open_location(panel_folder) if panel_folder else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        matrices, images, seconds = [], [], []
        for positions in batch["positions"]:
            start = time.perf_counter()
            matrix = ConfusionMatrix(self.num_labels)
            for position in map(int, positions):
                sample = self.reader[position]
                prediction = predict(self.model, sample.image, self.size, self.device)
                matrix.update(prediction, sample.label)
                if position in self.panels:
                    self.panel_location.write_bytes(self.panels[position],
                                                    render_panel(sample.image, sample.label, prediction))
            matrices.append(json.dumps(matrix.to_dict()))
            images.append(len(positions))
            seconds.append(time.perf_counter() - start)
        return {"confusion": np.array(matrices), "images": np.array(images), "seconds": np.array(seconds)}


FORMAT = "zs3-results/1"
_CHECKPOINT_KEYS = ("model", "vocabulary", "setting", "split")


@dataclass
class EvalPlan:
    checkpoint: str
    format: str
    root: str
    split_set: str
    size: int
    vocabulary: Vocabulary
    num_labels: int
    splits: list[int]
    background: str
    out: str | None
    batches: list[list[int]]  # sample positions of each confusion matrix, fixed here
    panels: dict[int, str]  # sample position -> panel file name next to --out
    added: dict[int, list[float]]  # text head: label -> text embedding of a class named at test time
    num_workers: int | None
    report: dict  # the JSON's fields other than the results


def _check_checkpoint(checkpoint: str, metadata: dict, vocabulary: Vocabulary) -> None:
    missing = [key for key in _CHECKPOINT_KEYS if key not in metadata]
    if missing:
        raise EvalError(f"{checkpoint} lacks {', '.join(missing)} in its checkpoint.json")
    trained = metadata["vocabulary"]
    if trained.get("name") != vocabulary.name:
        raise EvalError(f"the checkpoint was trained on the {trained.get('name')} vocabulary, "
                        f"the dataset has {vocabulary.name}")
    if [c["name"] for c in trained.get("classes", [])] != list(vocabulary.names):
        raise EvalError(f"the checkpoint's {vocabulary.name} classes differ from the project's "
                        f"{vocabulary.name} vocabulary (names or order)")
    if metadata["model"]["num_labels"] != len(vocabulary) + 1:
        raise EvalError(f"the checkpoint predicts {metadata['model']['num_labels']} labels, "
                        f"{vocabulary.name} has {len(vocabulary) + 1} with background")
    if metadata["setting"] not in SETTING_LABELS:
        raise EvalError(f"{checkpoint} has the unknown setting {metadata['setting']!r}")


def _names_to_add(checkpoint: str, metadata: dict, model: SegmenterModelConfig, vocabulary: Vocabulary
                  ) -> list[str]:
    """The classes a text head has no embedding for (those an inductive run never named)."""
    if model.head != "text":
        return []
    if "text_classes" not in metadata:
        raise EvalError(f"{checkpoint} lacks text_classes in its checkpoint.json")
    known = set(metadata["text_classes"])
    missing = [name for name in vocabulary.names if name not in known]
    if missing:
        check_text_encoder(model.text_encoder)
    return missing


def prepare_evaluation(args: ZS3EvalOptions) -> EvalPlan:
    """Every check that needs no model; raises a FactoryError (one line) on bad input."""
    if is_s3(args.root):
        raise EvalError(f"--root {args.root} must be a local folder (readable on every node)")
    root, checkpoint = absolute_uri(args.root), absolute_uri(args.checkpoint)
    split_set = args.split_set or DEFAULT_SPLITS[args.format]
    metadata = read_segmenter_metadata(checkpoint)  # first: a wrong path is the likeliest mistake
    try:
        trained = get_vocabulary(metadata["vocabulary"]).spec() if args.format == "voc" else None
        dataset = real_dataset(args.format, root, split_set, args.vocabulary or trained)
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read the {args.format} dataset: {first_line(exc)}") from None
    vocabulary = dataset.vocabulary
    _check_checkpoint(checkpoint, metadata, vocabulary)
    model = SegmenterModelConfig.model_validate(metadata["model"])
    to_add = _names_to_add(checkpoint, metadata, model, vocabulary)
    trained_split = metadata["split"]
    splits = args.splits or ([trained_split] if trained_split is not None else [1, 2, 3])
    if len(set(splits)) != len(splits):
        raise EvalError(f"--splits must be distinct, got {splits}")
    for k in splits:
        try:
            vocabulary.unseen(k)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    out = args.out and absolute_uri(args.out)
    if out:
        check_reachable(split_file_uri(out)[0])

    n = len(dataset)
    if n == 0:
        raise EvalError(f"the {args.format} {split_set} set in {root} has no images")
    setting = metadata["setting"]
    notes = []
    if setting == "supervised":
        notes.append(f"{SETTING_LABELS[setting]}: the model learnt the unseen classes from labels of a labeler "
                     f"trained on them; these numbers are an upper bound, not a zero-shot result")
    elif trained_split is not None:
        notes += [f"split {k}: the model was trained for split {trained_split}, so the unseen classes of "
                  f"split {k} are not zero-shot for it" for k in splits if k != trained_split]
    panels = {}
    if out and args.qualitative:
        stem = split_file_uri(out)[1].rsplit(".", 1)[0]
        # Spread over the dataset rather than its first images.
        for position in np.unique(np.linspace(0, n - 1, min(args.qualitative, n)).round().astype(int)):
            panels[int(position)] = f"{stem}-{dataset.ids[position]}.png"
    batches = [list(range(start, min(start + args.batch_size, n))) for start in range(0, n, args.batch_size)]
    added = {}
    if to_add:  # last: it loads the text encoder
        vectors = encode_class_names(model.text_encoder, vocabulary, to_add, model.text_template)
        added = {vocabulary.lookup(name).index: vector for name, vector in zip(to_add, vectors.tolist())}
    report = {"format": FORMAT, "checkpoint": checkpoint, "checkpoint_iteration": metadata.get("iteration"),
              "setting": setting, "zero_shot": setting != "supervised", "setting_label": SETTING_LABELS[setting],
              "head": model.head, "added_at_test": to_add, "trained_split": trained_split,
              "dataset": {"format": args.format, "root": root, "split_set": split_set, "images": n},
              "vocabulary": vocabulary.name, "splits": splits, "background": args.background,
              "background_conventions": {BACKGROUND_KEYS[m]: BACKGROUND_MEANINGS[m] for m in BACKGROUND_KEYS},
              "inference": {"mode": "resize", "short_side": args.size, "label_resize": "nearest"},
              "qualitative": sorted(panels.values()), "notes": notes}
    return EvalPlan(checkpoint, args.format, root, split_set, args.size, vocabulary,
                    metadata["model"]["num_labels"], splits, args.background, out, batches, panels, added,
                    args.num_workers, report)


def _class_name(vocabulary: Vocabulary, index: int) -> str:
    return "background" if index == 0 else vocabulary.by_index(index).name


def score(plan: EvalPlan, confusion: ConfusionMatrix) -> dict:
    """Per split: seen, unseen and harmonic mIoU and the per-class IoUs, in percent, under
    plan.background's convention, and under each convention by its BACKGROUND_KEYS key."""
    vocabulary, results = plan.vocabulary, {}
    for k in plan.splits:
        seen = [vocabulary.lookup(name).index for name in vocabulary.seen(k)]
        unseen = [vocabulary.lookup(name).index for name in vocabulary.unseen(k)]
        by_convention = {}
        for mode, key in BACKGROUND_KEYS.items():
            scores = zs3_scores(confusion, seen, unseen, background=mode)
            by_convention[key] = {"seen": scores["seen"], "unseen": scores["unseen"], "harmonic": scores["harmonic"],
                                  "per_class": {_class_name(vocabulary, i): v for i, v in scores["per_class"].items()}}
        results[str(k)] = {**by_convention[BACKGROUND_KEYS[plan.background]],
                           "unseen_classes": list(vocabulary.unseen(k)), **by_convention}
    return results


def run_evaluation(plan: EvalPlan) -> dict:
    """The report: plan.report plus "results" per split, the summed "confusion" and "run" (timings)."""
    panel_folder = split_file_uri(plan.out)[0] if plan.panels else None
    start = time.perf_counter()
    pool = map_positions(ZS3Stage, {"checkpoint": plan.checkpoint, "format": plan.format, "root": plan.root,
                                    "split": plan.split_set, "vocabulary": plan.vocabulary.spec(), "size": plan.size,
                                    "panels": plan.panels, "panel_folder": panel_folder, "added": plan.added}, plan.batches,
                         plan.num_workers)
    confusion, images, busy = ConfusionMatrix(plan.num_labels), 0, 0.0
    for row in pool.rows:  # integer counts: the merge order does not matter
        confusion.merge(ConfusionMatrix.from_dict(json.loads(row["confusion"])))
        images += int(row["images"])
        busy += float(row["seconds"])
    seconds = time.perf_counter() - start
    run = {"workers": pool.workers, "gpus": pool.gpus, "seconds": seconds, "images_per_second": images / seconds,
           # Without actor start-up (model and dataset loading): what one actor sustains.
           "images_per_second_per_worker": images / busy}
    return {**plan.report, "results": score(plan, confusion), "confusion": confusion.counts.tolist(), "run": run}


def format_table(results: dict, setting: str) -> str:
    """The setting's label, then Split | Background | Seen | Unseen | Harmonic, a row per split
    and background convention, numbers right-aligned; "-" where no class was present."""
    rows = [[k, BACKGROUND_LABELS[mode], *(cell(r[key][m]) for m in ("seen", "unseen", "harmonic"))]
            for k, r in results.items() for mode, key in BACKGROUND_KEYS.items()]
    table = text_table(["Split", "Background", "Seen", "Unseen", "Harmonic"], rows)
    return f"mIoU, {SETTING_LABELS[setting]}\n{table}"
