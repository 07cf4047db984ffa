"""Protocol-II inference on real images (spec section 9), for jobs/eval_zs3.py.

Inference is single-scale resize inference, MaskFormer's standard test-time setting
(detectron2's ResizeShortestEdge): each image is resized (bilinear) so that its short
side is ``size`` pixels, keeping its aspect ratio, and run whole, one image per forward
pass, so no padding and no batch composition touch its scores. The argmax label map is
resized back to the label's size by nearest neighbour and scored there: the metric sees
every ground-truth pixel at its original resolution.

``ZS3Stage`` is the Ray Data actor: it loads the segmenter and the dataset reader once
and turns each batch of sample positions into one integer confusion matrix.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from PIL import Image

from factory.devices import pick_device
from factory.storage import open_location
from factory.write import PALETTE
from segmenter.data import normalize
from segmenter.datasets import real_dataset
from segmenter.metrics import ConfusionMatrix
from segmenter.model import Segmenter, load_segmenter_checkpoint

_COLORS = np.array(PALETTE, np.uint8).reshape(256, 3)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) scaled so that the short side is `size`."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.inference_mode()
def predict(model: Segmenter, image: np.ndarray, size: int, device: torch.device) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 label map (H, W), labels 0..K (see the module docstring)."""
    height, width = image.shape[:2]
    new_height, new_width = short_side_size(height, width, size)
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR))
    pixels = normalize(torch.from_numpy(resized.copy())[None].to(device))
    labels = model.semantic_logits(pixels)[0].argmax(0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))


def render_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> bytes:
    """PNG of image | ground truth | prediction, label maps in VOC colours (255 cream)."""
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([image, gap, _COLORS[label], gap, _COLORS[prediction]], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG")
    return buffer.getvalue()


class ZS3Stage:
    """Ray Data actor: batches of {"positions": sample positions} -> per batch, the JSON of its
    confusion matrix, its image count and the seconds spent on it.

    `panels` maps sample positions to file names in `panel_folder` (local or s3://): those
    samples' panels are written there as they are predicted.
    """

    def __init__(self, checkpoint: str, format: str, root: str, split: str, size: int,
                 panels: dict[int, str], panel_folder: str | None):
        self.device = pick_device()
        model, _ = load_segmenter_checkpoint(checkpoint)
        self.model = model.to(self.device)
        self.num_labels = model.config.num_labels
        self.reader = real_dataset(format, root, split)
        self.size = size
        self.panels = panels
        self.panel_location = open_location(panel_folder) if panel_folder else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        matrices, images, seconds = [], [], []
        for positions in batch["positions"]:
            start = time.perf_counter()
            matrix = ConfusionMatrix(self.num_labels)
            for position in map(int, positions):
                sample = self.reader[position]
                prediction = predict(self.model, sample.image, self.size, self.device)
                matrix.update(prediction, sample.label)
                if position in self.panels:
                    self.panel_location.write_bytes(self.panels[position],
                                                    render_panel(sample.image, sample.label, prediction))
            matrices.append(json.dumps(matrix.to_dict()))
            images.append(len(positions))
            seconds.append(time.perf_counter() - start)
        return {"confusion": np.array(matrices), "images": np.array(images), "seconds": np.array(seconds)}
