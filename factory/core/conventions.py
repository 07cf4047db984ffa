"""Conventions every layer shares: label-map values, the built-in tiny models, the held-out hash."""

from __future__ import annotations

import hashlib

BACKGROUND = 0
IGNORE = 255  # label-map value of pixels no loss and no metric counts (VOC's "void")

# The model name of every built-in random miniature (generator, labeler, quality scorer):
# built from config in code, for tests and the default run on a CPU.
TINY = "tiny"


def holdout_position(sample_id: str) -> float:
    """A sample's place in [0, 1), from the hash of its id alone."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Whether a sample falls in the held-out `fraction` (validation, an export's val split).

    The choice depends on the id only, not on file order, workers or seeds, so every reader
    of a dataset holds out the same samples.
    """
    return holdout_position(sample_id) < fraction
