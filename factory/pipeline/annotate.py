"""Annotate: label generated images with the trained grounding module (Algorithm 2), or
with DAAM, the papers' baseline.

One actor holds Stable Diffusion and the module: the generation call's U-Net features
at the capture step go straight into the module, which predicts a mask for each of
the prompt's classes, seen or unseen, and (with a presence head) whether each is in the image
at all: a class it judges absent gets no pixels. DAAM needs no module: its heat maps, recorded
during the same call, are thresholded instead. The outputs have the same columns as the
oracle labeler's, so encoding and writing are shared.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from factory.core.conventions import IGNORE
from factory.core.devices import pick_device
from factory.core.loading import load_with_retries
from factory.core.vocab import get_vocabulary
from factory.dataset.batch import CLASS_NOT_FOUND, SampleLabels, attach_labels
from factory.diffusion.daam import CrossAttentionRecorder, daam_scores
from factory.diffusion.features import FeatureCapture
from factory.diffusion.pipelines import generate
from factory.diffusion.steps import capture_call_index
from factory.diffusion.tokens import class_token_positions
from factory.pipeline.generate import load_generator
from factory.pipeline.sections import AnnotatorConfig, FastConfig, GeneratorConfig
from grounding.checkpoint import load_grounding_checkpoint
from grounding.config import TextConfig
from grounding.data import text_class_embeddings


def annotation_label_map(probabilities: np.ndarray, indices: list[int], *, threshold: float = 0.5,
                         ignore_below: float | None = None) -> np.ndarray:
    """uint8 map from per-class probabilities (O, H, W).

    A pixel goes to the most probable class when that probability exceeds ``threshold``
    (so overlaps go to the higher score); otherwise it is background, or 255 when its best
    probability is in the unsure band [ignore_below, threshold).
    """
    best = probabilities.max(axis=0)
    lut = np.array(indices, np.uint8)
    out = np.where(best > threshold, lut[probabilities.argmax(axis=0)], 0).astype(np.uint8)
    if ignore_below is not None:
        out[(best >= ignore_below) & (best <= threshold)] = IGNORE
    return out


class GroundingAnnotator:
    """A trained grounding module and how it reads: its text and the capture step of its features."""

    def __init__(self, checkpoint: str, device: torch.device, load_attempts: int = 3):
        module, metadata = load_with_retries(f"grounding checkpoint {checkpoint}",
                                             lambda: load_grounding_checkpoint(checkpoint), load_attempts)
        self.module = module.to(device)
        self.text = TextConfig.model_validate(metadata["text"])
        self.remaining = metadata["capture"]["steps_remaining"]

    def probabilities(self, pipe, features: dict[int, torch.Tensor], prompts: list[str], words: list[list[str]],
                      size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, O, H, W) class probabilities at `size` from a batch's U-Net features, and (B, O)
        presence scores (None: the module has no presence head)."""
        embeddings, mask = text_class_embeddings(pipe, self.text, prompts, words)
        logits, presence = self.module({r: t.float() for r, t in features.items()}, embeddings.float(), mask,
                                       with_presence=True)
        probabilities = torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        return probabilities.cpu().numpy(), None if presence is None else torch.sigmoid(presence).cpu().numpy()


class AnnotateStage:
    """Ray Data actor: generate and label in one call; one GPU when there are GPUs.

    The labels come from the grounding module reading the U-Net's features at its capture
    step, or, with ``annotator.daam``, from DAAM's cross-attention heat maps over every step
    (the papers' training-free baseline, as Protocol-I computes it).
    """

    def __init__(self, generator: GeneratorConfig, annotator: AnnotatorConfig, vocabulary: str,
                 fast: FastConfig | None = None, load_attempts: int = 3):
        self.generator, self.annotator = generator, annotator
        self.vocabulary = get_vocabulary(vocabulary)
        self.device = pick_device()
        self.pipe = load_generator(generator, fast, load_attempts, self.device)
        self.module = None if annotator.daam else GroundingAnnotator(annotator.checkpoint, self.device, load_attempts)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        prompts, words, seeds = list(batch["prompt"]), [list(w) for w in batch["class_words"]], list(batch["seed"])
        annotate = self.with_daam if self.module is None else self.with_module
        images, probabilities, presence = annotate(prompts, words, seeds)
        batch["image"] = images
        batch["generate_seconds"] = np.full(len(prompts), (time.perf_counter() - start) / len(prompts))
        # labelling happens inside the generation call: its time is counted there
        labels = [annotation_labels(probabilities[i, :len(names)], self.indices(names), self.annotator,
                                    None if presence is None else presence[i, :len(names)])
                  for i, names in enumerate(batch["classes"])]
        return attach_labels(batch, labels, time.perf_counter())

    def generate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        g = self.generator
        return generate(self.pipe, prompts, seeds, steps=g.steps, guidance_scale=g.guidance_scale,
                        height=g.height, width=g.width)

    def with_module(self, prompts: list[str], words: list[list[str]],
                    seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Images, (B, O, H, W) class probabilities and (B, O) presence scores from the module."""
        call = capture_call_index(self.generator.steps, self.module.remaining, self.generator.scheduler)
        with FeatureCapture(self.pipe.unet, call, batch=len(prompts)) as hooks:
            images = self.generate(prompts, seeds)
        return images, *self.module.probabilities(self.pipe, hooks.features, prompts, words, images.shape[1:3])

    def with_daam(self, prompts: list[str], words: list[list[str]],
                  seeds: list[int]) -> tuple[np.ndarray, np.ndarray, None]:
        """Images and (B, O, H, W) normalised DAAM heat maps, the scores its threshold reads; DAAM
        judges no presence."""
        with CrossAttentionRecorder(self.pipe) as recorder:  # every step, as the reference records
            images = self.generate(prompts, seeds)
        positions = [class_token_positions(self.pipe.tokenizer, p, w) for p, w in zip(prompts, words)]
        return images, daam_scores(recorder.heatmaps(positions), size=images.shape[1:3]), None

    def indices(self, names: list[str]) -> list[int]:
        return [self.vocabulary.lookup(name).index for name in names]


def annotation_labels(p: np.ndarray, indices: list[int], config: AnnotatorConfig,
                      presence: np.ndarray | None = None) -> SampleLabels:
    """One image's labels from its (O, H, W) class probabilities; `indices`: each class's label index;
    `presence`: (O,) presence scores, a class below ``config.presence_threshold`` judged absent (no pixels)."""
    if presence is not None:
        p = np.where((presence < config.presence_threshold)[:, None, None], 0.0, p)
    label = annotation_label_map(p, indices, threshold=config.threshold, ignore_below=config.ignore_below)
    masks = p > config.threshold
    found = masks.reshape(len(indices), -1).any(axis=1)
    if not found.all() and config.on_missing != "absent":  # as with the oracle: it may be anywhere unclaimed
        label[label == 0] = IGNORE
    return SampleLabels(
        label=label, masks=masks,
        # score: mean probability inside the class's mask, a confidence for later filtering
        scores=np.array([p[k][masks[k]].mean() if found[k] else 0.0 for k in range(len(indices))], np.float32),
        instances=found.astype(np.int16),
        drop_reason="" if found.all() or config.on_missing != "drop" else CLASS_NOT_FOUND,
        presence=None if presence is None else presence.astype(np.float32))
