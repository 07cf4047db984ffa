"""Every option of the segmenter: its sizes (MaskFormer, Cheng et al. 2021), its training on
synthetic and real images, and its zero-shot evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.dataset.real import DEFAULT_SPLITS


class SegmenterModelConfig(BaseModel):
    """Sizes of the segmenter; stored in every checkpoint."""
    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "world", "real"]
    num_labels: int = Field(ge=2, description="background + the vocabulary's classes")
    backbone_layer_type: Literal["basic", "bottleneck"]
    backbone_depths: list[int]
    backbone_widths: list[int] = Field(description="output channels of the four ResNet stages")
    stem_width: int
    stem_pool: bool = Field(True, description="the stem's max-pool; without it every stride halves, so the "
                            "decoder's input, the last stage, is 4x4 rather than 2x2 at 64 px")
    fpn_size: int = Field(description="pixel decoder width; a multiple of 32 (GroupNorm groups)")
    mask_size: int = Field(description="width of the per-pixel and mask embeddings")
    queries: int
    decoder_layers: int
    decoder_width: int
    decoder_heads: int
    decoder_ffn: int
    dropout: float
    deep_supervision: bool = Field(description="the loss on every decoder layer's predictions")
    frozen_backbone_norm: bool = Field(
        False, description="keep the backbone's batch-norm statistics and affine weights fixed "
        "(detectron2's FrozenBN, as MaskFormer's ResNet configs do with a pretrained backbone)")
    head: Literal["closed", "text"] = Field(
        "closed", description="'closed': a learned output per label (the paper's MaskFormer); 'text': logits "
        "against frozen CLIP text embeddings of the class names (ZegFormer), names addable at test time")
    text_encoder: str | None = Field(
        None, description="text head: the CLIP that embedded the class names ('tiny' or a saved CLIPModel, "
        "local or s3://); evaluation embeds names added at test time with it")
    text_template: str | None = Field(None, description="text head: the prompt each class name is embedded in")
    text_dim: int | None = Field(None, ge=1, description="text head: width of the text embeddings")

    @model_validator(mode="after")
    def _text_fields(self) -> SegmenterModelConfig:
        text = (self.text_encoder, self.text_template, self.text_dim)
        if self.head == "text" and None in text:
            raise ValueError("head 'text' needs text_encoder, text_template and text_dim")
        if self.head == "closed" and text != (None, None, None):
            raise ValueError("text_encoder, text_template and text_dim belong to head 'text'")
        return self

    @classmethod
    def real(cls, num_labels: int, frozen_backbone_norm: bool = False, **head) -> SegmenterModelConfig:
        """MaskFormer R101 as in its paper: ResNet-101, FPN pixel decoder of 256, 100 queries,
        6 decoder layers of width 256, deep supervision. `head`: the head fields (default closed)."""
        return cls(preset="real", num_labels=num_labels, backbone_layer_type="bottleneck",
                   backbone_depths=[3, 4, 23, 3], backbone_widths=[256, 512, 1024, 2048], stem_width=64,
                   fpn_size=256, mask_size=256, queries=100, decoder_layers=6, decoder_width=256,
                   decoder_heads=8, decoder_ffn=2048, dropout=0.1, deep_supervision=True,
                   frozen_backbone_norm=frozen_backbone_norm, **head)

    @classmethod
    def tiny(cls, num_labels: int, **head) -> SegmenterModelConfig:
        """About 170k weights: tests and CPU runs. `head`: the head fields (default closed)."""
        return cls(preset="tiny", num_labels=num_labels, backbone_layer_type="basic",
                   backbone_depths=[1, 1, 1, 1], backbone_widths=[8, 16, 32, 64], stem_width=8,
                   fpn_size=32, mask_size=32, queries=8, decoder_layers=2, decoder_width=32,
                   decoder_heads=4, decoder_ffn=64, dropout=0.0, deep_supervision=True, **head)

    @classmethod
    def world(cls, num_labels: int, **head) -> SegmenterModelConfig:
        """The tiny backbone, sized for the mini world's 64 px images: no stem max-pool (see
        stem_pool), 24 queries (more than the world's 21 labels: one can take each) and a decoder
        of width 64: each of these made it learn faster from scratch (README, the mission in
        miniature). `head`: the head fields (default closed)."""
        tiny = cls.tiny(num_labels, **head).model_dump()
        return cls(**{**tiny, "preset": "world", "stem_pool": False, "queries": 24, "decoder_width": 64,
                      "decoder_ffn": 128})


class RealSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["voc", "voc_aug", "coco"] = Field(
        description="voc: SegmentationClass (1,464 train images); voc_aug: SBD's SegmentationClassAug "
        "(10,582 train_aug images); coco: instances JSON")
    root: str = Field(description="VOC: VOCdevkit/VOC2012; COCO: the folder holding <split>/ and annotations/; "
                      "readable on every node")
    split: str = Field(description="voc: train (ImageSets/Segmentation/train.txt); voc_aug: train_aug; "
                       "coco: train2017")
    vocabulary: str | None = Field(
        None, description="the classes of the label indices: voc, coco, shapes (the mini world's drawn benchmark in "
        "VOC's layout) or a vocabulary file (.yaml/.tsv) for your own classes in VOC's layout (null: the format's own)")


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "world", "real"] = Field(
        "tiny", description="'tiny' (tests, CPU), 'world' (the mini world's 64 px images, CPU) or 'real' "
        "(MaskFormer R101)")
    backbone_weights: str | None = Field(
        None, description="ImageNet ResNet weights for a fresh start (.safetensors file or folder with "
        "model.safetensors, local or s3://; torchvision or transformers layout); null: random")
    head: Literal["closed", "text"] = Field(
        "closed", description="'closed': a learned output per class (the paper's MaskFormer; transductive, "
        "supervised); 'text': logits against frozen CLIP embeddings of the class names (ZegFormer), so names "
        "can be added at test time (needed by inductive)")
    text_encoder: str | None = Field(
        None, description="text head: the CLIP embedding the class names: 'tiny' (random, offline: tests) or a "
        "saved CLIPModel folder, local or s3:// (e.g. openai/clip-vit-base-patch32 saved with save_pretrained)")

    @model_validator(mode="after")
    def _text_encoder(self) -> ModelSection:
        if self.head == "text" and self.text_encoder is None:
            raise ValueError("model.head text needs model.text_encoder (a saved CLIPModel, or tiny)")
        if self.head == "closed" and self.text_encoder is not None:
            raise ValueError("model.text_encoder is for model.head text")
        return self


class SegmenterTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="synthetic factory dataset: local folder or s3:// prefix")
    real: RealSection | None = Field(None, description="real training images, e.g. {format: voc_aug, root: "
                                     "VOCdevkit/VOC2012, split: train_aug} (Model-D); unseen-class pixels ignored, "
                                     "except in the supervised setting (a real-data reference: every class)")
    real_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="with both data and real: the share of every batch that is real images "
        "(the rest synthetic); a whole number of each worker's batch_size / num_workers samples")
    readers: int = Field(2, ge=1, description="actors reading the real images")
    init: str | None = Field(None, description="checkpoint folder to start from (its architecture and weights), "
                             "e.g. Model-C's last/ for Model-D")
    out: str = Field(description="checkpoint folder: local or s3://; a rerun resumes from its last/")
    model: ModelSection = ModelSection()
    setting: Literal["transductive", "inductive", "supervised"] = Field(
        "transductive", description="zero-shot 'transductive' (every synthetic label as made) or 'inductive' "
        "(unseen classes' synthetic pixels ignored, their names never embedded; text head), or 'supervised': "
        "labels of unseen classes from a labeler trained on them (an oracle upper bound, not zero-shot)")
    split: int | None = Field(None, description="seen/unseen split; null: the dataset recipe's (or init's)")
    crop_size: int = Field(224, ge=16, description="side of the square training crops")
    crop_scale: tuple[float, float] = Field((0.25, 1.0), description="area fraction range of the random resized crop")
    iterations: int = Field(40000, ge=1, description="optimizer steps in all (a resumed run continues up to this)")
    batch_size: int = Field(8, ge=1, description="samples per step over all workers")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    poly_power: float = Field(0.9, ge=0.0, description="lr x (1 - iteration/iterations)^power; 0: constant")
    backbone_lr_factor: float = Field(0.1, gt=0.0, description="the backbone's lr relative to lr")
    clip_grad_norm: float | None = Field(0.01, gt=0.0, description="max gradient norm of the whole model; null: none")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs each worker holds; the rest read and crop data")
    use_gpu: Literal["auto"] | bool = Field("auto", description="'auto': a GPU per worker if the cluster has GPUs")
    mixed_precision: bool = Field(True, description="autocast on CUDA: bf16 where supported, else fp16")
    checkpoint_every: int = Field(1000, ge=1, description="iterations between checkpoints to <out>/last")
    snapshot_every: int | None = Field(None, ge=1, description="iterations between snapshots kept as "
                                       "<out>/iteration-<n>/ (weights only): the points of a training curve")
    log_every: int = Field(50, ge=1, description="iterations between log lines (loss, it/s)")
    seed: int = Field(0, ge=0, description="initial weights, data order and every crop (docs/protocol-ii.md, Seeds)")

    @model_validator(mode="after")
    def _consistent(self) -> SegmenterTrainConfig:
        if self.data is None and self.real is None:
            raise ValueError("nothing to train on: set data (a synthetic dataset) and/or real")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        if self.setting == "inductive" and self.model.head != "text":
            raise ValueError("setting inductive needs model.head text: a closed-set head trains no output for "
                             "the unseen classes it ignores, so it could never predict them")
        both = self.data is not None and self.real is not None
        if both and self.real_fraction is None:
            raise ValueError("data and real are both set: set real_fraction, the share of every batch that is "
                             "real images (e.g. 0.5)")
        if not both and self.real_fraction is not None:
            raise ValueError("real_fraction mixes data and real: set both, or leave real_fraction null")
        if both:
            per_worker = self.batch_size // self.num_workers
            real = self.real_fraction * per_worker
            if abs(real - round(real)) > 1e-6 or not 0 < round(real) < per_worker:
                raise ValueError(f"real_fraction {self.real_fraction:g} of the {per_worker} samples each worker "
                                 f"takes per step is not a whole number from 1 to {per_worker - 1}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        if self.init and self.model.backbone_weights:
            raise ValueError("model.backbone_weights is for a fresh start; init brings its own weights")
        return self


# Changing these makes a different experiment: such an output is not resumed.
RUN_IDENTITY = ("data", "real", "real_fraction", "init", "model", "setting", "split")


class ZS3EvalOptions(BaseModel):
    """The options of a Protocol-II evaluation (``jobs/eval_zs3.py``)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    checkpoint: str = Field(description="segmenter checkpoint folder (local or s3://)")
    format: Literal["voc", "coco"] = Field(description="real dataset format")
    root: str = Field(description="real dataset folder (local, readable on every node)")
    vocabulary: str | None = Field(
        None, description="the classes of the label indices: voc, coco, shapes (the mini world's drawn benchmark) "
        "or a vocabulary file (.yaml/.tsv); null: coco for coco, the checkpoint's for VOC's layout")
    split_set: str | None = Field(None, description="image list: VOC ImageSets/Segmentation name or COCO image "
                                  f"folder (null: voc {DEFAULT_SPLITS['voc']}, coco {DEFAULT_SPLITS['coco']})")
    splits: list[int] | None = Field(None, min_length=1, description="seen/unseen splits to score (null: the "
                                     "checkpoint's split, else 1 2 3)")
    background: Literal["ignore", "seen"] = Field(
        "ignore", description="the convention of each split's seen/unseen/harmonic keys: background pixels ignored "
        "(ZegFormer) or a seen class (ZS3Net); both are reported, under background_ignored and background_counted")
    out: str | None = Field(None, description="results JSON file, local or s3:// (null: print only)")
    num_workers: int | None = Field(None, ge=1, description="actors (null: one per GPU in the cluster, else 1)")
    qualitative: int = Field(8, ge=0, description="panels written next to out, of images spread over the dataset")
    size: int = Field(512, ge=32, description="short side of the inference input (at least the backbone's "
                      "stride, 32)")
    batch_size: int = Field(8, ge=1, description="images per confusion matrix")
