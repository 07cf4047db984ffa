"""The grounding annotator (``annotator.checkpoint``): a trained module labels each image from the
generator's own U-Net features, inside the generator's actor (``factory.pipeline.annotate``)."""

from __future__ import annotations

from factory.pipeline.labelers.base import Labeler


class Grounding(Labeler):
    kind = "annotator"
    own_stage = False
    cost_note = "the grounding module's forward pass is not counted (one small network per image)"

    def model_id(self, recipe, config):
        return f"grounding:{recipe.annotator.checkpoint}"

    def trained_classes(self, recipe, vocabulary):
        # only annotating builds need grounding (and torch) on the driver
        from grounding.checkpoint import classes_seen, read_grounding_metadata

        metadata = read_grounding_metadata(recipe.annotator.checkpoint)
        # a split of another vocabulary (a user's classes drawn as the module's) says nothing of this one's
        same = metadata.get("vocabulary", {}).get("name", vocabulary.name) == vocabulary.name
        return set(classes_seen(metadata, vocabulary)), metadata["split"] if same else None
