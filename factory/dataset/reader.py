"""Read a finished dataset (local folder or s3://) as PyTorch datasets or a Ray Data dataset.

    from factory.dataset.reader import SegmentationDataset, IterableSegmentationDataset, read_dataset

    ds = SegmentationDataset("outputs/tiny")             # map-style: len(ds), ds[i]
    ds[0]["image"], ds[0]["label"]                       # uint8 (H, W, 3), int64 (H, W) tensors
    stream = IterableSegmentationDataset("s3://b/ds")    # sharded over DataLoader workers and ranks
    rows = read_dataset("s3://b/ds")                     # ray.data.Dataset, decoded columns

All three read the Parquet files the manifest lists (so a dataset counts only once its
build has finished, and never a leftover of a killed run) through `factory.core.storage`: the
standard AWS configuration, ``AWS_ENDPOINT_URL`` for S3-compatible endpoints. Decoding
is by column name, so datasets written before the Parquet files carried Hugging Face
feature metadata read the same way: `image` -> uint8 RGB (H, W, 3), `label` -> its palette
indices (H, W) (0 background, class index, 255 ignore), `masks` -> bool (K, H, W), one
per class. Other columns come as stored (capture tensors as raw fp16 bytes: see the
manifest's `capture.shapes`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from factory.dataset.codec import decode_batch, decode_row
from factory.dataset.schema import huggingface_metadata
from factory.dataset.source import DatasetSource, open_dataset

if TYPE_CHECKING:  # imported when used: neither is needed by the torch datasets
    import datasets
    import ray.data

# Collatable by torch's default_collate: per-class lists vary in length between samples.
TORCH_COLUMNS = ("sample_id", "index", "image", "label")
ROWS_PER_DECODE = 16


def read_dataset(dataset: str | DatasetSource, *, columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """The dataset as a `ray.data.Dataset`, images decoded; `columns` to read only some (all by default)."""
    import ray.data

    source = open_dataset(dataset)
    paths = [source.location.path(path) for path in source.files]
    ds = ray.data.read_parquet(paths, filesystem=source.location.fs, columns=list(columns) if columns else None)
    return ds.map_batches(decode_batch, batch_size=ROWS_PER_DECODE, batch_format="numpy")


def _to_torch(row: dict[str, Any]) -> dict[str, Any]:
    """Decoded row -> tensors: image uint8 (H, W, 3), label int64 (H, W), masks bool (K, H, W)."""
    row = decode_row(row)
    if "image" in row:
        row["image"] = torch.from_numpy(row["image"].copy())
    if "label" in row:
        row["label"] = torch.from_numpy(row["label"].astype(np.int64))
    if "masks" in row:
        row["masks"] = torch.from_numpy(row["masks"])
    return row


class SegmentationDataset(torch.utils.data.Dataset):
    """Map-style PyTorch dataset over a finished dataset (local or s3://).

    `ds[i]` is a dict of `columns` (default: sample_id, index, image, label, which torch's
    default collate batches): image uint8 (H, W, 3), label int64 (H, W), masks bool (K, H, W);
    `transform(sample)` is applied last. Files are read whole, one at a time, and the last
    one is kept: sequential or file-grouped access reads each file once."""

    def __init__(self, dataset: str | DatasetSource, *, columns: Sequence[str] = TORCH_COLUMNS,
                 transform: Callable[[dict], Any] | None = None):
        self.source = open_dataset(dataset)
        self.columns, self.transform = list(columns), transform
        self.starts = np.cumsum([0, *self.source.file_rows])
        self._cached: tuple[int, list[dict]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i %= len(self)
        position = int(np.searchsorted(self.starts, i, side="right")) - 1
        if self._cached is None or self._cached[0] != position:
            self._cached = (position, self.source.read_file(position, self.columns).to_pylist())
        sample = _to_torch(self._cached[1][i - self.starts[position]])
        return self.transform(sample) if self.transform else sample


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class IterableSegmentationDataset(torch.utils.data.IterableDataset):
    """Streams a finished dataset file by file, each sample once per pass over all readers.

    Readers are the DataLoader workers of every torch.distributed rank (or `rank` and
    `world_size` given here, e.g. by Ray Train). The rows, in file order (shuffled per
    epoch when `shuffle`, the same order on every reader: seed + epoch), are cut into one
    contiguous range per reader: sizes differ by at most one row, and a reader opens only
    the files its range touches. `shuffle` also shuffles the rows read from each file.
    Call `set_epoch(n)` before each pass, as with DistributedSampler."""

    def __init__(self, dataset: str | DatasetSource, *, columns: Sequence[str] = TORCH_COLUMNS,
                 transform: Callable[[dict], Any] | None = None, shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.source = open_dataset(dataset)
        self.columns, self.transform = list(columns), transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank(self) -> tuple[int, int]:
        return _distributed() if self.rank is None else (self.rank, self.world_size or 1)

    def __len__(self) -> int:
        """Samples of this rank per pass (all its DataLoader workers together)."""
        rank, world = self._rank()
        return self.source.rows * (rank + 1) // world - self.source.rows * rank // world

    def reader_range(self) -> tuple[int, int, list[int]]:
        """(this reader's index, number of readers, file positions in this pass's order)."""
        rank, world = self._rank()
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        order = list(range(len(self.source.files)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return rank * workers + worker_id, world * workers, order

    def __iter__(self) -> Iterator[Any]:
        reader, readers, order = self.reader_range()
        rows = self.source.file_rows
        total = sum(rows)
        first, last = total * reader // readers, total * (reader + 1) // readers  # this reader's [first, last)
        start = 0
        for position in order:
            end = start + rows[position]
            if start < last and end > first:
                table = self.source.read_file(position, self.columns)
                samples = table.slice(max(first - start, 0), min(last, end) - max(first, start)).to_pylist()
                if self.shuffle:
                    random.Random(hash((self.seed, self.epoch, position))).shuffle(samples)
                for row in samples:
                    sample = _to_torch(row)
                    yield self.transform(sample) if self.transform else sample
            start = end


def huggingface_features(dataset: str | DatasetSource) -> datasets.Features:
    """`datasets.Features` of a dataset's files, for datasets written before the Parquet files
    carried them: `load_dataset("parquet", data_files=..., features=huggingface_features(uri))`."""
    import datasets

    source = open_dataset(dataset)
    with source.location.fs.open_input_file(source.location.path(source.files[0])) as handle:
        schema = pq.read_schema(handle)
    return datasets.Features.from_arrow_schema(schema.with_metadata(huggingface_metadata(schema)))
