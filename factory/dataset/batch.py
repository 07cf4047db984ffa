"""The batch that passes between a build's model stages, declared once.

A batch is a dict of numpy columns with one row per sample (Ray Data's numpy format). The
plan gives the first columns, the generator adds the image, a labeler (the oracle, the
grounding annotator, a procedural drawing) attaches the labels with ``attach_labels``,
capture adds the optional columns, and ``factory.dataset.write.encode_batch`` turns the
batch into Parquet rows after ``check_batch``. N is the batch size, O the sample's class
count (1..MAX_CLASSES), H x W the image size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from factory.core.errors import FactoryError
from factory.dataset.codec import objects

MAX_CLASSES = 8  # per-sample class masks travel as the bits of one uint8 plane
CLASS_NOT_FOUND = "class_not_found"  # the drop reason of a sample whose prompt class was not found

PLAN_COLUMNS = {
    "sample_id": "(N,) str: deterministic id, plan index and recipe hash",
    "index": "(N,) int64: position in the plan",
    "prompt": "(N,) str",
    "classes": "(N,) object: list of O canonical class names, in prompt order",
    "class_words": "(N,) object: list of O words naming each class in the prompt",
    "seed": "(N,) int64: the sample's noise seed",
}
IMAGE_COLUMNS = {"image": "(N, H, W, 3) uint8"}
LABEL_COLUMNS = {
    "label": "(N, H, W) uint8: vocabulary index of each pixel's class, 0 background, 255 ignore",
    "class_bits": "(N, H, W) uint8: bit k is the mask of the sample's k-th class",
    "scores": "(N,) object: (O,) float32 confidence per class, 0 when not found",
    "instances": "(N,) object: (O,) int16 instances merged into each class mask",
    "found": "(N,) object: (O,) bool, whether each class was found",
    "drop_reason": "(N,) object: str, empty when the sample is kept",
}
TIMING_COLUMNS = {
    "generate_seconds": "(N,) float64: busy seconds per sample making the image",
    "label_seconds": "(N,) float64: busy seconds per sample labelling it",
}
REQUIRED_COLUMNS = {**PLAN_COLUMNS, **IMAGE_COLUMNS, **LABEL_COLUMNS, **TIMING_COLUMNS}
OPTIONAL_COLUMNS = {
    "source_image": "(N,) str: a real image's ref in the recipe's source (file name, image id, sample id)",
    "psnr": "(N,) float32: inversion route, dB of the image regenerated from its inversion against the image",
    "source_height": "(N,) int64: a real image's height before it was fitted to the generator's size",
    "source_width": "(N,) int64: a real image's width before it was fitted to the generator's size",
    "timestep": "(N,) int64: diffusion timestep of the captured U-Net call",
    "latent": "(N, 4, h, w) float16: the captured call's latent",
    "features_<r>": "(N, C_r, r, r) float16: U-Net features at resolution r, conditional branch",
    "ufeatures_<r>": "(N, C_r, r, r) float16: the same, unconditional branch",
    "daam": "(N,) object: (O, h, w) float16 DAAM heat map per class, latent grid, min-max normalised",
    "quality": "(N,) float32: CLIP image-quality score",
    "agreement": "(N,) object: (O,) float32 IoU of the second labeler's mask with the label's, per class",
    "presence": "(N,) object: (O,) float32 the grounding module's presence score per class (a class below the "
                "annotator's presence_threshold was judged absent and got no pixels)",
}


SCALAR_COLUMNS = ("timestep", "quality", "source_image", "psnr", "source_height", "source_width")  # optional columns of one value per row
LIST_COLUMNS = ("agreement", "presence")  # optional columns of one float per class


class BatchError(FactoryError, ValueError):
    """A stage handed on a batch that breaks the contract; the message is one line."""


def check_batch(batch: dict[str, np.ndarray]) -> None:
    """Every required column is there (one line naming the missing ones)."""
    missing = [name for name in REQUIRED_COLUMNS if name not in batch]
    if missing:
        raise BatchError(f"stage batch lacks {', '.join(missing)} "
                         f"(has {', '.join(sorted(batch)) or 'nothing'}); see factory/dataset/batch.py")


def optional_columns(names) -> list[str]:
    """The optional columns among `names` (a batch's keys or a table's column names)."""
    return [name for name in names
            if name in ("latent", "daam", *SCALAR_COLUMNS, *LIST_COLUMNS)
            or name.startswith(("features_", "ufeatures_"))]


@dataclass
class SampleLabels:
    """What a labeler says about one sample."""
    label: np.ndarray  # (H, W) uint8 label map
    masks: np.ndarray  # (O, H, W) bool, one per prompt class, before overlaps are resolved
    scores: np.ndarray  # (O,) float32
    instances: np.ndarray  # (O,) int16; a class with none is not found
    drop_reason: str = ""
    presence: np.ndarray | None = None  # (O,) float32 presence scores, from a labeler that judges presence

    @property
    def found(self) -> np.ndarray:
        return self.instances > 0


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(O, H, W) bool class masks -> (H, W) uint8 whose bit k is mask k."""
    if len(masks) > MAX_CLASSES:
        raise BatchError(f"{len(masks)} class masks; a sample holds at most {MAX_CLASSES}")
    bits = np.zeros(masks.shape[1:], np.uint8)
    for k, mask in enumerate(masks):
        bits |= mask.astype(np.uint8) << k
    return bits


def attach_labels(batch: dict[str, np.ndarray], labels: Sequence[SampleLabels],
                  started: float) -> dict[str, np.ndarray]:
    """The label columns of every sample, and the labelling time since `started`
    (time.perf_counter()) spread over the batch; returns the batch."""
    n = len(batch["classes"])
    if len(labels) != n:
        raise BatchError(f"{len(labels)} labels for a batch of {n} samples")
    for sample_labels, classes in zip(labels, batch["classes"]):
        if len(sample_labels.masks) != len(classes):
            raise BatchError(f"{len(sample_labels.masks)} masks for the {len(classes)} classes {list(classes)}")
    batch["label"] = np.stack([s.label.astype(np.uint8) for s in labels])
    batch["class_bits"] = np.stack([pack_masks(s.masks) for s in labels])
    batch["scores"] = objects([np.asarray(s.scores, np.float32) for s in labels])
    batch["instances"] = objects([np.asarray(s.instances, np.int16) for s in labels])
    batch["found"] = objects([s.found for s in labels])
    batch["drop_reason"] = objects([s.drop_reason for s in labels])
    if any(s.presence is not None for s in labels):
        if any(s.presence is None for s in labels):
            raise BatchError("presence scores for some samples of a batch but not all")
        batch["presence"] = objects([np.asarray(s.presence, np.float32) for s in labels])
    batch["label_seconds"] = np.full(n, (time.perf_counter() - started) / n)
    return batch
