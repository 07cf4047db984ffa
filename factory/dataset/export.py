"""Exports: a finished dataset as the layouts other tools read.

- ``mmseg``: mmsegmentation's layout (``img_dir/{train,val}``, ``ann_dir/{train,val}`` index
  PNGs, ``splits/{train,val}.txt``), its ``classes``/``palette`` metadata and a ready
  MaskFormer config (``dataset_config.py`` + ``maskformer_config.py``, mmseg 1.x).
- ``coco``: ``{train,val}/`` images and ``annotations/instances_{train,val}.json`` with RLE
  masks, one annotation per instance (8-connected region of a class mask) or per class;
  detectron2's and mmdetection's COCO readers take it as it is.
- ``folders``: ``images/<id>.<ext>``, ``masks/<id>.png`` index maps and ``classes.txt``.

The dataset has no split of its own: a sample is in ``val`` when the hash of its id falls
below ``val_fraction``, so every export of the same dataset agrees. Label maps keep the
dataset's indices (0 background, class index = vocabulary index, 255 ignore) and its
bytes: the PNGs are copied, not re-encoded.

A local export is written into a hidden sibling folder and renamed into place at the end
(a reader sees all of it or none); an S3 export uploads file by file.
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from factory.core.conventions import is_held_out
from factory.core.errors import FactoryError
from factory.core.options import positional
from factory.core.storage import Location, StorageError, check_reachable, first_line
from factory.dataset.codec import PALETTE, decode_png
from factory.dataset.source import DatasetSource

SPLITS = ("train", "val")
EXPORT_COLUMNS = ["sample_id", "index", "classes", "image", "label", "masks", "width", "height"]


class ExportError(FactoryError, RuntimeError):
    """A dataset or target that cannot be used as asked; the message is one line."""


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


# ---- reading the dataset (factory/dataset/source.py opens it and reads its Parquet files) ------


def image_suffix(source: DatasetSource) -> str:
    return ".jpg" if source.manifest["recipe"]["writer"]["image_format"] == "jpeg" else ".png"


def class_names(source: DatasetSource) -> list[str]:
    """Name of each label index from 0 (background) to K."""
    return ["background", *source.vocabulary.names]


def split_of(sample_id: str, val_fraction: float) -> str:
    """``val`` for a fixed ``val_fraction`` share of ids, by hash: re-exports agree."""
    return "val" if is_held_out(sample_id, val_fraction) else "train"


# ---- writing the export --------------------------------------------------------------


def _same_or_nested(a: Location, b: Location) -> bool:
    if type(a.fs) is not type(b.fs):
        return False
    return a.root == b.root or a.root.startswith(b.root + "/") or b.root.startswith(a.root + "/")


class Target:
    """Where an export goes. Local: a hidden sibling folder renamed into place by ``commit``."""

    def __init__(self, uri: str, *, overwrite: bool, source: Location):
        try:
            self.final = check_reachable(uri)  # a writable local parent, or a bucket that answers
            if _same_or_nested(self.final, source):
                raise ExportError(f"the export target {uri} overlaps the dataset {source.uri}")
            existing = self.final.fs.get_file_info(pafs.FileSelector(self.final.root, recursive=True,
                                                                     allow_not_found=True))
            self.replace = any(info.type == pafs.FileType.File for info in existing)
            if self.replace and not overwrite:
                raise ExportError(f"{uri} is not empty: pass --overwrite to replace it")
            self.local = isinstance(self.final.fs, pafs.LocalFileSystem)
            if self.local:
                final = Path(self.final.root)
                final.parent.mkdir(parents=True, exist_ok=True)
                self.staging = final.parent / f".{final.name}.export-{uuid.uuid4().hex[:8]}.tmp"
                self.staging.mkdir()
            elif self.replace:  # S3 has no rename: clear the prefix, then upload file by file
                self.final.fs.delete_dir_contents(self.final.root, missing_dir_ok=True)
        except (StorageError, OSError) as exc:
            raise ExportError(f"cannot use {uri}: {first_line(exc)}") from None
        self.files = 0
        self.bytes = 0

    def put(self, relative: str, data: bytes) -> None:
        if self.local:
            path = self.staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.final.write_bytes(relative, data)
        self.files += 1
        self.bytes += len(data)

    def commit(self) -> None:
        if not self.local:
            return
        final = Path(self.final.root)
        old = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}.tmp"
        if final.exists():
            os.replace(final, old)
        os.replace(self.staging, final)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.local:
            shutil.rmtree(self.staging, ignore_errors=True)


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

    def finish(self, options: ExportOptions) -> int:
        categories = [{"id": self.category[c.name], "name": c.name, "supercategory": ""}
                      for c in self.source.vocabulary.classes]
        info = {"description": f"dataset-factory export of {self.source.manifest['name']}",
                "masks": f"one annotation per {self.per}", "val_fraction": options.val_fraction}
        for split in SPLITS:
            document = {"info": info, "licenses": [], "images": self.images[split],
                        "annotations": self.annotations[split], "categories": categories}
            self.target.put(f"annotations/instances_{split}.json", json.dumps(document).encode())
        return self.next_id - 1


class FoldersExport:
    """images/<id>.<ext>, masks/<id>.png (the label maps) and classes.txt (line i: index i)."""

    def __init__(self, source: DatasetSource, target: Target):
        self.source, self.target = source, target

    def add(self, row: dict, split: str) -> None:
        self.target.put(f"images/{row['sample_id']}{image_suffix(self.source)}", row["image"]["bytes"])
        self.target.put(f"masks/{row['sample_id']}.png", row["label"]["bytes"])

    def finish(self, options: ExportOptions) -> int:
        self.target.put("classes.txt", "".join(f"{name}\n" for name in class_names(self.source)).encode())
        return 0


class MmsegExport:
    """mmsegmentation's BaseSegDataset layout, its metadata and a MaskFormer config."""

    def __init__(self, source: DatasetSource, target: Target):
        self.source, self.target = source, target
        self.ids: dict[str, list[str]] = {split: [] for split in SPLITS}
        self.size = 512

    def add(self, row: dict, split: str) -> None:
        sample_id = row["sample_id"]
        self.target.put(f"img_dir/{split}/{sample_id}{image_suffix(self.source)}", row["image"]["bytes"])
        self.target.put(f"ann_dir/{split}/{sample_id}.png", row["label"]["bytes"])
        self.ids[split].append(sample_id)
        self.size = max(row["width"], row["height"])

    def finish(self, options: ExportOptions) -> int:
        for split in SPLITS:
            self.target.put(f"splits/{split}.txt", "".join(f"{i}\n" for i in sorted(self.ids[split])).encode())
        names = class_names(self.source)
        metainfo = {"classes": names, "palette": [PALETTE[3 * i:3 * i + 3] for i in range(len(names))]}
        self.target.put("metainfo.json", json.dumps(metainfo).encode())
        self.target.put("dataset_config.py", mmseg_dataset_config(
            self.source, data_root=self.target.final.uri if not self.target.local else self.target.final.root,
            metainfo=metainfo, size=self.size, val_fraction=options.val_fraction).encode())
        self.target.put("maskformer_config.py", maskformer_config(len(names)).encode())
        return 0


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
        summary.annotations = exporter.finish(options)
        target.commit()
    except BaseException:
        target.abort()
        raise
    summary.files, summary.bytes = target.files, target.bytes
    summary.seconds = time.perf_counter() - start
    return summary


