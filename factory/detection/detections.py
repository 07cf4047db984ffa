"""What a detector gives: instances labelled by the vocabulary's class indices.

Any detector fits the factory if it turns a batch of uint8 images, and the classes each image
is asked for, into ``Detections``; it translates its own label space (COCO category ids, say)
at this boundary, so the labelling rules never see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from factory.core.vocab import ClassInfo


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
