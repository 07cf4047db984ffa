"""The Protocol-II segmenter: MaskFormer (Cheng et al., 2021) on a ResNet backbone (Li et al., ICCV 2023, section 5).

Built on transformers' ``MaskFormerForInstanceSegmentation``. Label space: index 0 is
background, 1..K the vocabulary's classes (the same indices as the label PNGs), 255 is
ignored; MaskFormer's "no object" class is its own extra logit, K+1.

Ignored pixels belong to no target mask, and they count for no loss. Since background is
a class with its own mask, every other pixel lies in exactly one target mask: the ignored
pixels are those in none, so the targets alone say which they are. The model's own loss
(Hungarian matching, then cross-entropy + 20 x focal + Dice, on every decoder layer) gets a
criterion that sets the mask logits of ignored pixels to a very negative value where it
compares masks: in the matcher (at the predicted masks' resolution, where it also
downsamples the targets) and in the mask terms (matched masks upsampled to the label
size, as the original). Those pixels then add exactly zero to the focal and Dice terms
and to their gradients.

Two classification heads (``SegmenterModelConfig.head``):

- ``closed``: MaskFormer's own, one learned output per label. The paper's; it can only
  predict classes it was trained on, so it serves the transductive and supervised settings.
- ``text`` (as ZegFormer, Ding et al. 2022): a query's class logits are the cosine
  similarities, over a temperature, of its segment embedding (its decoder output, linearly
  projected) with the frozen CLIP text embeddings of the class names (``segmenter.text``),
  plus learned embeddings for background and "no object". The embeddings are buffers saved
  with the weights; a class whose name was never encoded (``known`` False) scores
  ``IGNORED_LOGIT``, outside the prediction space, until ``add_class_embeddings`` encodes it
  at test time: that is what makes the inductive setting (no unseen name or pixel in
  training) able to predict unseen classes.

Checkpoints are in the project's one format (``factory.core.checkpoints``); checkpoint.json
holds the model config and the caller's metadata (iteration, vocabulary, setting, split, ...).
"""

from __future__ import annotations

import os
import re
from typing import Literal

import safetensors.torch
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig
from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig
from transformers.models.maskformer.modeling_maskformer import MaskFormerLoss, dice_loss, sigmoid_focal_loss

from factory.core.checkpoints import CheckpointError, read_checkpoint_metadata, read_tensors, save_checkpoint
from factory.core.conventions import IGNORE
from factory.core.storage import first_line, local_copy

FORMAT = "segmenter-checkpoint/1"

# sigmoid(-1e4) is exactly 0 in float32: such a pixel adds nothing to focal or Dice terms.
IGNORED_LOGIT = -1e4
# ZegFormer's temperature: cosine similarities in [-1, 1] scaled to [-100, 100] before the softmax.
TEXT_TEMPERATURE = 0.01


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

    def maskformer_config(self) -> MaskFormerConfig:
        backbone = ResNetConfig(layer_type=self.backbone_layer_type, depths=self.backbone_depths,
                                hidden_sizes=self.backbone_widths, embedding_size=self.stem_width,
                                out_features=["stage1", "stage2", "stage3", "stage4"])
        decoder = MaskFormerDetrConfig(num_queries=self.queries, decoder_layers=self.decoder_layers,
                                       d_model=self.decoder_width, decoder_attention_heads=self.decoder_heads,
                                       decoder_ffn_dim=self.decoder_ffn, dropout=self.dropout)
        return MaskFormerConfig(backbone_config=backbone, decoder_config=decoder, num_labels=self.num_labels,
                                fpn_feature_size=self.fpn_size, mask_feature_size=self.mask_size,
                                use_auxiliary_loss=self.deep_supervision)


def _valid_pixels(mask_labels: list[Tensor], size: torch.Size) -> Tensor:
    """(B, 1, *size) bool: pixels in some target mask, by nearest neighbour as the matcher
    resamples targets (all label maps of a batch share one size)."""
    valid = torch.stack([masks.sum(0) > 0 for masks in mask_labels])[:, None].float()
    return F.interpolate(valid, size=size, mode="nearest").bool()


class _IgnoringMatcher(nn.Module):
    """transformers' Hungarian matcher, blind to ignored pixels."""

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        valid = _valid_pixels(mask_labels, masks_queries_logits.shape[-2:])
        return self.matcher(masks_queries_logits.masked_fill(~valid, IGNORED_LOGIT), class_queries_logits,
                            mask_labels, class_labels)


