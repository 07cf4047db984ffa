"""Real images through the model actor: into the U-Net by the recipe's route, then labelled.

``ImageStage`` is the build's model stage when the recipe reads real images (``source``): it
reads each planned image (``factory.pipeline.images``), gets the U-Net features a generated image
would have given at the capture step (``factory.diffusion.inversion.image_features``), and then
- with masks and capture on, keeps the features (or their latent) with the image's own masks:
  a triplet set for grounding training, the "real" half of the papers' "sim+real";
- with ``annotator.checkpoint``, lets the grounding module label the image, as it labels
  generated ones (``factory.pipeline.annotate``).
The inversion route also records each image's reconstruction PSNR.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from factory.core.devices import pick_device
from factory.core.vocab import get_vocabulary
from factory.dataset.batch import SampleLabels, attach_labels
from factory.diffusion.features import fp16_array
from factory.diffusion.inversion import image_features, reconstruction_psnr
from factory.pipeline.annotate import GroundingAnnotator, annotation_labels
from factory.pipeline.generate import load_generator
from factory.pipeline.images import ImageReader, class_masks
from factory.pipeline.sections import AnnotatorConfig, CaptureConfig, FastConfig, GeneratorConfig, SourceConfig


class ImageStage:
    """Ray Data actor: real images -> U-Net features -> labels; one GPU when there are GPUs."""

    def __init__(self, generator: GeneratorConfig, source: SourceConfig, capture: CaptureConfig,
                 annotator: AnnotatorConfig, vocabulary: str, fast: FastConfig | None = None, load_attempts: int = 3):
        self.generator, self.source, self.capture, self.annotator = generator, source, capture, annotator
        self.vocabulary = get_vocabulary(vocabulary)
        self.reader = ImageReader(source, vocabulary)
        device = pick_device()
        self.pipe = load_generator(generator, fast, load_attempts, device)
        self.module = (GroundingAnnotator(annotator.checkpoint, device, load_attempts) if annotator.checkpoint
                       else None)
        self.remaining = self.module.remaining if self.module else capture.step

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        g, n = self.generator, len(batch["sample_id"])
        prompts, words = list(batch["prompt"]), [list(w) for w in batch["class_words"]]
        # 1. Read: the images fitted to the generator's size (source.resize), their label maps where the
        # source has them, and their sizes before, which the rows record.
        images, label_maps, original = self.reader.load(list(batch["source_image"]), (g.height, g.width))
        batch["source_height"], batch["source_width"] = original[:, 0], original[:, 1]
        # 2. Into the U-Net: the features at the capture step, by the recipe's route.
        got = image_features(self.pipe, images, prompts, list(batch["seed"]), route=self.source.route,
                             steps=g.steps, remaining=self.remaining)
        batch["image"] = images
        if got.regenerated is not None:
            batch["psnr"] = reconstruction_psnr(images, got.regenerated).astype(np.float32)
        batch["generate_seconds"] = np.full(n, (time.perf_counter() - start) / n)  # reading and featurizing
        # 3. Labels: the module's, or the image's own masks beside the captured features.
        start = time.perf_counter()
        indices = [[self.vocabulary.lookup(name).index for name in names] for names in batch["classes"]]
        if self.module is not None:
            probabilities, presence = self.module.probabilities(self.pipe, got.features, prompts, words,
                                                                images.shape[1:3])
            labels = [annotation_labels(probabilities[i, :len(k)], k, self.annotator,
                                        None if presence is None else presence[i, :len(k)])
                      for i, k in enumerate(indices)]
            return attach_labels(batch, labels, start)
        batch["timestep"] = np.full(n, got.timestep, np.int64)
        if self.capture.features == "latent":
            batch["latent"] = fp16_array(got.latent)
        else:
            for r, tensor in got.features.items():
                batch[f"features_{r}"] = fp16_array(tensor)
        return attach_labels(batch, [_mask_labels(label, k) for label, k in zip(label_maps, indices)], start)


def _mask_labels(label: np.ndarray, indices: list[int]) -> SampleLabels:
    """An image's own masks as labels; a class whose pixels did not survive resizing is not found."""
    masks = class_masks(label, indices)
    found = masks.reshape(len(indices), -1).any(axis=1)
    return SampleLabels(label=label, masks=masks, scores=found.astype(np.float32), instances=found.astype(np.int16))

