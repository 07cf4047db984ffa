"""Procedural triplets: a dataset whose masks are truly learnable from the U-Net features.

The tiny random generator draws noise, so training on its triplets cannot show that the
grounding module learns. This source draws the images instead: each class is a shape with
its own colour and texture (``STYLES``), one or two objects per image on a noisy background,
every sample seeded by its plan seed, with exact masks. Each image then goes through the
one-pass extraction that annotating a real, ungenerated image needs: VAE-encoded, noised to
the capture step by the scheduler, and passed once through the U-Net with its prompt.

``DrawStage`` is a model stage like the generator and the labeler together, and
``build_procedural`` runs it through the build (``factory.build.pipeline.run_build``, in this
process), so the output is a factory triplet dataset that training and evaluation read unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from factory.build.pipeline import StageSpec, prepare_build, run_build
from factory.build.recipe import CaptureConfig, GeneratorConfig, Recipe
from factory.core.conventions import TINY
from factory.core.devices import pick_device, pick_dtype
from factory.core.vocab import VOC
from factory.dataset.batch import LABEL_COLUMNS, SampleLabels, attach_labels
from factory.diffusion.features import unet_features
from factory.diffusion.pipelines import encode_texts, load_pipeline
from factory.diffusion.steps import capture_call_index

SIZE = 64  # the tiny pipeline's image size
CELL = 2  # image pixels per latent pixel (the tiny VAE downsamples twice)
GAP = 1  # latent pixels between the two objects of an image, so that masks never touch
GENERATOR = "procedural"  # the `generator` and `labeler` of every row: drawn, not generated or detected


@dataclass(frozen=True)
class Style:
    shape: Literal["cross", "triangle", "bowl", "bar", "slab", "disc"]
    rgb: tuple[float, float, float]
    texture: Literal["solid", "hstripes", "vstripes", "checker", "dots"]


# Four classes seen and two unseen in VOC split 1 (unseen: tvmonitor, car, dog, sofa, train).
STYLES = {
    "aeroplane": Style("cross", (0.2, 0.4, 1.0), "solid"),
    "bird": Style("triangle", (1.0, 0.15, 0.1), "solid"),
    "boat": Style("bowl", (1.0, 0.9, 0.1), "hstripes"),
    "bottle": Style("bar", (0.1, 0.85, 0.2), "vstripes"),
    "car": Style("slab", (0.1, 0.9, 0.9), "checker"),
    "dog": Style("disc", (0.9, 0.2, 0.9), "dots"),
}
SPLIT = 1
SEEN = tuple(name for name in STYLES if name in VOC.seen(SPLIT))
UNSEEN = tuple(name for name in STYLES if name in VOC.unseen(SPLIT))


def _shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a shape in box coordinates u, v in [-1, 1] (v points down)."""
    r2 = u * u + v * v
    if shape == "cross":
        return (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4)
    if shape == "triangle":
        return np.abs(u) <= (v + 1) / 2
    if shape == "bowl":
        return (v >= -0.1) & (r2 <= 1)
    if shape == "bar":
        return np.abs(u) <= 0.55
    if shape == "slab":
        return np.abs(v) <= 0.6
    return r2 <= 1  # disc


