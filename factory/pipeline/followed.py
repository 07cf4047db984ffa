"""A follower's images, read from the dataset it follows instead of generated again.

A recipe that follows a finished dataset (``follow``) plans exactly that set's samples, with
its ids and seeds: the same prompts and seeds give the same images, byte for byte. When it
labels them with a labeler of its own stage (a detector, not the grounding module or DAAM,
which read the generator's insides) and captures nothing, it needs the images alone, and
``FollowedImages`` reads them by sample id: generate once, label as many times as a
comparison needs.
"""

from __future__ import annotations

import time

import numpy as np

from factory.dataset.codec import decode_image
from factory.dataset.source import DatasetSource


class FollowedImages:
    """Ray Data actor stage: planned samples -> their images, as the followed dataset holds them."""

    def __init__(self, dataset: str):
        self.source = DatasetSource.open(dataset)
        ids = self.source.read(["sample_id"]).column("sample_id").to_pylist()
        self.position = {sample_id: k for k, sample_id in enumerate(ids)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        wanted = [self.position[sample_id] for sample_id in batch["sample_id"]]
        rows = self.source.take(wanted, ["sample_id", "image"]).to_pydict()  # in position order
        images = dict(zip(rows["sample_id"], rows["image"]))
        batch["image"] = np.stack([decode_image(images[sample_id]) for sample_id in batch["sample_id"]])
        batch["generate_seconds"] = np.full(len(wanted), (time.perf_counter() - start) / len(wanted))
        return batch

