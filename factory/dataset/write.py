"""Encode and write: a stage batch to Parquet rows, then Parquet parts with commit records.

Layout: ``factory.dataset.layout``. A part counts only once its commit record exists, so a
run killed between the two writes leaves an orphan that the next run deletes; a retried
write task rewrites the same names with the same rows, so nothing is ever counted twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.core.storage import Location, StorageError, first_line, open_location
from factory.dataset.batch import LIST_COLUMNS, SCALAR_COLUMNS, check_batch, optional_columns
from factory.dataset.codec import encode_image, encode_label, encode_mask
from factory.dataset.layout import COMMIT_DIR, DATA_DIR
from factory.dataset.schema import SCHEMA, huggingface_metadata


def _struct(data: bytes) -> dict:
    return {"bytes": data, "path": None}


def encode_batch(batch: dict[str, np.ndarray], *, image_format: str, jpeg_quality: int,
                 class_indices: dict[str, int], generator: str, labeler: str) -> pa.Table:
    """A stage batch (``factory.dataset.batch``) to encoded rows (SCHEMA), its optional
    columns, and the bookkeeping columns ``write_part`` reads."""
    check_batch(batch)
    start = time.perf_counter()
    n = len(batch["sample_id"])
    images, labels, bits = batch["image"], batch["label"], batch["class_bits"]
    height, width = images.shape[1:3]
    columns = {
        "sample_id": list(batch["sample_id"]),
        "index": batch["index"].astype(np.int64),
        "prompt": list(batch["prompt"]),
        "classes": [list(c) for c in batch["classes"]],
        "class_words": [list(w) for w in batch["class_words"]],
        "class_indices": [[class_indices[name] for name in c] for c in batch["classes"]],
        "seed": batch["seed"].astype(np.int64),
        "image": [_struct(encode_image(img, image_format, jpeg_quality)) for img in images],
        "label": [_struct(encode_label(lab)) for lab in labels],
        "masks": [[_struct(encode_mask((b >> k) & 1)) for k in range(len(c))]
                  for b, c in zip(bits, batch["classes"])],
        "scores": [list(s) for s in batch["scores"]],
        "instances": [list(i) for i in batch["instances"]],
        "found": [list(f) for f in batch["found"]],
        "width": np.full(n, width, np.int32),
        "height": np.full(n, height, np.int32),
        "generator": [generator] * n,
        "labeler": [labeler] * n,
    }
    table = pa.table(columns, schema=SCHEMA)
    shapes = {}
    for name in optional_columns(batch):  # grounding triplets: fp16 C x H x W per row
        if name in SCALAR_COLUMNS:
            table = table.append_column(name, pa.array(batch[name]))
            continue
        if name in LIST_COLUMNS:
            table = table.append_column(name, pa.array([list(v) for v in batch[name]], pa.list_(pa.float32())))
            continue
        if name == "daam":  # one (h, w) heat map per class
            shapes[name] = list(batch[name][0].shape[1:])
            table = table.append_column(name, pa.array(
                [[np.ascontiguousarray(m).tobytes() for m in maps] for maps in batch[name]], pa.list_(pa.binary())))
            continue
        shapes[name] = list(batch[name].shape[1:])
        table = table.append_column(name, pa.array([np.ascontiguousarray(a).tobytes() for a in batch[name]],
                                                   pa.binary()))
    encode_seconds = (time.perf_counter() - start) / n
    table = table.append_column("capture_shapes", pa.array([json.dumps(shapes)] * n, pa.string()))
    return (table.append_column("drop_reason", pa.array(list(batch["drop_reason"]), pa.string()))
            .append_column("generate_seconds", pa.array(batch["generate_seconds"], pa.float64()))
            .append_column("label_seconds", pa.array(batch["label_seconds"], pa.float64()))
            .append_column("encode_seconds", pa.array(np.full(n, encode_seconds), pa.float64())))


@dataclass
class Commit:
    """What one part added to the dataset; its JSON is the part's commit record."""
    name: str  # part-<hash>
    file: str | None  # relative path of the Parquet file; None when every sample was dropped
    rows: int
    bytes: int
    sha256: str | None
    written: list[str]
    dropped: dict[str, str]  # sample_id -> reason
    seconds: dict[str, float] = field(default_factory=dict)  # busy time per stage
    capture_shapes: dict[str, list[int]] = field(default_factory=dict)  # per-row array shapes of capture columns
    agreement: dict[str, list[float]] = field(default_factory=dict)  # class -> IoU of each sample, dropped ones too
    presence: dict[str, list[float]] = field(default_factory=dict)  # class -> presence score per sample, dropped too

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Commit":
        return cls(**json.loads(data))


def part_name(sample_ids: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:20]


def write_part(batch: pa.Table, *, out: str, metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """Ray Data stage: one Parquet part and its commit record; returns the commit as a row."""
    start = time.perf_counter()
    location = open_location(out)
    ids = batch.column("sample_id").to_pylist()
    reasons = batch.column("drop_reason").to_pylist()
    name = part_name(ids)
    kept = batch.filter(pc.equal(batch.column("drop_reason"), ""))
    commit = Commit(name=name, file=None, rows=kept.num_rows, bytes=0, sha256=None,
                    written=kept.column("sample_id").to_pylist(),
                    dropped={i: r for i, r in zip(ids, reasons) if r})
    if kept.num_rows:
        table = kept.select(SCHEMA.names + optional_columns(kept.column_names))
        table = table.replace_schema_metadata({**(metadata or {}), **huggingface_metadata(table.schema)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=len(table))
        data = sink.getvalue().to_pybytes()
        commit.file, commit.bytes = f"{DATA_DIR}/{name}.parquet", len(data)
        commit.sha256 = hashlib.sha256(data).hexdigest()
        _write(location, commit.file, data)
    commit.seconds = {stage: float(np.sum(batch.column(f"{stage}_seconds").to_numpy()))
                      for stage in ("generate", "label", "encode")}
    commit.seconds["write"] = time.perf_counter() - start
    commit.capture_shapes = json.loads(batch.column("capture_shapes")[0].as_py())
    for column, per_class in (("agreement", commit.agreement), ("presence", commit.presence)):
        if column in batch.column_names:
            for classes, values in zip(batch.column("classes").to_pylist(), batch.column(column).to_pylist()):
                for class_name, value in zip(classes, values):
                    per_class.setdefault(class_name, []).append(round(value, 4))
    _write(location, f"{COMMIT_DIR}/{commit.name}.json", commit.to_json())
    return pa.table({"commit": [commit.to_json().decode()]})


def _write(location: Location, relative: str, data: bytes) -> None:
    """A failure that outlasted the S3 client's retries ends the build with this one line."""
    try:
        location.write_bytes(relative, data)
    except OSError as exc:
        raise StorageError(f"cannot write {location.url(relative)}: {first_line(exc)}") from None


def read_commits(location: Location) -> list[Commit]:
    return [Commit.from_json(location.read_bytes(path)) for path in location.list(COMMIT_DIR, ".json")]
