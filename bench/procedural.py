"""Drawn triplets: mini-world drawings with exact masks, featurized by the world's generator.

Generated triplets test the whole factory; these test the grounding method itself, in seconds:
each sample's image is drawn (world/draw.py, seeded by its plan seed, exact masks) and goes
through the one-pass extraction that annotating a real, ungenerated image needs: VAE-encoded,
noised to the capture step by the scheduler, and passed once through the U-Net with its
prompt. With the world's trained generator (its text encoder knows that "red disc" and "red
cross" share a word) a module trained on the seen classes can be checked on unseen ones.

``DrawStage`` is a model stage like the generator and the labeler together, and
``build_procedural`` runs it through the build (``factory.pipeline.pipeline.run_build``, in this
process), so the output is a factory triplet dataset that training and evaluation read unchanged.
bench/learnability.py builds its sets with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from factory.core.conventions import TINY
from factory.core.devices import pick_device, pick_dtype
from factory.core.vocab import SHAPES
from factory.dataset.batch import LABEL_COLUMNS, SampleLabels, attach_labels
from factory.diffusion.features import fp16_array, unet_features
from factory.diffusion.inversion import noised_latents, vae_latents
from factory.diffusion.pipelines import load_pipeline, unet_conditioning
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.stages import StageSpec
from factory.pipeline.recipe import Recipe
from factory.pipeline.sections import CaptureConfig, GeneratorConfig
from world.draw import SIZE, draw, label_map

GENERATOR = "procedural"  # the `generator` and `labeler` of every row: drawn, not generated or detected
WORLD_GENERATOR = "models/shapes-generator"  # whose VAE, U-Net and text encoder make the features
SPLIT = 1
SEEN = SHAPES.seen(SPLIT)
UNSEEN = SHAPES.unseen(SPLIT)


@torch.inference_mode()
def latent_scale(pipe: StableDiffusionPipeline, model: str) -> float:
    """The factor that makes VAE latents unit-variance, as the U-Net expects them.

    That is Stable Diffusion's `scaling_factor` (LDM set it to 1 / std of a batch of latents).
    The tiny pipeline's random VAE keeps SD's 0.18215, which leaves its latents at std ~0.04,
    drowned by the capture step's noise (std 0.29 at t=5 of 50): calibrate it the LDM way,
    on a fixed batch of drawn images, so every dataset gets the same factor.
    """
    if model != TINY:
        return float(pipe.vae.config.scaling_factor)
    names = SHAPES.names
    images = np.stack([draw([names[i % len(names)]], seed=2 * i)[0] for i in range(32)])
    return float(1 / vae_latents(pipe, images, scale=1.0).std())


def procedural_recipe(out: str, *, classes: Sequence[str], num_samples: int, seed: int,
                      features: Literal["latent", "tensors"] = "tensors", steps: int = 25, step: int = 3,
                      batch_size: int = 32, generator: str = WORLD_GENERATOR) -> Recipe:
    """The factory recipe of a drawn set: about half one-object samples (evenly over
    `classes`) and half two-object ones (evenly over all their pairs), shuffled by the plan,
    prompts "a photograph of a {x} [and a {y}]", shapes split 1, capture at `step` of `steps`
    (3 of 25: the timestep of the paper's 5 of 50). Its generator is the Stable Diffusion whose
    VAE, U-Net and text encoder make the features (and that the Featurizer loads). One Parquet
    part per batch of `batch_size` samples."""
    pairs = len(classes) * (len(classes) - 1) // 2
    return Recipe.model_validate({
        "name": f"procedural-{seed}", "out": out, "vocabulary": "shapes", "classes": list(classes), "split": SPLIT,
        "per_class": -(-num_samples // (2 * len(classes))),
        "per_pair": -(-num_samples // (2 * pairs)) if pairs else 0, "pairs": "all" if pairs else None,
        "num_samples": num_samples, "seed": seed,
        "generator": {"model": generator, "steps": steps, "height": SIZE, "width": SIZE, "batch_size": batch_size},
        "capture": {"features": features, "step": step},
        "writer": {"rows_per_file": batch_size, "preview_samples": 16}})


class DrawStage:
    """Model stage: draws each sample's image and exact masks, and captures the U-Net features
    of the drawn image (the stage batch of ``factory.dataset.batch``, as generate + label give)."""

    def __init__(self, generator: GeneratorConfig, capture: CaptureConfig):
        self.generator, self.capture = generator, capture
        device = pick_device()
        self.pipe = load_pipeline(generator.model, device, pick_dtype(generator.dtype, device))
        self.scale = latent_scale(self.pipe, generator.model)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["sample_id"])
        drawn = [draw(list(classes), int(seed), "training") for classes, seed in zip(batch["classes"], batch["seed"])]
        batch["image"] = np.stack([image for image, _ in drawn])
        latents, timestep = noised_latents(self.pipe, vae_latents(self.pipe, batch["image"], self.scale),
                                           list(batch["seed"]), steps=self.generator.steps,
                                           remaining=self.capture.step)
        batch["timestep"] = np.full(n, timestep, np.int64)
        if self.capture.features == "latent":  # the Featurizer makes the U-Net pass
            batch["latent"] = fp16_array(latents)
        else:  # the Featurizer's pass on a latent: conditioned on the prompt, one U-Net call
            conditioning = unet_conditioning(self.pipe, list(batch["prompt"]), self.generator.height,
                                             self.generator.width)
            for r, tensor in unet_features(self.pipe.unet, latents, timestep, conditioning).items():
                batch[f"features_{r}"] = fp16_array(tensor)
        batch["generate_seconds"] = np.full(n, (time.perf_counter() - start) / n)  # drawing, encoding, capture
        return attach_labels(batch, [_exact_labels(list(classes), masks)
                                     for classes, (_, masks) in zip(batch["classes"], drawn)], time.perf_counter())


def _exact_labels(classes: list[str], masks: np.ndarray) -> SampleLabels:
    label = label_map(classes, masks)  # objects never overlap: each pixel has one class
    ones = np.ones(len(classes))
    return SampleLabels(label=label, masks=masks, scores=ones.astype(np.float32), instances=ones.astype(np.int16))


def build_procedural(recipe: Recipe) -> dict:
    """Write the recipe's samples as a triplet dataset at recipe.output, through the build
    (Parquet parts with commit records, preview, manifest, card); returns the build summary."""
    stage = StageSpec(DrawStage, {"generator": recipe.generator, "capture": recipe.capture},
                      recipe.generator.batch_size, reads=("classes", "seed", "prompt"),
                      adds=("image", "generate_seconds", "timestep", "latent", "features_<r>", *LABEL_COLUMNS))
    return run_build(prepare_build(recipe), stages=[stage], models={"generator": GENERATOR, "labeler": GENERATOR},
                     in_process=True)
