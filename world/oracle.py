"""Train the mini world's oracle: a slim Mask R-CNN that knows all 20 ``shapes`` classes.

It plays the COCO-pretrained Mask R-CNN of the papers: trained on drawings of every class
(both families, as COCO's detector has seen real photographs), with blur, noise and colour
jitter so that it also reads the generator's softer images. Its labels are the vocabulary's
indices (``labeler.model: maskrcnn_small``). Training state lives in ``work`` and a rerun
continues from it; ``out`` receives ``model.safetensors`` (what recipes name as
``labeler.weights``), a loss plot, a sample of its detections and a model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision.ops import masks_to_boxes

from factory.core.conventions import SMALL
from factory.core.devices import pick_device
from factory.core.vocab import SHAPES
from factory.detection.detections import Detector
from factory.detection.maskrcnn import MaskRCNNDetector, label_count, small_maskrcnn
from world.benchmark import benchmark_draws
from world.draw import SIZE, draw
from world.evaluate import OracleQuality, oracle_quality
from world.utils import SteppedTraining, class_draws, image_grid, write_card

KIND = "world-oracle-training/1"
WEIGHTS = "model.safetensors"


class OracleTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("models/shapes-oracle", description="the folder of model.safetensors and its card")
    work: str = Field("runs/shapes-oracle", description="the resumable training state")
    seed: int = Field(0, description="seeds the initial weights and every drawn batch")
    steps: int = Field(1500, ge=0, description="training steps (the rate drops 10x for the last quarter)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.02, gt=0, description="SGD learning rate (momentum 0.9), after 100 warm-up steps")
    two_objects: float = Field(0.5, ge=0, le=1, description="fraction of two-object drawings")
    save_every: int = Field(250, ge=1, description="steps between checkpoints (and weight exports)")
    eval_images: int = Field(200, ge=1, description="drawn benchmark images the card's quality is measured on")


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise, brightness and colour jitter: what a generator's images differ in."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        from torchvision.transforms.functional import gaussian_blur
        pixels = gaussian_blur(pixels[None], [5, 5], [sigma, sigma])[0]
    pixels = pixels * rng.uniform(0.85, 1.15) + torch.from_numpy(rng.uniform(-12, 12, (3, 1, 1))).float()
    pixels = pixels + torch.from_numpy(rng.normal(0, rng.uniform(0, 8), pixels.shape)).float()
    return pixels.clamp(0, 255) / 255.0


def training_batch(seed: int, step: int, size: int, two_objects: float) -> tuple[list[torch.Tensor], list[dict]]:
    """Images (3, 64, 64) in [0, 1] and Mask R-CNN targets; half of each family."""
    rng = np.random.default_rng([seed, step, 1])
    images, targets = [], []
    for k, (classes, draw_seed) in enumerate(class_draws(seed, step, size, two_objects)):
        image, masks = draw(classes, draw_seed, "training" if k % 2 else "benchmark")
        masks_t = torch.from_numpy(masks).to(torch.uint8)
        images.append(augment(image, rng))
        targets.append({"boxes": masks_to_boxes(masks_t).float(), "masks": masks_t,
                        "labels": torch.tensor([SHAPES.lookup(n).index for n in classes], dtype=torch.int64)})
    return images, targets


def load_oracle(weights: str, score_threshold: float = 0.5, device: torch.device | None = None) -> MaskRCNNDetector:
    """The oracle as the build's labeler loads it (``labeler.model: maskrcnn_small``)."""
    return MaskRCNNDetector(SMALL, SHAPES, SIZE, device or torch.device("cpu"), weights=weights,
                            score_threshold=score_threshold)


# Changing these makes a different run: its training state is not resumed.
_RUN_IDENTITY = ("seed", "batch_size", "lr", "two_objects")


class OracleTraining(SteppedTraining):
    name, kind, identity, clip = "oracle", KIND, _RUN_IDENTITY, 10.0

    def __init__(self, config: OracleTrainConfig):
        self.config = config
        self.device = pick_device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = small_maskrcnn(label_count(SHAPES), SIZE).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
        self.resume()

    def loss(self, step: int) -> torch.Tensor:
        images, targets = training_batch(self.config.seed, step, self.config.batch_size, self.config.two_objects)
        images = [image.to(self.device) for image in images]
        targets = [{k: v.to(self.device) for k, v in target.items()} for target in targets]
        return sum(self.model(images, targets).values())

    def export(self) -> OracleQuality:
        out = Path(self.config.out)
        out.mkdir(parents=True, exist_ok=True)
        # float16 halves what the repository carries; loading copies into the float32 model.
        weights = {k: (v.half() if v.is_floating_point() else v).detach().contiguous()
                   for k, v in self.model.state_dict().items()}
        safetensors.torch.save_file(weights, out / WEIGHTS)
        oracle = load_oracle(str(out / WEIGHTS), device=self.device)
        quality = oracle_quality(oracle, benchmark_draws(self.config.eval_images, split="val"))
        self.log.plot(out / "loss.png", title="mini-world oracle")
        preview(oracle, out / "detections.png")
        measured = {**quality.as_dict(), "steps": self.step, "eval": f"{self.config.eval_images} drawn benchmark "
                    "images (val), score threshold 0.5, found = IoU >= 0.5"}
        write_card(out / "README.md", "The mini world's oracle", __doc__, self.config.model_dump(), self.log, measured)
        (out / "training.json").write_text(json.dumps({"quality": measured, "config": self.config.model_dump()},
                                                      indent=2) + "\n")
        return quality


def preview(detector: Detector, path: Path, n: int = 10) -> None:
    """Drawn benchmark images beside the oracle's masks (score >= 0.5), captioned by what it found."""
    items = benchmark_draws(n, split="val")
    images = np.stack([draw(classes, seed, "benchmark")[0] for classes, seed in items])
    shown, captions = [], []
    for image, found in zip(images, detector(images, [[SHAPES.lookup(name) for name in c] for c, _ in items])):
        keep = found.scores >= 0.5
        overlay = image.astype(np.float32)
        for mask in found.masks[keep]:
            overlay[mask >= 0.5] = 0.4 * overlay[mask >= 0.5] + 0.6 * np.array([255, 0, 255])
        shown += [image, overlay.astype(np.uint8)]
        names = [SHAPES.by_index(int(c)).natural for c in found.classes[keep]]
        captions += ["drawn", ", ".join(names) or "nothing"]
    image_grid(np.stack(shown), captions, path, columns=4)
