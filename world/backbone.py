"""Pretrain the mini world's backbone: the `world` segmenter's ResNet, once, on a drawn task that
shares no class with the 20 ``shapes`` classes.

MaskFormer starts from an ImageNet-pretrained ResNet (Cheng et al. 2021, section 4; Li et al. 2023
train their segmenters so); a ResNet trained from scratch on a few thousand 64 px images learns
slowly. This is the world's ImageNet: 20 classes of other colours (orange, purple, cyan, pink,
brown) and other forms (ring, diamond, bar, star) on other textures (checks and dots), one to
three objects an image, large and small, overlapping at times: which classes are in it (one
sigmoid per class; with one object an image, a classifier learnt it perfectly in 500 steps and
so learnt little). None of its colours, forms or textures is one of the ``shapes``
classes' (tests/world/test_backbone.py checks the pixels), so the segmenter learns those only
from its own training set, as a real one learns VOC's classes from VOC. ``out`` receives
``model.safetensors`` in the layout ``model.backbone_weights`` loads (transformers' ResNet), a
loss plot, samples and a card; ``work`` the resumable state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from factory.core.devices import pick_device
from world.draw import SIZE
from world.utils import SteppedTraining, image_grid, write_card

KIND = "world-backbone-training/1"
WEIGHTS = "model.safetensors"
COLOURS = {"orange": (235, 135, 30), "purple": (135, 55, 185), "cyan": (40, 205, 215), "pink": (245, 125, 180),
           "brown": (135, 85, 45)}
FORMS = ("ring", "diamond", "bar", "star")
CLASSES = [f"{colour} {form}" for colour in COLOURS for form in FORMS]


class BackboneTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("models/shapes-backbone", description="the folder of model.safetensors and its card")
    work: str = Field("runs/shapes-backbone", description="the resumable training state")
    seed: int = Field(0, description="seeds the initial weights and every drawn batch")
    steps: int = Field(3000, ge=0, description="training steps (the rate drops 10x for the last quarter)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate, after 100 warm-up steps")
    save_every: int = Field(500, ge=1, description="steps between checkpoints (and weight exports)")
    eval_images: int = Field(1000, ge=1, description="held-out drawings the card's accuracy is measured on")


def form_mask(form: str, centre: tuple[float, float], radius: float) -> np.ndarray:
    """(64, 64) bool: the pixels of a pretraining form (none of world.draw's disc, square, triangle, cross)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy = x - centre[0], y - centre[1]
    distance = np.hypot(dx, dy)
    if form == "ring":
        return (distance <= radius) & (distance >= 0.55 * radius)
    if form == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if form == "bar":  # a diagonal bar
        return (np.abs(dx - dy) <= 0.35 * radius) & (np.abs(dx + dy) <= 1.6 * radius)
    if form == "star":  # five points
        angle = np.arctan2(dy, dx)
        return distance <= radius * (0.55 + 0.45 * np.cos(5 * angle) ** 2)
    raise ValueError(f"unknown form {form!r}")


def texture(rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float: checks or dots, unsaturated, where world.draw has stripes and blotches."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    period = rng.uniform(5, 12)
    if rng.random() < 0.5:
        pattern = np.sign(np.sin(x * np.pi / period) * np.sin(y * np.pi / period))
    else:
        pattern = (np.hypot((x % period) - period / 2, (y % period) - period / 2) < period / 4) * 2.0 - 1
    grey = rng.uniform(70, 150) + rng.uniform(6, 18) * pattern + rng.normal(0, 4, (SIZE, SIZE))
    return np.clip(grey[..., None] + rng.uniform(-8, 8, 3), 40, 190)


def draw_pretraining(labels: list[int], seed: int) -> np.ndarray:
    """(64, 64, 3) uint8: one object of each class ``CLASSES[k]`` of ``labels``, in turn (a later one may
    cover an earlier one's pixels), anywhere, of any size; seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    image = texture(rng)
    for label in labels:
        colour, form = CLASSES[label].split()
        radius = rng.uniform(7, 20)
        mask = form_mask(form, tuple(rng.uniform(radius / 2, SIZE - radius / 2, 2)), radius)
        shade = np.array(COLOURS[colour]) * rng.uniform(0.85, 1.1) + rng.normal(0, 6, (SIZE, SIZE, 3))
        image[mask] = shade[mask]
    return np.clip(image, 0, 255).round().astype(np.uint8)


def batch(seed: int, step: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 images (size, 64, 64, 3) and (size, 20) targets: which classes each shows; a function of (seed, step)
    alone, so a resumed run draws what it would have. Held-out drawings use negative steps."""
    rng = np.random.default_rng([seed, step + 2**31])
    images, targets = [], torch.zeros(size, len(CLASSES))
    for i in range(size):
        labels = rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), replace=False)
        images.append(draw_pretraining([int(k) for k in labels], int(rng.integers(2**31))))
        targets[i, labels] = 1.0
    return np.stack(images), targets


