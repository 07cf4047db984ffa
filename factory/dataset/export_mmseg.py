"""The mmsegmentation export: its layout (``img_dir/{train,val}``, ``ann_dir/{train,val}`` index
PNGs, ``splits/{train,val}.txt``), its ``classes``/``palette`` metadata and a ready MaskFormer
config (``dataset_config.py`` + ``maskformer_config.py``, mmseg 1.x)."""

from __future__ import annotations

import json
import pprint

from factory.dataset.codec import PALETTE
from factory.dataset.export_target import SPLITS, Target, class_names, image_suffix
from factory.dataset.source import DatasetSource


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

    def finish(self, val_fraction: float) -> int:
        for split in SPLITS:
            self.target.put(f"splits/{split}.txt", "".join(f"{i}\n" for i in sorted(self.ids[split])).encode())
        names = class_names(self.source)
        metainfo = {"classes": names, "palette": [PALETTE[3 * i:3 * i + 3] for i in range(len(names))]}
        self.target.put("metainfo.json", json.dumps(metainfo).encode())
        self.target.put("dataset_config.py", mmseg_dataset_config(
            self.source, data_root=self.target.final.uri if not self.target.local else self.target.final.root,
            metainfo=metainfo, size=self.size, val_fraction=val_fraction).encode())
        self.target.put("maskformer_config.py", maskformer_config(len(names)).encode())
        return 0


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
