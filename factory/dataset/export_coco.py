"""The COCO export: ``{train,val}/`` images and ``annotations/instances_{train,val}.json`` with RLE
masks, one annotation per instance (8-connected region of a class mask) or per class; detectron2's
and mmdetection's COCO readers take it as it is."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from factory.dataset.codec import decode_png
from factory.dataset.export_target import SPLITS, Target, image_suffix
from factory.dataset.source import DatasetSource


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a bool mask: (int32 label map, 1..n; 0 outside, n).

    Works on horizontal runs with a union-find, so the Python loop is over runs, not pixels.
    """
    height = mask.shape[0]
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; same row-major order as the starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(height + 1))
    for row in range(1, height):
        i, j = first[row - 1], first[row]
        while i < first[row] and j < first[row + 1]:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:  # touching, diagonals included
                parent[find(i)] = find(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros(mask.shape, np.int32)
    numbers: dict[int, int] = {}
    for k in range(len(rows)):
        number = numbers.setdefault(find(k), len(numbers) + 1)
        labels[rows[k], starts[k]:ends[k]] = number
    return labels, len(numbers)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


class CocoExport:
    """COCO instances JSON per split: RLE masks from the per-class masks (before overlaps)."""

    def __init__(self, source: DatasetSource, target: Target, per: str):
        self.source, self.target, self.per = source, target, per
        coco_ids = source.vocabulary.name == "coco"  # COCO's own category ids; VOC keeps 1..20
        self.category = {c.name: c.coco_id if coco_ids else c.index for c in source.vocabulary.classes}
        self.images: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.annotations: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.next_id = 1

    def add(self, row: dict, split: str) -> None:
        file_name = row["sample_id"] + image_suffix(self.source)
        self.target.put(f"{split}/{file_name}", row["image"]["bytes"])
        self.images[split].append({"id": row["index"], "file_name": file_name,
                                   "width": row["width"], "height": row["height"]})
        for name, struct in zip(row["classes"], row["masks"]):
            mask = decode_png(struct["bytes"]).astype(bool)
            if self.per == "instance":
                labels, count = connected_components(mask)
                regions = [labels == n for n in range(1, count + 1)]
            else:
                regions = [mask] if mask.any() else []
            for region in regions:
                rle = _rle(region)
                encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
                self.annotations[split].append({
                    "id": self.next_id, "image_id": row["index"], "category_id": self.category[name],
                    "segmentation": rle, "area": float(mask_utils.area(encoded)),
                    "bbox": [float(v) for v in mask_utils.toBbox(encoded)], "iscrowd": 0})
                self.next_id += 1

    def finish(self, val_fraction: float) -> int:
        categories = [{"id": self.category[c.name], "name": c.name, "supercategory": ""}
                      for c in self.source.vocabulary.classes]
        info = {"description": f"dataset-factory export of {self.source.manifest['name']}",
                "masks": f"one annotation per {self.per}", "val_fraction": val_fraction}
        for split in SPLITS:
            document = {"info": info, "licenses": [], "images": self.images[split],
                        "annotations": self.annotations[split], "categories": categories}
            self.target.put(f"annotations/instances_{split}.json", json.dumps(document).encode())
        return self.next_id - 1
