"""Mask R-CNN's masks pasted at their boxes' exact positions, not torchvision's whole pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes


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
