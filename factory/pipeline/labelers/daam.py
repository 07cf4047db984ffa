"""DAAM (``annotator.daam``): the generator's cross-attention heat maps, thresholded, label each image
inside the generator's actor; it reads attention and trains nothing."""

from __future__ import annotations

from factory.pipeline.labelers.base import Labeler


class DAAM(Labeler):
    kind = "daam"
    own_stage = False

    def model_id(self, recipe, config):
        return "daam"

    def trained_classes(self, recipe, vocabulary):
        return set(), None  # zero-shot on every class
