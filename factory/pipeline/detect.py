"""The oracle detector: a COCO-pretrained Mask R-CNN behind a small interface.

Any detector fits the factory if it turns a batch of uint8 images, and the classes each image
is asked for, into ``Detections`` labelled by the vocabulary's class indices; it translates its
own label space (COCO category ids here) at this boundary, so the labelling rules never see
it. Adding one (a detector of another world) means one module like this and a branch in
``load_detector``; the open-vocabulary one (SAM 3, or a text-prompted detector and SAM) is
factory/pipeline/openvocab.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from factory.pipeline.recipe import SMALL, TORCHVISION_WEIGHTS, LabelerConfig
from factory.core.conventions import TINY
from factory.core.storage import local_copy
from factory.core.vocab import ClassInfo, Vocabulary, get_vocabulary

COCO_LABELS = 91  # torchvision's COCO heads: background + category ids 1..90 (with gaps)


@dataclass
class Detections:
    """Instances found in one image."""
    classes: np.ndarray  # (K,) int64 vocabulary class index; 0 for a class outside the vocabulary
    scores: np.ndarray  # (K,) float32
    masks: np.ndarray  # (K, H, W) float32 soft masks in [0, 1]


class Detector(Protocol):
    def __call__(self, images: np.ndarray, classes: list[list[ClassInfo]]) -> list[Detections]:
        """``images`` (N, H, W, 3) uint8; ``classes[i]``: what image i is asked for (its prompt's
        classes). A closed-set detector may ignore them and report every class it knows."""


def tiny_maskrcnn(image_size: int = 64) -> MaskRCNN:
    """A random Mask R-CNN: torchvision's detector on a two-layer backbone, slim heads."""
    width = 32
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, width, 3, 2, 1), nn.ReLU())
    backbone.out_channels = width
    return MaskRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=20,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
        box_head=TwoMLPHead(width * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, COCO_LABELS),
        mask_head=MaskRCNNHeads(width, (width, width), 1), mask_predictor=MaskRCNNPredictor(width, width, COCO_LABELS))


