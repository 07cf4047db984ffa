"""One held-out hash (factory/core/conventions.py): grounding's validation rows and an export's
val split pick the same samples."""

from __future__ import annotations

import numpy as np

from factory.core.conventions import holdout_position, is_held_out
from factory.dataset.export import split_of
from grounding.data import in_validation

IDS = [f"{i:07d}-{i * 7919 % 10**8:08x}" for i in range(2000)]


def test_the_same_samples_are_held_out_everywhere():
    for fraction in (0.0, 0.1, 0.3, 0.999):
        held = in_validation(IDS, fraction)
        assert held.tolist() == [split_of(i, fraction) == "val" for i in IDS]
        assert held.tolist() == [is_held_out(i, fraction) for i in IDS]


def test_the_share_held_out_is_the_fraction_and_grows_monotonically():
    positions = np.array([holdout_position(i) for i in IDS])
    assert ((positions >= 0) & (positions < 1)).all()
    assert abs(in_validation(IDS, 0.1).mean() - 0.1) < 0.02
    assert not (in_validation(IDS, 0.1) & ~in_validation(IDS, 0.2)).any()  # a larger fraction keeps the smaller's