def _texture(texture: str, y: np.ndarray, x: np.ndarray, phase: int) -> np.ndarray:
    """Brightness pattern (0.7 or 1) over the image grid; the phase shifts it per sample."""
    y, x = y + phase, x + phase
    dark = {"solid": np.zeros_like(x, bool),
            "hstripes": (y // 3) % 2 == 1,
            "vstripes": (x // 3) % 2 == 1,
            "checker": (x // 4 + y // 4) % 2 == 1,
            "dots": (x % 5 < 2) & (y % 5 < 2)}[texture]
    return np.where(dark, 0.7, 1.0)


def _boxes(count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(top, left, side) of each object's square box, in latent pixels; two boxes never overlap."""
    cells = SIZE // CELL
    if count == 1:
        side = int(rng.integers(14, 23))
        top, left = (int(p) for p in rng.integers(0, cells - side + 1, 2))
        return [(top, left, side)]
    # Two boxes one after the other along a random axis, each anywhere across it.
    first = int(rng.integers(13, 18))
    second = int(rng.integers(13, min(17, cells - GAP - first) + 1))
    a = int(rng.integers(0, cells - first - second - GAP + 1))
    b = int(rng.integers(a + first + GAP, cells - second + 1))
    across = [int(rng.integers(0, cells - side + 1)) for side in (first, second)]
    if rng.random() < 0.5:
        boxes = [(a, across[0], first), (b, across[1], second)]
    else:
        boxes = [(across[0], a, first), (across[1], b, second)]
    return boxes if rng.random() < 0.5 else boxes[::-1]


def draw(classes: tuple[str, ...] | list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 (SIZE, SIZE, 3) image of one object per class, and its (O, SIZE, SIZE) bool masks.

    Shapes are drawn on the latent grid (each latent pixel's CELL x CELL image pixels are all in
    or all out), textures on the image grid: the check is whether the features tell the classes
    apart, not how finely a 32x32 feature map places an edge inside one of its pixels.
    """
    if not 1 <= len(classes) <= 2:
        raise ValueError(f"an image holds one or two objects, not {len(classes)}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    cell_y, cell_x = y // CELL, x // CELL
    background = rng.uniform(0.15, 0.55) + rng.uniform(-0.06, 0.06, 3)  # greyish: objects are saturated
    image = background + rng.normal(0, 0.04, (SIZE, SIZE, 3))
    masks = np.zeros((len(classes), SIZE, SIZE), bool)
    for k, (name, (top, left, side)) in enumerate(zip(classes, _boxes(len(classes), rng))):
        style = STYLES[name]
        centre, half = (side - 1) / 2, side / 2
        u, v = (cell_x - left - centre) / half, (cell_y - top - centre) / half
        masks[k] = _shape(style.shape, u, v) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
        colour = np.clip(np.array(style.rgb) + rng.uniform(-0.08, 0.08, 3), 0, 1)
        shade = _texture(style.texture, y, x, int(rng.integers(0, 6)))
        image[masks[k]] = colour * shade[masks[k], None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), masks


def _vae_latents(pipe: StableDiffusionPipeline, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(pipe.device, pipe.vae.dtype) / 127.5 - 1
    return pipe.vae.encode(pixels).latent_dist.mean


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
    names = list(STYLES)
    images = np.stack([draw([names[i % len(names)]], seed=i)[0] for i in range(32)])
    return float(1 / _vae_latents(pipe, images).std())


@torch.inference_mode()
def capture_latents(pipe: StableDiffusionPipeline, images: np.ndarray, seeds: list[int], *, scale: float,
                    steps: int, remaining: int) -> tuple[torch.Tensor, int]:
    """Images as the U-Net sees them at the capture step: VAE-encoded, scaled, and noised by the
    scheduler to the timestep of the capture call (``remaining`` steps left of ``steps``).
    Sample i's noise comes from seeds[i] alone, as in generation. Returns latents and timestep."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timestep = scheduler.timesteps[capture_call_index(steps, remaining)]
    latents = _vae_latents(pipe, images) * scale
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(int(seed)))
                         for seed in seeds]).to(latents)
    return scheduler.add_noise(latents, noise, timestep.reshape(1)), int(timestep)


def procedural_recipe(out: str, *, classes: Sequence[str], num_samples: int, seed: int,
                      features: Literal["latent", "tensors"] = "tensors", steps: int = 50, step: int = 5,
                      batch_size: int = 32) -> Recipe:
    """The factory recipe of a procedural set: about half one-object samples (evenly over
    `classes`) and half two-object ones (evenly over all their pairs), shuffled by the plan,
    prompts "a photograph of a {x} [and a {y}]", VOC split 1, capture at `step` of `steps`.
    Its generator is the Stable Diffusion whose VAE, U-Net and text encoder make the features
    (and that the Featurizer loads). One Parquet part per batch of `batch_size` samples."""
    pairs = len(classes) * (len(classes) - 1) // 2
    return Recipe.model_validate({
        "name": f"procedural-{seed}", "out": out, "vocabulary": "voc", "classes": list(classes), "split": SPLIT,
        "per_class": -(-num_samples // (2 * len(classes))),
        "per_pair": -(-num_samples // (2 * pairs)) if pairs else 0, "pairs": "all" if pairs else None,
        "num_samples": num_samples, "seed": seed,
        "generator": {"model": TINY, "steps": steps, "height": SIZE, "width": SIZE, "batch_size": batch_size},
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
        drawn = [draw(list(classes), int(seed)) for classes, seed in zip(batch["classes"], batch["seed"])]
        batch["image"] = np.stack([image for image, _ in drawn])
        latents, timestep = capture_latents(self.pipe, batch["image"], list(batch["seed"]), scale=self.scale,
                                            steps=self.generator.steps, remaining=self.capture.step)
        batch["timestep"] = np.full(n, timestep, np.int64)
        if self.capture.features == "latent":  # the Featurizer makes the U-Net pass
            batch["latent"] = latents.float().cpu().numpy().astype(np.float16)
        else:  # the Featurizer's pass on a latent: the prompt's text-encoder states, one U-Net call
            prompt_embeds = encode_texts(self.pipe, list(batch["prompt"]))
            for r, tensor in unet_features(self.pipe.unet, latents, timestep, prompt_embeds).items():
                batch[f"features_{r}"] = tensor.float().cpu().numpy().astype(np.float16)
        batch["generate_seconds"] = np.full(n, (time.perf_counter() - start) / n)  # drawing, encoding, capture
        return attach_labels(batch, [_exact_labels(list(classes), masks)
                                     for classes, (_, masks) in zip(batch["classes"], drawn)], time.perf_counter())


def _exact_labels(classes: list[str], masks: np.ndarray) -> SampleLabels:
    label = np.zeros(masks.shape[1:], np.uint8)  # objects never overlap: each pixel has one class
    for name, mask in zip(classes, masks):
        label[mask] = VOC.lookup(name).index
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
