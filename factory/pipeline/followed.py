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
import pyarrow as pa

from factory.dataset.codec import decode_image
from factory.dataset.source import DatasetSource


class FollowedImages:
    """Ray Data actor stage: planned samples -> their images, as the followed dataset holds them.

    Each file a batch needs is read once for it, and the last one is kept for the next batch:
    batches in plan order mostly ask for the file the previous one read."""

    def __init__(self, dataset: str):
        self.source = DatasetSource.open(dataset)
        self.where: dict[str, tuple[int, int]] = {}  # sample id -> (file position, row)
        for position in range(len(self.source.files)):
            ids = self.source.read_file(position, ["sample_id"]).column("sample_id").to_pylist()
            self.where.update({sample_id: (position, row) for row, sample_id in enumerate(ids)})
        self.kept: tuple[int, pa.ChunkedArray] | None = None  # the last file read: (position, its images)

    def _images(self, position: int) -> pa.ChunkedArray:
        if self.kept is None or self.kept[0] != position:
            self.kept = position, self.source.read_file(position, ["image"]).column("image")
        return self.kept[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        places = [self.where[sample_id] for sample_id in batch["sample_id"]]
        images: list[np.ndarray | None] = [None] * len(places)
        kept = self.kept[0] if self.kept else None
        # the kept file's rows first, then file by file: each file read at most once per batch
        for k in sorted(range(len(places)), key=lambda k: (places[k][0] != kept, places[k][0])):
            position, row = places[k]
            images[k] = decode_image(self._images(position)[row].as_py())
        batch["image"] = np.stack(images)
        batch["generate_seconds"] = np.full(len(places), (time.perf_counter() - start) / len(places))
        return batch
