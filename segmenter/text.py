"""Class-name embeddings for the segmenter's text head: CLIP's text encoder, frozen.

Each class name (the vocabulary's natural name, "tv monitor" rather than "tvmonitor") goes
through a prompt template and CLIP's text tower; the projected, unit-length text feature is
the class's embedding. They are computed once, by the training driver for the classes a run
trains on and by the evaluation driver for names added at test time, and travel with the
checkpoint (safetensors), so no worker loads CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from factory.core.checkpoints import CheckpointError
from factory.core.storage import check_model_source, first_line
from factory.core.vocab import Vocabulary
from factory.diffusion.clip import load_clip

TEMPLATE = "a photograph of a {}"  # the factory's own one-object prompt, as the images were drawn


def check_text_encoder(source: str) -> None:
    """A path or s3:// text encoder must exist (before anything loads); 'tiny' and hub ids pass."""
    if source != "tiny":
        check_model_source(source)


def encode_class_names(source: str, vocabulary: Vocabulary, names: Sequence[str],
                       template: str = TEMPLATE) -> Tensor:
    """(len(names), D) float32 unit vectors: CLIP text features of `template` filled with each
    class's natural name. `source`: 'tiny' (random, offline) or a saved CLIPModel (see
    factory.diffusion.clip.load_clip)."""
    try:
        model, tokenizer, _ = load_clip(source)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the text encoder {source}: {first_line(exc)}") from None
    prompts = [template.format(vocabulary.lookup(name).natural) for name in names]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        features = model.get_text_features(**tokens).pooler_output
    return F.normalize(features.float(), dim=-1)
