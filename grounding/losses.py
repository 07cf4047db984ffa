"""Losses of the grounding module, on raw mask logits.

Every loss averages over the (sample, class) slots marked valid. The caller marks
padded slots and classes whose oracle mask is empty or missing as invalid ("training
without zero masks", Li et al. 2023, Table 3), and may mark pixels to ignore: those that
are 255 in the label map, where the labeler was unsure, are neither positive nor negative
for any class. Invalid slots and ignored pixels are dropped before any arithmetic, so
whatever they hold (even NaN) reaches neither the loss nor the gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid_slots(logits: Tensor, targets: Tensor, valid: Tensor,
                 ignore: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(B, O, H, W) logits and targets, (B, O) valid and (B, H, W) ignore -> (N, H*W) logits,
    targets and counted pixels of the N valid slots."""
    if targets.shape != logits.shape or valid.shape != logits.shape[:2] or (
            ignore is not None and ignore.shape != logits.shape[:1] + logits.shape[2:]):
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"valid {tuple(valid.shape)}, ignore {None if ignore is None else tuple(ignore.shape)}")
    counted = torch.ones_like(targets, dtype=torch.bool) if ignore is None else ~ignore[:, None].expand_as(targets)
    counted = counted[valid].flatten(1)
    # Ignored pixels are zeroed before any arithmetic (a NaN there would otherwise reach the
    # gradients through the masking below); the losses then leave them out.
    logits = torch.where(counted, logits[valid].flatten(1), 0)
    return logits, torch.where(counted, targets[valid].flatten(1).to(logits.dtype), 0), counted


def _mean(per_slot: Tensor) -> Tensor:
    # An empty selection sums to a zero that keeps its grad path, so an all-invalid batch trains on.
    return per_slot.sum() / max(per_slot.numel(), 1)


def bce_loss(logits: Tensor, targets: Tensor, valid: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Binary cross-entropy on raw logits (the sigmoid is applied once, inside), averaged
    over the counted pixels of each valid slot, then over the slots."""
    logits, targets, counted = _valid_slots(logits, targets, valid, ignore)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    per_slot = torch.where(counted, per_pixel, 0).sum(dim=1) / counted.sum(dim=1).clamp(min=1)
    return _mean(per_slot)


def _dice_per_slot(logits: Tensor, targets: Tensor, valid: Tensor, ignore: Tensor | None, smooth: float) -> Tensor:
    logits, targets, counted = _valid_slots(logits, targets, valid, ignore)
    probs = torch.where(counted, torch.sigmoid(logits), 0)
    overlap = (probs * targets).sum(dim=1)
    return 1 - (2 * overlap + smooth) / (probs.sum(dim=1) + targets.sum(dim=1) + smooth)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor, ignore: Tensor | None = None,
              smooth: float = 1.0) -> Tensor:
    """Soft Dice on sigmoid(logits) per slot, averaged over valid slots; smooth=1 as in Simoncini and Ankit."""
    return _mean(_dice_per_slot(logits, targets, valid, ignore, smooth))


def log_cosh_dice_loss(logits: Tensor, targets: Tensor, valid: Tensor, ignore: Tensor | None = None,
                       smooth: float = 1.0) -> Tensor:
    """log(cosh(Dice loss)) per slot, averaged over valid slots (Simoncini and Ankit)."""
    return _mean(torch.log(torch.cosh(_dice_per_slot(logits, targets, valid, ignore, smooth))))


def grounding_loss(logits: Tensor, targets: Tensor, valid: Tensor, kind: Literal["bce", "bce+logcosh_dice"],
                   ignore: Tensor | None = None) -> Tensor:
    """BCE (Li et al. 2023) or BCE + log-cosh Dice (Simoncini and Ankit, their best in Table 4);
    `ignore` (B, H, W): pixels no slot counts (None: none)."""
    if kind == "bce":
        return bce_loss(logits, targets, valid, ignore)
    if kind == "bce+logcosh_dice":
        return bce_loss(logits, targets, valid, ignore) + log_cosh_dice_loss(logits, targets, valid, ignore)
    raise ValueError(f"unknown loss kind {kind!r}")


def presence_loss(logits: Tensor, present: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy of (B, O) presence logits against (B, O) bool `present`, averaged over
    the `valid` slots: every named class, found or not, since a class the prompt named but the
    image lacks is the negative the head learns from."""
    if not (logits.shape == present.shape == valid.shape):
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, present {tuple(present.shape)}, "
                         f"valid {tuple(valid.shape)}")
    per_slot = F.binary_cross_entropy_with_logits(logits[valid], present[valid].to(logits.dtype), reduction="none")
    return _mean(per_slot)