class _IgnoringLoss(MaskFormerLoss):
    """transformers' MaskFormer loss whose mask terms leave ignored pixels out."""

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        predictions = self._get_predictions_permutation_indices(indices)
        targets, _ = self._pad_images_to_max_in_batch(mask_labels)
        valid = targets.sum(1) > 0
        masks = F.interpolate(masks_queries_logits[predictions][:, None], size=targets.shape[-2:], mode="bilinear",
                              align_corners=False)[:, 0]
        masks = masks.masked_fill(~valid[predictions[0]], IGNORED_LOGIT).flatten(1)
        targets = targets[self._get_targets_permutation_indices(indices)].flatten(1)
        return {"loss_mask": sigmoid_focal_loss(masks, targets, num_masks),
                "loss_dice": dice_loss(masks, targets, num_masks)}


class TextClassifier(nn.Module):
    """The text head (see the module docstring): decoder outputs (..., hidden) -> class logits
    (..., num_labels + 1) in the closed head's order: background, classes 1..K, "no object"."""

    def __init__(self, hidden_size: int, num_classes: int, text_dim: int):
        super().__init__()
        self.projection = nn.Linear(hidden_size, text_dim)
        self.background = nn.Parameter(torch.randn(text_dim))
        self.no_object = nn.Parameter(torch.randn(text_dim))
        # Row i is class i + 1's text embedding; frozen, but saved with the weights.
        self.register_buffer("class_embeddings", torch.zeros(num_classes, text_dim))
        self.register_buffer("known", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, hidden: Tensor) -> Tensor:
        segments = F.normalize(self.projection(hidden), dim=-1)
        table = F.normalize(torch.cat([self.background[None], self.class_embeddings, self.no_object[None]]), dim=-1)
        logits = segments @ table.to(segments.dtype).T / TEXT_TEMPERATURE
        unknown = F.pad(~self.known, (1, 1), value=False)
        return logits.masked_fill(unknown, IGNORED_LOGIT)


class Segmenter(nn.Module):
    def __init__(self, config: SegmenterModelConfig):
        super().__init__()
        self.config = config
        self.maskformer = MaskFormerForInstanceSegmentation(config.maskformer_config())
        own = self.maskformer
        # The query embeddings as MaskFormer's reference draws them (nn.Embedding's N(0, 1)).
        # transformers draws them with std 0.02: a decoder trained from scratch then starts with
        # every query alike and stays so (the tiny preset's 8 queries gave identical outputs after
        # 500 steps, and no class was ever predicted).
        nn.init.normal_(own.model.transformer_module.queries_embedder.weight)
        if not config.stem_pool:
            own.model.pixel_level_module.encoder.embedder.pooler = nn.Identity()
        if config.head == "text":
            own.class_predictor = TextClassifier(config.decoder_width, config.num_labels - 1, config.text_dim)
        own.criterion = _IgnoringLoss(own.config.num_labels, matcher=_IgnoringMatcher(own.matcher),
                                      weight_dict=own.weight_dict, eos_coef=own.config.no_object_weight)
        if config.frozen_backbone_norm:
            for norm in self._backbone_norms():
                norm.requires_grad_(False)

    @property
    def known_classes(self) -> list[int]:
        """Labels 1..K the model can predict: all for the closed head, those whose names the
        text head has embedded."""
        if self.config.head == "closed":
            return list(range(1, self.config.num_labels))
        return [int(i) + 1 for i in self.maskformer.class_predictor.known.nonzero()[:, 0]]

    @torch.no_grad()
    def add_class_embeddings(self, labels: list[int], embeddings: Tensor) -> None:
        """Put the text embeddings (len(labels), text_dim) of classes `labels` (1..K) in the
        text head's prediction space."""
        if self.config.head != "text":
            raise ValueError("only the text head takes class embeddings; the closed head has an output per class")
        head = self.maskformer.class_predictor
        rows = torch.as_tensor(labels, device=head.known.device) - 1
        head.class_embeddings[rows] = embeddings.to(head.class_embeddings)
        head.known[rows] = True

    @property
    def backbone(self) -> nn.Module:
        return self.maskformer.model.pixel_level_module.encoder

    def _backbone_norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.config.frozen_backbone_norm:
            for norm in self._backbone_norms():
                norm.eval()
        return self

    def _predict(self, pixel_values: Tensor, auxiliary: bool):
        # transformers fills the decoder's per-layer states, which deep supervision reads
        # even at inference, only when hidden states are asked for.
        return self.maskformer(pixel_values=pixel_values, output_hidden_states=self.config.deep_supervision,
                               output_auxiliary_logits=auxiliary)

    def forward(self, pixel_values: Tensor, mask_labels: list[Tensor] | None = None,
                class_labels: list[Tensor] | None = None):
        """MaskFormer's outputs; with targets (see `batch_targets`) also `.loss`, the model's own
        over the pixels that are not ignored (see the module docstring)."""
        outputs = self._predict(pixel_values, auxiliary=mask_labels is not None)
        if mask_labels is not None and class_labels is not None:
            with torch.autocast(pixel_values.device.type, enabled=False):  # matching and loss in float32
                auxiliary = [{name: logits.float() for name, logits in layer.items()}
                             for layer in outputs.auxiliary_logits or []]
                losses = self.maskformer.get_loss_dict(
                    outputs.masks_queries_logits.float(), outputs.class_queries_logits.float(),
                    [masks.float() for masks in mask_labels], class_labels, auxiliary)
                outputs["loss"] = self.maskformer.get_loss(losses)
        return outputs

    def semantic_logits(self, pixel_values: Tensor) -> Tensor:
        """(B, num_labels, H, W) class scores at the input size, MaskFormer's semantic inference:
        per query, class probabilities without "no object" times its sigmoid mask, summed over
        queries. Argmax gives labels 0..K. Call under torch.no_grad() for inference."""
        outputs = self._predict(pixel_values, auxiliary=False)
        masks = F.interpolate(outputs.masks_queries_logits, size=pixel_values.shape[-2:], mode="bilinear",
                              align_corners=False).sigmoid()
        classes = outputs.class_queries_logits.softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", classes, masks)