class Classifier(nn.Module):
    """The backbone, then global pooling and a linear layer: a logit per pretraining class (dropped after)."""

    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, len(CLASSES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        last = self.backbone(pixels).feature_maps[-1]
        return self.head(last.mean(dim=(2, 3)))


# Changing these makes a different run: its training state is not resumed.
_RUN_IDENTITY = ("seed", "batch_size", "lr")


class BackboneTraining(SteppedTraining):
    """``backbone``: the segmenter's own ResNet module (transformers' ResNetBackbone), built by the caller
    from the preset it is for, so that its weights load there unchanged; ``width`` its last stage's channels;
    ``normalize``: the segmenter's input normalisation, uint8 (N, H, W, 3) -> float (N, 3, H, W), so that the
    backbone learns on inputs as the segmenter will give them."""
    name, kind, identity = "backbone", KIND, _RUN_IDENTITY

    def __init__(self, config: BackboneTrainConfig, backbone: nn.Module, width: int,
                 normalize: Callable[[torch.Tensor], torch.Tensor]):
        self.config, self.device, self.normalize = config, pick_device(), normalize
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = Classifier(backbone, width).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=1e-4)
        self.resume()

    def loss(self, step: int) -> torch.Tensor:
        images, targets = batch(self.config.seed, step, self.config.batch_size)
        return nn.functional.binary_cross_entropy_with_logits(self.model(self._pixels(images)),
                                                              targets.to(self.device))

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        return self.normalize(torch.from_numpy(images).to(self.device))

    @torch.no_grad()
    def accuracy(self) -> float:
        """The share of ``eval_images`` held-out drawings (steps below 0: never trained on) whose classes are
        exactly those scored above 0.5."""
        self.model.eval()
        right, n, step = 0, 0, -1
        while n < self.config.eval_images:
            images, targets = batch(self.config.seed, step, min(256, self.config.eval_images - n))
            found = self.model(self._pixels(images)).sigmoid().cpu() > 0.5
            right += int((found == targets.bool()).all(dim=1).sum())
            n, step = n + len(targets), step - 1
        return right / n

    def export(self) -> None:
        out = Path(self.config.out)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in self.model.backbone.state_dict().items()}
        safetensors.torch.save_file(weights, out / WEIGHTS)
        measured = {"accuracy": self.accuracy(), "steps": self.step,
                    "eval": f"{self.config.eval_images} held-out drawings of 1-3 objects: the share whose 20 class "
                            f"scores are all right (above 0.5 exactly for the classes shown)"}
        self.log.plot(out / "loss.png", title="mini-world backbone")
        samples = np.stack([draw_pretraining([k], 10_000 + k) for k in range(len(CLASSES))])
        image_grid(samples, CLASSES, out / "samples.png", columns=5)
        write_card(out / "README.md", "The mini world's backbone", __doc__, self.config.model_dump(), self.log,
                   measured)
        (out / "training.json").write_text(json.dumps({"quality": measured, "config": self.config.model_dump()},
                                                      indent=2) + "\n")
