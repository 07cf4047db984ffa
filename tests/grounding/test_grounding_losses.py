import math

import pytest
import torch

from grounding.losses import bce_loss, dice_loss, grounding_loss, log_cosh_dice_loss

LOSSES = [bce_loss, dice_loss, log_cosh_dice_loss,
          lambda *a: grounding_loss(*a, kind="bce"), lambda *a: grounding_loss(*a, kind="bce+logcosh_dice")]


def _slots(*rows: list[float]) -> torch.Tensor:
    """Slots of a single sample, each a 1 x len(row) image: (1, O, 1, W)."""
    return torch.tensor(rows)[None, :, None, :]


def test_bce_by_hand():
    # Pixel 1: logit 0, target 1 -> -log(sigmoid(0)) = log(2).
    # Pixel 2: logit 2, target 0 -> -log(1 - sigmoid(2)) = log(1 + e^2).
    loss = bce_loss(_slots([0.0, 2.0]), _slots([1.0, 0.0]), torch.tensor([[True]]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.e**2)) / 2, rel=1e-6)


def test_bce_is_not_a_double_sigmoid():
    # Logit 10 on a background pixel costs log(1 + e^10) ~ 10.00005. Feeding sigmoid(10) ~ 1
    # to BCE-with-logits again (the follow-up code's bug) would give log(1 + e^0.99995) ~ 1.31.
    loss = bce_loss(_slots([10.0]), _slots([0.0]), torch.tensor([[True]]))
    assert loss.item() == pytest.approx(math.log(1 + math.e**10), rel=1e-6)


def test_bce_averages_valid_slots_only():
    # Slot 0: the hand-computed pair above; slot 1: logits 0 vs targets 1 -> log(2) per pixel;
    # slot 2 is invalid and holds NaN, which must reach neither the loss nor the gradient.
    logits = _slots([0.0, 2.0], [0.0, 0.0], [math.nan, math.nan]).requires_grad_()
    targets = _slots([1.0, 0.0], [1.0, 1.0], [1.0, 1.0])
    loss = bce_loss(logits, targets, torch.tensor([[True, True, False]]))
    slot_0 = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert loss.item() == pytest.approx((slot_0 + math.log(2)) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 2] == 0).all()


def test_dice_by_hand():
    # Slot 0: logits [0, 0] -> p = [1/2, 1/2], targets [1, 0]:
    #   sum(p*t) = 1/2, sum(p) = 1, sum(t) = 1 -> 1 - (2*1/2 + 1) / (1 + 1 + 1) = 1/3.
    # Slot 1: logits [ln 3, -ln 3] -> p = [3/4, 1/4], targets [1, 1]:
    #   sum(p*t) = 1, sum(p) = 1, sum(t) = 2 -> 1 - (2*1 + 1) / (1 + 2 + 1) = 1/4.
    # Slot 2 is invalid.
    ln3 = math.log(3)
    logits = _slots([0.0, 0.0], [ln3, -ln3], [5.0, 5.0])
    targets = _slots([1.0, 0.0], [1.0, 1.0], [0.0, 0.0])
    valid = torch.tensor([[True, True, False]])
    assert dice_loss(logits, targets, valid).item() == pytest.approx((1 / 3 + 1 / 4) / 2, rel=1e-6)

    def log_cosh(x: float) -> float:
        return math.log((math.exp(x) + math.exp(-x)) / 2)

    expected = (log_cosh(1 / 3) + log_cosh(1 / 4)) / 2
    assert log_cosh_dice_loss(logits, targets, valid).item() == pytest.approx(expected, rel=1e-6)


def test_grounding_loss_kinds():
    logits = torch.randn(2, 2, 4, 4)
    targets = (torch.rand(2, 2, 4, 4) > 0.5).float()
    valid = torch.tensor([[True, False], [True, True]])
    bce = bce_loss(logits, targets, valid)
    assert torch.equal(grounding_loss(logits, targets, valid, "bce"), bce)
    combined = grounding_loss(logits, targets, valid, "bce+logcosh_dice")
    assert torch.allclose(combined, bce + log_cosh_dice_loss(logits, targets, valid))
    with pytest.raises(ValueError, match="unknown loss kind"):
        grounding_loss(logits, targets, valid, "dice")


def test_targets_may_be_bool():
    logits = torch.randn(1, 2, 4, 4)
    targets = torch.rand(1, 2, 4, 4) > 0.5
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert torch.equal(bce_loss(logits, targets, valid), bce_loss(logits, targets.float(), valid))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_no_valid_slot_gives_zero_with_grad_path(loss_fn):
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = loss_fn(logits, torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        bce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8), torch.ones(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------- ignored pixels (255 in the label map)

def test_ignored_pixels_are_neither_positive_nor_negative():
    # One slot of 3 pixels; pixel 2 is 255 in the label map (the labeler's unsure band) and its
    # target is 0. Counting it as background would add log(1 + e^4) to BCE and its probability
    # to Dice's denominator; ignored, the loss is that of pixels 0 and 1 alone.
    logits = _slots([0.0, 2.0, 4.0])
    targets = _slots([1.0, 0.0, 0.0])
    valid = torch.tensor([[True]])
    ignore = torch.tensor([[[False, False, True]]])  # (B, H, W)
    kept_logits, kept_targets = _slots([0.0, 2.0]), _slots([1.0, 0.0])
    assert bce_loss(logits, targets, valid, ignore).item() == pytest.approx(
        (math.log(2) + math.log(1 + math.e**2)) / 2, rel=1e-6)
    assert bce_loss(logits, targets, valid, ignore) < bce_loss(logits, targets, valid)  # the old negative
    for loss_fn in (dice_loss, log_cosh_dice_loss):
        assert loss_fn(logits, targets, valid, ignore).item() == pytest.approx(
            loss_fn(kept_logits, kept_targets, valid).item(), rel=1e-6)
    for kind in ("bce", "bce+logcosh_dice"):
        assert grounding_loss(logits, targets, valid, kind, ignore).item() == pytest.approx(
            grounding_loss(kept_logits, kept_targets, valid, kind).item(), rel=1e-6)


def test_ignored_pixels_reach_no_gradient_even_as_nan():
    logits = _slots([0.0, 2.0, math.nan], [1.0, -1.0, math.nan]).requires_grad_()
    targets = _slots([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])
    ignore = torch.tensor([[[False, False, True]]])
    loss = grounding_loss(logits, targets, torch.tensor([[True, True]]), "bce+logcosh_dice", ignore)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[..., 2] == 0).all()
    assert (logits.grad[..., :2] != 0).all()


def test_a_slot_whose_pixels_are_all_ignored_costs_nothing():
    logits, targets = _slots([3.0, -3.0]), _slots([0.0, 1.0])
    ignore = torch.ones(1, 1, 2, dtype=torch.bool)
    assert bce_loss(logits, targets, torch.tensor([[True]]), ignore).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        bce_loss(logits, targets, torch.tensor([[True]]), torch.ones(1, 2, 2, dtype=torch.bool))
