"""Losses of the grounding module, on raw mask logits.

Every loss averages over the (sample, class) slots marked valid. The caller marks
padded slots and classes whose oracle mask is empty or missing as invalid ("training
without zero masks", Li et al. 2023, Table 3). Invalid slots are dropped before any arithmetic,
so whatever they hold (even NaN) reaches neither the loss nor the gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid_slots(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(B, O, H, W) logits and targets -> (N, H*W) for the N valid slots."""
    if targets.shape != logits.shape or valid.shape != logits.shape[:2]:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"valid {tuple(valid.shape)}")
    return logits[valid].flatten(1), targets[valid].flatten(1).to(logits.dtype)


def _mean(per_slot: Tensor) -> Tensor:
    # An empty selection sums to a zero that keeps its grad path, so an all-invalid batch trains on.
    return per_slot.sum() / max(per_slot.numel(), 1)


def bce_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy on raw logits (the sigmoid is applied once, inside), averaged
    over the pixels of valid slots."""
    logits, targets = _valid_slots(logits, targets, valid)
    per_slot = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    return _mean(per_slot)


def _dice_per_slot(logits: Tensor, targets: Tensor, valid: Tensor, smooth: float) -> Tensor:
    logits, targets = _valid_slots(logits, targets, valid)
    probs = torch.sigmoid(logits)
    overlap = (probs * targets).sum(dim=1)
    return 1 - (2 * overlap + smooth) / (probs.sum(dim=1) + targets.sum(dim=1) + smooth)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice on sigmoid(logits) per slot, averaged over valid slots; smooth=1 as in Simoncini and Ankit."""
    return _mean(_dice_per_slot(logits, targets, valid, smooth))


def log_cosh_dice_loss(logits: Tensor, targets: Tensor, valid: Tensor, smooth: float = 1.0) -> Tensor:
    """log(cosh(Dice loss)) per slot, averaged over valid slots (Simoncini and Ankit)."""
    return _mean(torch.log(torch.cosh(_dice_per_slot(logits, targets, valid, smooth))))


def grounding_loss(logits: Tensor, targets: Tensor, valid: Tensor,
                   kind: Literal["bce", "bce+logcosh_dice"]) -> Tensor:
    """BCE (Li et al. 2023) or BCE + log-cosh Dice (Simoncini and Ankit, their best in Table 4)."""
    if kind == "bce":
        return bce_loss(logits, targets, valid)
    if kind == "bce+logcosh_dice":
        return bce_loss(logits, targets, valid) + log_cosh_dice_loss(logits, targets, valid)
    raise ValueError(f"unknown loss kind {kind!r}")
