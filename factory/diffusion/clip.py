"""CLIP image quality: an automatic score to filter synthetic test sets.

The follow-up paper kept the best 80% of its test images by CLIP-IQA+, the
probability CLIP gives to "Good photo." against "Bad photo."; the papers' own test
sets were checked by hand, which a factory cannot do. ``QualityScorer`` computes that
probability and ``select_top_fraction`` keeps the best part of a set.

Two ways to get a CLIP, as for the generator:
- ``tiny_clip()``: a randomly initialised miniature built in code; what tests use.
- ``load_clip(source)``: a saved ``CLIPModel`` (local folder or ``s3://`` prefix),
  read from safetensors only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from factory.core.conventions import TINY
from factory.core.storage import local_copy
from factory.diffusion.tiny import tiny_tokenizer

TINY_IMAGE_SIZE = 32
PROMPTS = ("Good photo.", "Bad photo.")


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor]:
    """A random two-layer CLIP on 32x32 images, with the generator's tiny tokenizer; its
    weights come from `seed` alone (the global random state is left as it was)."""
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=32)
    # CLIP's own preprocessing (bicubic resize of the short side, centre crop, CLIP
    # mean/std), only at the tiny model's resolution.
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, tokenizer, processor


def load_clip(source: str, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor]:
    """The tiny CLIP, or a saved one (model, tokenizer, processor) from a folder or s3:// prefix."""
    if source == TINY:
        model, tokenizer, processor = tiny_clip()
    else:
        path = local_copy(source)
        model = CLIPModel.from_pretrained(path, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path)
        processor = CLIPImageProcessor.from_pretrained(path)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, processor


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


class QualityScorer:
    """CLIP-IQA+: the softmax probability of the first (positive) prompt against the second."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, processor: CLIPImageProcessor,
                 prompts: tuple[str, str] = PROMPTS, batch_size: int = 64):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        text = tokenizer(list(prompts), padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            self.text_features = _unit(model.get_text_features(**text).pooler_output)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of uint8 images (N, H, W, 3); higher is better."""
        scores = [self._score(images[start:start + self.batch_size])
                  for start in range(0, len(images), self.batch_size)]
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def _score(self, images: np.ndarray) -> np.ndarray:
        # channels_last is stated because small images (e.g. 3x3) make the layout ambiguous.
        pixels = self.processor(images=list(images), return_tensors="pt",
                                input_data_format="channels_last")["pixel_values"]
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        image_features = _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)
        logits = self.model.logit_scale.exp() * image_features @ self.text_features.T
        return logits.float().softmax(dim=-1)[:, 0].cpu().numpy()


def select_top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """A mask keeping the best ``fraction`` of ``scores`` (at least that many, rounded up).

    Among equal scores the earlier index is kept, so the choice is reproducible.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = np.asarray(scores)
    # round() first so that float noise (0.7 * 10 = 7.000000000000001) does not round up.
    keep = math.ceil(round(fraction * len(scores), 9))
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:keep]] = True
    return mask
