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
"""

from __future__ import annotations

import os
import re

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig
from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig
from transformers.models.maskformer.modeling_maskformer import MaskFormerLoss, dice_loss, sigmoid_focal_loss

from factory.core.checkpoints import CheckpointError
from factory.core.conventions import IGNORE
from factory.core.storage import first_line, local_copy
from segmenter.config import SegmenterModelConfig

# sigmoid(-1e4) is exactly 0 in float32: such a pixel adds nothing to focal or Dice terms.
IGNORED_LOGIT = -1e4
# ZegFormer's temperature: cosine similarities in [-1, 1] scaled to [-100, 100] before the softmax.
TEXT_TEMPERATURE = 0.01


def maskformer_config(config: SegmenterModelConfig) -> MaskFormerConfig:
    backbone = ResNetConfig(layer_type=config.backbone_layer_type, depths=config.backbone_depths,
                            hidden_sizes=config.backbone_widths, embedding_size=config.stem_width,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    decoder = MaskFormerDetrConfig(num_queries=config.queries, decoder_layers=config.decoder_layers,
                                   d_model=config.decoder_width, decoder_attention_heads=config.decoder_heads,
                                   decoder_ffn_dim=config.decoder_ffn, dropout=config.dropout)
    return MaskFormerConfig(backbone_config=backbone, decoder_config=decoder, num_labels=config.num_labels,
                            fpn_feature_size=config.fpn_size, mask_feature_size=config.mask_size,
                            use_auxiliary_loss=config.deep_supervision)


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
        self.maskformer = MaskFormerForInstanceSegmentation(maskformer_config(config))
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
