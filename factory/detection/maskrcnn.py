"""Mask R-CNN behind the detector interface: the architectures, their weights, and detections
relabelled by a vocabulary's class indices.

torchvision's COCO architectures (``maskrcnn_resnet50_fpn[_v2]``), a tiny random one for tests
and CPU runs, and the mini world's slim one (``maskrcnn_small``), whose labels are its
vocabulary's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
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
from torchvision.ops import MultiScaleRoIAlign

from factory.core.conventions import SMALL, TINY, TORCHVISION_WEIGHTS
from factory.core.storage import local_copy
from factory.core.vocab import ClassInfo, Vocabulary, get_vocabulary
from factory.detection.detections import Detections
from factory.detection.paste import ExactPasteTransform

COCO_LABELS = 91  # torchvision's COCO heads: background + category ids 1..90 (with gaps)


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


def build_maskrcnn(architecture: str, image_size: int, *, weights: str | None = None, num_labels: int = COCO_LABELS,
                   score_threshold: float = 0.5, nms_threshold: float = 0.5) -> MaskRCNN:
    """The model in eval mode, keeping candidates down to `score_threshold` (``num_labels``: the
    small architecture's head; the others have COCO's)."""
    if architecture == TINY:
        with torch.random.fork_rng(devices=[]):  # the same random weights on every actor
            torch.manual_seed(0)
            model = tiny_maskrcnn(image_size)
    elif architecture == SMALL:
        model = small_maskrcnn(num_labels, image_size)
    else:
        factory = {"maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
                   "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn}[architecture]
        model = factory(weights=None, weights_backbone=None, num_classes=COCO_LABELS)
    if weights:
        load_weights(model, weights, architecture)
    model.roi_heads.score_thresh = score_threshold
    model.roi_heads.nms_thresh = nms_threshold
    t = model.transform
    model.transform = ExactPasteTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                          t.fixed_size)
    return model.eval()


class MaskRCNNDetector:
    """A Mask R-CNN whose detections are relabelled by the vocabulary's class indices."""

    def __init__(self, architecture: str, vocabulary: Vocabulary, image_size: int, device: torch.device, *,
                 weights: str | None = None, score_threshold: float = 0.5, nms_threshold: float = 0.5):
        self.device = device
        self.model = build_maskrcnn(architecture, image_size, weights=weights, num_labels=label_count(vocabulary),
                                    score_threshold=score_threshold, nms_threshold=nms_threshold).to(device)
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