# ---- mmsegmentation configs ----------------------------------------------------------


def _literal(value, indent: int = 0) -> str:
    return pprint.pformat(value, width=100 - indent, compact=True).replace("\n", "\n" + " " * indent)


def mmseg_dataset_config(source: DatasetSource, *, data_root: str, metainfo: dict, size: int,
                         val_fraction: float) -> str:
    """mmseg 1.x dataset settings for the exported layout (BaseSegDataset, no custom class)."""
    crop = min(size, 512)
    return f'''# mmsegmentation 1.x dataset settings for the dataset-factory export of {source.manifest['name']!r}.
# Splits by sample-id hash (val fraction {val_fraction}); label PNGs hold vocabulary indices:
# 0 background, 1..{len(metainfo["classes"]) - 1} the classes, 255 ignore (reduce_zero_label stays off).
# mmengine reads local paths: for an S3 export, copy it down and point data_root there.
dataset_type = 'BaseSegDataset'
data_root = {data_root!r}
img_suffix = {image_suffix(source)!r}
metainfo = dict(
    classes={_literal(tuple(metainfo["classes"]), 12)},
    palette={_literal(metainfo["palette"], 12)})
num_classes = {len(metainfo["classes"])}
image_scale = ({size}, {size})
crop_size = ({crop}, {crop})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset_common = dict(
    type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix=img_suffix,
    seg_map_suffix='.png', reduce_zero_label=False, ignore_index=255)
train_dataloader = dict(
    batch_size=8,  # per GPU; the paper trains with 8 in all
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **dataset_common,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        ann_file='splits/train.txt',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **dataset_common,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        ann_file='splits/val.txt',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
'''


