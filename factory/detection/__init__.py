"""Detectors built in code: the ``Detections`` every detector gives, and Mask R-CNN (torchvision's
COCO architectures, the tiny random one, the mini world's slim one), its weights and its masks
pasted at their boxes' exact positions. The build's labelers and the mini world both use them."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "detections": ("Detections", "Detector"),
    "maskrcnn": ("COCO_LABELS", "MaskRCNNDetector", "build_maskrcnn", "label_count", "small_maskrcnn"),
    "paste": ("ExactPasteTransform", "paste_masks"),
})
