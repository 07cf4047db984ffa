"""A real source's own masks (``source.images`` of a format with masks, no annotator): each image
keeps the labels it came with, read beside it (``factory.pipeline.real``); they annotate every class."""

from __future__ import annotations

from factory.pipeline.labelers.base import Labeler


class RealMasks(Labeler):
    kind = "masks"
    own_stage = False

    def model_id(self, recipe, config):
        return f"masks:{recipe.source.format}"
