"""A finished dataset (local folder or s3://): its manifest, its Parquet files and their rows.

Every consumer (the PyTorch and Ray readers, grounding's triplets, the segmenter, exports,
inspection, verification) opens a dataset here, so a dataset counts only once its build has
finished (``manifest.json`` exists) and only the files its manifest lists are read: never a
leftover of a killed run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.core.errors import FactoryError
from factory.core.storage import Location, StorageError, first_line, open_location
from factory.core.vocab import Vocabulary, get_vocabulary
from factory.dataset.layout import MANIFEST_FILE
from factory.dataset.schema import SCHEMA


class DatasetError(FactoryError, ValueError):
    """A dataset that cannot be read or used as asked; the message is one line."""


# Rebuilds a finished dataset's plan (its samples, each with .sample_id and .classes) from its
# manifest, raising DatasetError when it cannot: ``factory.pipeline.plan.replan``, passed in by the
# jobs, as the plan belongs to the build, a layer above the dataset format.
Replan = Callable[[dict], Sequence]


@dataclass(frozen=True)
class DatasetSource:
    """A finished factory dataset: its manifest, Parquet files and vocabulary."""
    uri: str
    location: Location
    manifest: dict

    @classmethod
    def open(cls, uri: str, *, allow_empty: bool = False) -> DatasetSource:
        """Raises DatasetError when there is no finished dataset at `uri` (or, unless
        `allow_empty`, when every sample of it was dropped)."""
        try:
            location = open_location(uri)
            found = location.exists(MANIFEST_FILE)
            manifest = json.loads(location.read_bytes(MANIFEST_FILE)) if found else None
        except (OSError, StorageError, ValueError) as exc:
            raise DatasetError(f"cannot read dataset {uri}: {first_line(exc)}") from None
        if manifest is None:
            raise DatasetError(f"no dataset at {uri}: {MANIFEST_FILE} not found "
                               f"(missing, or its build has not finished)")
        if not manifest.get("files") and not allow_empty:
            raise DatasetError(f"{uri} holds no samples")
        return cls(location.uri, location, manifest)

    @property
    def recipe(self) -> dict:
        return self.manifest["recipe"]

    @property
    def files(self) -> list[str]:
        """Paths relative to the dataset, in the manifest's order."""
        return [entry["path"] for entry in self.manifest["files"]]

    @property
    def file_rows(self) -> list[int]:
        return [entry["rows"] for entry in self.manifest["files"]]

    @property
    def rows(self) -> int:
        return sum(self.file_rows)

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return get_vocabulary({key: value for key, value in self.manifest["vocabulary"].items()
                               if key not in ("background", "ignore")})

    @property
    def split(self) -> int | None:
        return self.recipe.get("split")

    @property
    def supervised_classes(self) -> frozenset[str]:
        """Classes whose labels came from a labeler trained on them (manifest "labels"): every
        class for an oracle labeler, the checkpoint's trained classes for the grounding annotator."""
        if "labels" not in self.manifest:
            raise DatasetError(f"{self.uri} does not record which labeler was trained on which class "
                               f"(built by an older version): rebuild it")
        return frozenset(name for name, trained in self.manifest["labels"]["trained"].items() if trained)

    @property
    def capture(self) -> dict | None:
        """What the build captured with each image (manifest "capture"), None when nothing."""
        return self.manifest.get("capture")

    def has_column(self, name: str) -> bool:
        """Whether the rows hold an optional column (quality scores, label agreement, presence scores,
        capture columns)."""
        if name == "quality":
            return bool((self.recipe.get("quality") or {}).get("model"))
        if name in ("agreement", "presence"):  # written with their per-class summary in the manifest
            return name in self.manifest
        return name in ((self.capture or {}).get("shapes") or {}) or (name == "timestep" and self.capture is not None)

    def read_file(self, position: int, columns: Sequence[str] | None = None) -> pa.Table:
        with self.location.fs.open_input_file(self.location.path(self.files[position])) as handle:
            return pq.read_table(handle, columns=list(columns) if columns else None)

    def read(self, columns: Sequence[str]) -> pa.Table:
        """Whole columns of the dataset, files in manifest order."""
        return pa.concat_tables([self.read_file(position, columns) for position in range(len(self.files))])

    def take(self, positions: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """Rows by position in `read` order, fetched file by file: only the rows asked for are
        kept in memory, never a whole dataset of feature tensors. Result in position order."""
        wanted = np.unique(np.asarray(positions, dtype=np.int64))
        parts, start = [], 0
        for position, rows in enumerate(self.file_rows):
            local = wanted[(wanted >= start) & (wanted < start + rows)] - start
            if len(local):
                parts.append(self.read_file(position, columns).take(local))
            start += rows
        if not parts:
            return self.read_file(0, columns).slice(0, 0)
        return pa.concat_tables(parts)

    def iter_rows(self, columns: Sequence[str], only: set[str] | None = None) -> Iterator[dict]:
        """Rows as dicts, one Parquet file at a time; `only`: just the rows with these sample
        ids. Optional columns the dataset lacks (``has_column``) are left out."""
        columns = [c for c in columns if c in SCHEMA.names or self.has_column(c)]
        wanted = pa.array(sorted(only), pa.string()) if only is not None else None
        for position in range(len(self.files)):
            table = self.read_file(position, columns)
            if wanted is not None:
                table = table.filter(pc.is_in(table.column("sample_id"), value_set=wanted))
            yield from table.to_pylist()


def open_dataset(dataset: str | DatasetSource) -> DatasetSource:
    """A source from a URI, or the source itself."""
    return dataset if isinstance(dataset, DatasetSource) else DatasetSource.open(str(dataset))
