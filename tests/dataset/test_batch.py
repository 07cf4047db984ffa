"""The stage batch contract (factory/dataset/batch.py): required columns, labels attached in one way."""

from __future__ import annotations

import time

import numpy as np
import pytest

from factory.dataset.batch import (
    MAX_CLASSES,
    REQUIRED_COLUMNS,
    BatchError,
    SampleLabels,
    attach_labels,
    check_batch,
    optional_columns,
    pack_masks,
)
from factory.dataset.codec import objects
from factory.dataset.write import encode_batch


def plan_batch(classes: list[list[str]], size: int = 8) -> dict:
    n = len(classes)
    return {"sample_id": objects([f"{i:07d}-0000000{i}" for i in range(n)]), "index": np.arange(n),
            "prompt": objects([" and ".join(c) for c in classes]), "classes": objects(classes),
            "class_words": objects(classes), "seed": np.arange(n),
            "image": np.zeros((n, size, size, 3), np.uint8), "generate_seconds": np.zeros(n)}


def labels_of(classes: list[str], size: int = 8, found: bool = True) -> SampleLabels:
    masks = np.zeros((len(classes), size, size), bool)
    for k in range(len(classes)):
        masks[k, k] = found
    return SampleLabels(label=np.zeros((size, size), np.uint8), masks=masks,
                        scores=np.full(len(classes), 0.9 if found else 0.0),
                        instances=np.full(len(classes), int(found)), drop_reason="" if found else "class_not_found")


def test_attach_labels_fills_every_label_column():
    batch = attach_labels(plan_batch([["dog"], ["cat", "sofa"]]), [labels_of(["dog"]), labels_of(["cat", "sofa"])],
                          time.perf_counter())
    check_batch(batch)
    assert set(REQUIRED_COLUMNS) <= set(batch)
    assert batch["label"].shape == (2, 8, 8) and batch["class_bits"].dtype == np.uint8
    assert batch["class_bits"][1][1, 1] == 2 and batch["class_bits"][1][0, 0] == 1  # bit k: class k's mask
    assert [s.dtype for s in batch["scores"]] == [np.float32] * 2
    assert [i.dtype for i in batch["instances"]] == [np.int16] * 2
    assert [f.tolist() for f in batch["found"]] == [[True], [True, True]]
    assert list(batch["drop_reason"]) == ["", ""] and batch["label_seconds"].shape == (2,)
    table = encode_batch(batch, image_format="png", jpeg_quality=95, class_indices={"dog": 12, "cat": 8, "sofa": 18},
                         generator="g", labeler="l")
    assert table.column("class_indices").to_pylist() == [[12], [8, 18]]


def test_found_follows_the_instances():
    missing = labels_of(["dog"], found=False)
    assert missing.found.tolist() == [False]
    batch = attach_labels(plan_batch([["dog"]]), [missing], time.perf_counter())
    assert batch["found"][0].tolist() == [False] and batch["drop_reason"][0] == "class_not_found"


def test_encoding_a_batch_without_a_column_names_it_in_one_line():
    batch = attach_labels(plan_batch([["dog"]]), [labels_of(["dog"])], time.perf_counter())
    del batch["class_bits"], batch["label_seconds"]
    with pytest.raises(BatchError) as error:
        encode_batch(batch, image_format="png", jpeg_quality=95, class_indices={"dog": 12}, generator="g", labeler="l")
    message = str(error.value)
    assert message.startswith("stage batch lacks class_bits, label_seconds (has ") and "\n" not in message


def test_labels_must_match_the_batch():
    with pytest.raises(BatchError, match="1 labels for a batch of 2"):
        attach_labels(plan_batch([["dog"], ["cat"]]), [labels_of(["dog"])], time.perf_counter())
    with pytest.raises(BatchError, match="2 masks for the 1 classes"):
        attach_labels(plan_batch([["dog"]]), [labels_of(["dog", "cat"])], time.perf_counter())
    with pytest.raises(BatchError, match=f"at most {MAX_CLASSES}"):
        pack_masks(np.zeros((MAX_CLASSES + 1, 4, 4), bool))


def test_optional_columns_are_the_capture_and_quality_ones():
    names = ["image", "latent", "timestep", "features_16", "ufeatures_32", "daam", "quality", "label"]
    assert optional_columns(names) == ["latent", "timestep", "features_16", "ufeatures_32", "daam", "quality"]
