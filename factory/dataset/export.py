"""Exports: a finished dataset as the layouts other tools read, each format a module of its own:
``mmseg`` (export_mmseg.py: mmsegmentation's layout and a MaskFormer config), ``coco``
(export_coco.py: instances JSON with RLE masks) and ``folders`` (export_folders.py: images, index
maps, classes.txt), written through export_target.py's ``Target`` (whole or not at all).

The dataset has no split of its own: a sample is in ``val`` when the hash of its id falls below
``val_fraction``, so every export of the same dataset agrees. Label maps keep the dataset's
indices (0 background, class index = vocabulary index, 255 ignore) and its bytes: the PNGs are
copied, not re-encoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from factory.core.conventions import is_held_out
from factory.core.options import positional
from factory.dataset.export_coco import CocoExport
from factory.dataset.export_folders import FoldersExport
from factory.dataset.export_mmseg import MmsegExport
from factory.dataset.export_target import SPLITS, Target
from factory.dataset.source import DatasetSource

EXPORT_COLUMNS = ["sample_id", "index", "classes", "image", "label", "masks", "width", "height"]


class ExportOptions(BaseModel):
    """The options of an export (``jobs/export_dataset.py``)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = positional(description="the dataset: a local folder or s3://bucket/prefix")
    format: Literal["mmseg", "coco", "folders"] = Field(description="the layout to write")
    out: str = Field(description="local folder or s3://bucket/prefix to write")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of samples in the val split, "
                                "by sample-id hash")
    coco_masks: Literal["instance", "class"] = Field("instance", description="coco: one annotation per "
                                                     "8-connected region of a class mask, or per class")
    overwrite: bool = Field(False, description="replace a non-empty target")


def split_of(sample_id: str, val_fraction: float) -> str:
    """``val`` for a fixed ``val_fraction`` share of ids, by hash: re-exports agree."""
    return "val" if is_held_out(sample_id, val_fraction) else "train"


@dataclass
class ExportSummary:
    format: str
    out: str
    samples: dict[str, int] = field(default_factory=lambda: {split: 0 for split in SPLITS})
    annotations: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"export {self.format}: {self.out}",
                 f"  samples      {sum(self.samples.values())} "
                 f"({', '.join(f'{n} {split}' for split, n in self.samples.items())})"]
        if self.format == "coco":
            lines.append(f"  annotations  {self.annotations}")
        lines.append(f"  files        {self.files} ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s")
        return "\n".join(lines)


def export_dataset(source: DatasetSource, options: ExportOptions, progress: bool = True) -> ExportSummary:
    """Every row into the chosen layout; the target is checked before anything is written."""
    start = time.perf_counter()
    target = Target(options.out, overwrite=options.overwrite, source=source.location)
    if options.format == "coco":
        exporter = CocoExport(source, target, options.coco_masks)
    elif options.format == "mmseg":
        exporter = MmsegExport(source, target)
    else:
        exporter = FoldersExport(source, target)
    summary = ExportSummary(options.format, options.out)
    try:
        for row in tqdm(source.iter_rows(EXPORT_COLUMNS), total=source.rows, desc=f"export {options.format}",
                        unit="sample", disable=not progress):
            split = split_of(row["sample_id"], options.val_fraction)
            exporter.add(row, split)
            summary.samples[split] += 1
        summary.annotations = exporter.finish(options.val_fraction)
        target.commit()
    except BaseException:
        target.abort()
        raise
    summary.files, summary.bytes = target.files, target.bytes
    summary.seconds = time.perf_counter() - start
    return summary