def semantic_targets(label: Tensor, num_labels: int) -> tuple[Tensor, Tensor]:
    """A label map (H, W) -> MaskFormer targets: one binary mask per class present (float,
    (n, H, W)) and its class (long, (n,)). 255 is no class: its pixels are in no mask."""
    classes = torch.unique(label)
    classes = classes[classes != IGNORE].long()
    if classes.numel() and int(classes.max()) >= num_labels:
        raise ValueError(f"label value {int(classes.max())} is outside the model's labels 0..{num_labels - 1}")
    return (label[None] == classes[:, None, None]).float(), classes


def batch_targets(labels: Tensor, num_labels: int) -> tuple[list[Tensor], list[Tensor]]:
    """Label maps (B, H, W) -> the `mask_labels`, `class_labels` lists of `Segmenter.forward`."""
    pairs = [semantic_targets(label, num_labels) for label in labels]
    return [masks for masks, _ in pairs], [classes for _, classes in pairs]


# ---------------------------------------------------------------- pretrained backbone

def _torchvision_to_transformers(key: str) -> str | None:
    """torchvision ResNet key -> transformers ResNetBackbone key; None for the classifier (fc)."""
    if key.startswith(("conv1.", "bn1.")):
        part = "convolution" if key.startswith("conv1.") else "normalization"
        return f"embedder.embedder.{part}.{key.split('.', 1)[1]}"
    if match := re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)", key):
        stage, block, kind, index, rest = match.groups()
        part = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(index) - 1}.{part}.{rest}"
    if match := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)", key):
        stage, block, index, rest = match.groups()
        part = "convolution" if index == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{rest}"
    return None


def backbone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageNet weights in transformers' ResNet layout, from either common source:
    torchvision's ResNet (conv1, layer1..4; MaskFormer's own R-101 start), or transformers'
    ResNet (`microsoft/resnet-101`: keys under `resnet.`, classifier dropped)."""
    if "conv1.weight" in state:
        renamed = {_torchvision_to_transformers(k): v for k, v in state.items()}
        return {k: v for k, v in renamed.items() if k is not None}
    return {k.removeprefix("resnet."): v for k, v in state.items() if not k.startswith("classifier.")}


def load_backbone_weights(model: Segmenter, source: str) -> None:
    """Pretrained ResNet weights: a .safetensors file, or a folder holding model.safetensors;
    local or s3://. Every backbone tensor must be there, and nothing else."""
    path = local_copy(source)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    try:
        state = backbone_state(safetensors.torch.load_file(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"cannot read backbone weights {source}: {first_line(exc)}") from None
    expected = model.backbone.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(f"backbone weights {source} do not fit the {model.config.preset} ResNet: "
                              f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of "
                              f"another shape (first: {(missing + unexpected + reshaped)[0]})")
    model.backbone.load_state_dict(state)


# ---------------------------------------------------------------- checkpoints

def save_segmenter_checkpoint(uri: str, model: Segmenter, optimizer: torch.optim.Optimizer | None,
                              metadata: dict) -> None:
    """`metadata` must hold "iteration" (it names the weight files); the rest (vocabulary,
    setting, split, seen, unseen, ...) is stored as given."""
    save_checkpoint(uri, FORMAT, metadata["iteration"], model, optimizer,
                    {**metadata, "model": model.config.model_dump(mode="json")})


def read_segmenter_metadata(uri: str) -> dict:
    return read_checkpoint_metadata(uri, FORMAT)


def load_segmenter_checkpoint(uri: str) -> tuple[Segmenter, dict]:
    """The segmenter (eval mode, CPU) and its checkpoint.json: iteration, model config,
    vocabulary {name, classes: [{index, name, natural}]}, setting, split, seen, unseen, train config."""
    metadata = read_segmenter_metadata(uri)
    model = Segmenter(SegmenterModelConfig.model_validate(metadata["model"]))
    model.load_state_dict(read_tensors(uri, metadata, "model"))
    return model.eval(), metadata