def maskformer_config(num_classes: int) -> str:
    """mmseg 1.x MaskFormer (ResNet-101) on the exported dataset: upstream's ADE20K config with
    this dataset's classes and the paper's schedule (AdamW 1e-4, weight decay 1e-4, 40k iterations).
    Training it needs mmsegmentation with the full mmcv and mmdetection (MaskFormerHead)."""
    return f'''# MaskFormer for the exported dataset (mmsegmentation 1.x; needs mmcv and mmdet).
#   python tools/train.py maskformer_config.py   (from an mmsegmentation checkout)
_base_ = ['./dataset_config.py']
default_scope = 'mmseg'
num_classes = {num_classes}  # background included
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN on several GPUs
data_preprocessor = dict(
    type='SegDataPreProcessor',
    size={{{{_base_.crop_size}}}},
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ResNet',
        depth=101,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
        norm_cfg=norm_cfg,
        norm_eval=True,
        style='pytorch',
        contract_dilation=True,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')),
    decode_head=dict(
        type='MaskFormerHead',
        in_channels=[256, 512, 1024, 2048],
        feat_channels=256,
        in_index=[0, 1, 2, 3],
        num_classes=num_classes,
        out_channels=256,
        num_queries=100,
        pixel_decoder=dict(
            type='mmdet.PixelDecoder', norm_cfg=dict(type='GN', num_groups=32), act_cfg=dict(type='ReLU')),
        enforce_decoder_input_project=False,
        positional_encoding=dict(num_feats=128, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=256, num_heads=8, attn_drop=0.1, proj_drop=0.1,
                                   dropout_layer=None, batch_first=True),
                cross_attn_cfg=dict(embed_dims=256, num_heads=8, attn_drop=0.1, proj_drop=0.1,
                                    dropout_layer=None, batch_first=True),
                ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, num_fcs=2,
                             act_cfg=dict(type='ReLU', inplace=True), ffn_drop=0.1,
                             dropout_layer=None, add_identity=True)),
            init_cfg=None),
        loss_cls=dict(type='mmdet.CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                      reduction='mean', class_weight=[1.0] * num_classes + [0.1]),
        loss_mask=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                       reduction='mean', loss_weight=20.0),
        loss_dice=dict(type='mmdet.DiceLoss', use_sigmoid=True, activate=True, reduction='mean',
                       naive_dice=True, eps=1.0, loss_weight=1.0),
        train_cfg=dict(
            assigner=dict(
                type='mmdet.HungarianAssigner',
                match_costs=[
                    dict(type='mmdet.ClassificationCost', weight=1.0),
                    dict(type='mmdet.FocalLossCost', weight=20.0, binary_input=True),
                    dict(type='mmdet.DiceCost', weight=1.0, pred_act=True, eps=1.0),
                ]),
            sampler=dict(type='mmdet.MaskPseudoSampler'))),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
iterations = 40000
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.0001),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    paramwise_cfg=dict(custom_keys={{'backbone': dict(lr_mult=0.1)}}))
param_scheduler = [dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=iterations, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=iterations, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
'''

