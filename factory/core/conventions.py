"""Conventions every layer shares: label-map values, the built-in tiny models, model and weight names
the recipes use, the default prompts, where the built-in recipes are, the held-out hash."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

BACKGROUND = 0
IGNORE = 255  # label-map value of pixels no loss and no metric counts (VOC's "void")

# The model name of every built-in random miniature (generator, labeler, quality scorer):
# built from config in code, for tests and the default run on a CPU.
TINY = "tiny"

# labeler.model of a slim Mask R-CNN over its vocabulary's own labels (the mini world's oracle).
SMALL = "maskrcnn_small"
# labeler.weights that name torchvision's own COCO checkpoint of the architecture.
TORCHVISION_WEIGHTS = "torchvision"

# The prompts a recipe makes of one class and of a pair unless it says otherwise.
PROMPT_ONE = "a photograph of a {0}"
PROMPT_TWO = "a photograph of a {0} and a {1}"

# The built-in recipes (build, grounding, segmenter) and the vocabularies, prompts and pairs they
# name: package data of `factory`, so an installed package finds them as a checkout does (pip
# installs packages unpacked: a folder).
RECIPE_DIR = Path(str(resources.files("factory") / "recipes"))


def holdout_position(sample_id: str) -> float:
    """A sample's place in [0, 1), from the hash of its id alone."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Whether a sample falls in the held-out `fraction` (validation, an export's val split).

    The choice depends on the id only, not on file order, workers or seeds, so every reader
    of a dataset holds out the same samples.
    """
    return holdout_position(sample_id) < fraction