def small_maskrcnn(num_labels: int, image_size: int = 64) -> MaskRCNN:
    """A slim Mask R-CNN for small images: a five-conv batch-norm backbone at stride 4, one
    feature level, anchors of 12-48 px. The mini world's oracle (trained by world/oracle.py)."""
    width = 64

    def conv(n_in: int, n_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(n_in, n_out, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(n_out), nn.ReLU()]

    backbone = nn.Sequential(*conv(3, 32, 2), *conv(32, 32), *conv(32, width, 2), *conv(width, width),
                             *conv(width, width, dilation=2), *conv(width, width, dilation=4))
    backbone.out_channels = width
    return MaskRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size,
        rpn_anchor_generator=AnchorGenerator(((12, 24, 36, 48),), ((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50, box_detections_per_img=10,
        box_batch_size_per_image=64,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
        box_head=TwoMLPHead(width * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_labels),
        mask_head=MaskRCNNHeads(width, (width,) * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, num_labels))


_TORCHVISION_COCO = {"maskrcnn_resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
                     "maskrcnn_resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights.COCO_V1}


def load_weights(model: nn.Module, weights: str, architecture: str) -> None:
    """Safetensors, or a torch checkpoint read with weights_only=True (never pickle).

    ``weights: torchvision`` downloads torchvision's own COCO checkpoint for the
    architecture into the torch hub cache (needs the internet on the node).
    """
    if weights == TORCHVISION_WEIGHTS:
        state = _TORCHVISION_COCO[architecture].get_state_dict(progress=False, check_hash=True, weights_only=True)
        model.load_state_dict(state)
        return
    path = local_copy(weights)
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # torchvision reference scripts nest it
    own = model.state_dict()
    differ = [k for k in own if k in state and own[k].shape != state[k].shape] + sorted(set(own) ^ set(state))
    if differ:  # torch's message is a line per tensor; this one says what to change
        first = differ[0]
        shapes = f": {list(state[first].shape)} in the file, {list(own[first].shape)} in the model" \
            if first in own and first in state else (" is missing from the file" if first in own else " is extra")
        raise ValueError(f"the weights do not fit {architecture}: {len(differ)} tensors differ ({first}{shapes}); "
                         f"give weights trained as {architecture} on this vocabulary's detector classes, or the "
                         f"model they were trained as")
    model.load_state_dict(state)


def coco_to_vocabulary(vocabulary: Vocabulary) -> np.ndarray:
    """Lookup table from a COCO category id (0..90) to the vocabulary's class index (0: none)."""
    table = np.zeros(COCO_LABELS, np.int64)
    for info in vocabulary.classes:
        table[info.coco_id] = info.index
    return table


def label_count(vocabulary: Vocabulary) -> int:
    """Outputs of a detector trained on the label space the vocabulary's classes name (``small``: the
    mini world's shapes): background and every label of that space, however few of them a user's
    vocabulary maps onto; the checkpoint's head is that size."""
    space = get_vocabulary(vocabulary.detector_space)
    return 1 + max(info.coco_id for info in space.classes)


def candidate_threshold(config: LabelerConfig) -> float:
    """The lowest score any labelling rule looks at: a detector keeps candidates down to it; label.py decides."""
    if config.ignore_threshold is None:  # 0.0 is a threshold, not 'unset'
        return config.score_threshold
    return min(config.score_threshold, config.ignore_threshold)


def build_maskrcnn(config: LabelerConfig, image_size: int, num_labels: int = COCO_LABELS) -> MaskRCNN:
    if config.model == TINY:
        with torch.random.fork_rng(devices=[]):  # the same random weights on every actor
            torch.manual_seed(0)
            model = tiny_maskrcnn(image_size)
    elif config.model == SMALL:
        model = small_maskrcnn(num_labels, image_size)
    else:
        factory = {"maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
                   "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn}[config.model]
        model = factory(weights=None, weights_backbone=None, num_classes=COCO_LABELS)
    if config.weights:
        load_weights(model, config.weights, config.model)
    model.roi_heads.score_thresh = candidate_threshold(config)
    model.roi_heads.nms_thresh = config.nms_threshold
    t = model.transform
    model.transform = ExactPasteTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                          t.fixed_size)
    return model.eval()


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, M, M) mask probabilities into (N, 1, H, W) images, each over its box: torchvision's
    ``paste_masks_in_image`` (the padded mask's cells over the box's pixels x0 .. x1), at the box's
    exact position. torchvision truncates the padded box to whole pixels, which moves every mask
    up and left by half a pixel on average and shrinks it by up to one."""
    masks, scale = expand_masks(masks, padding=1)
    boxes = expand_boxes(boxes, scale)
    ys, xs = (torch.arange(n, dtype=masks.dtype, device=masks.device) for n in size)
    out = [masks.new_zeros((0, 1, *size))]
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        # grid_sample's -1 and 1 are the mask's outer edges: those of pixels x0 and x1 (y0 and y1)
        gx = (xs - x0 + 0.5) / (x1 - x0 + 1) * 2 - 1
        gy = (ys - y0 + 0.5) / (y1 - y0 + 1) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
        out.append(F.grid_sample(mask[None], grid[None], align_corners=False))
    return torch.cat(out)


class ExactPasteTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, its masks pasted at their boxes' exact positions (``paste_masks``)."""

    def postprocess(self, result: list[dict], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict]:
        if self.training:
            return result
        for pred, shape, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], shape, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original)
        return result


class MaskRCNNDetector:
    """A COCO Mask R-CNN whose detections are relabelled by the vocabulary's class indices."""

    def __init__(self, config: LabelerConfig, vocabulary: Vocabulary, image_size: int, device: torch.device):
        self.device = device
        self.model = build_maskrcnn(config, image_size, label_count(vocabulary)).to(device)
        self.classes = coco_to_vocabulary(vocabulary)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, classes: list[list[ClassInfo]] | None = None) -> list[Detections]:
        """Every class it knows in every image (``classes`` is not needed: a closed set)."""
        tensors = [torch.from_numpy(image).to(self.device).permute(2, 0, 1).float() / 255.0 for image in images]
        outputs = self.model(tensors)
        return [Detections(classes=self.classes[out["labels"].cpu().numpy()],
                           scores=out["scores"].float().cpu().numpy(),
                           masks=out["masks"][:, 0].float().cpu().numpy())
                for out in outputs]


def load_detector(config: LabelerConfig, vocabulary: Vocabulary, image_size: int, device: torch.device) -> Detector:
    if config.model == "open_vocabulary":
        from factory.pipeline.openvocab import load_open_vocabulary  # transformers' models load only here

        return load_open_vocabulary(config, device)
    return MaskRCNNDetector(config, vocabulary, image_size, device)
