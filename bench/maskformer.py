"""Segmenter cost: seconds per training iteration and evaluation images per second.

    python bench/maskformer.py                 # MaskFormer R101 (real size, random weights), CPU or GPU
    python bench/maskformer.py --preset tiny   # the tiny test model, seconds
    python bench/maskformer.py --preset world --crop 64 --size 64 --batch 16   # the mini world's model

Training: one optimizer step (forward, loss with Hungarian matching, backward, AdamW) on
`--batch` random crops of `--crop` pixels through segmenter.train.train_step, the step the Ray
Train workers run. Evaluation: segmenter.evaluate.predict on a VOC-sized image (500x375),
short side resized to `--size`, one image per forward pass as eval_zs3 does. Random weights
cost the same as trained ones. Each figure is the median of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from factory.core.conventions import IGNORE
from factory.core.devices import pick_device
from segmenter.config import SegmenterModelConfig, SegmenterTrainConfig
from segmenter.evaluate import predict
from segmenter.model import Segmenter
from segmenter.train import make_optimizer, train_step

VOC_LABELS = 21


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: allocator, kernels, matcher
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(rng: np.random.Generator, batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of noise; label maps with a few class rectangles, background and ignore."""
    images = torch.from_numpy(rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8))
    labels = np.zeros((batch, crop, crop), np.uint8)
    for label in labels:
        for index in rng.choice(np.arange(1, VOC_LABELS), size=3, replace=False):
            top, left = rng.integers(0, crop // 2, size=2)
            label[top:top + crop // 2, left:left + crop // 2] = index
        label[:2] = IGNORE
    return images, torch.from_numpy(labels)


def run(preset: str, batch: int, crop: int, size: int, repeats: int) -> dict:
    device = pick_device()
    torch.manual_seed(0)
    config = getattr(SegmenterModelConfig, preset)(VOC_LABELS)
    model = Segmenter(config).to(device)
    optimizer = make_optimizer(model, SegmenterTrainConfig(out="unused", data="unused"))  # default lr, decay
    rng = np.random.default_rng(0)
    images, labels = (t.to(device) for t in random_batch(rng, batch, crop))

    model.train()
    train_seconds = median_seconds(lambda: train_step(model, optimizer, images, labels, num_labels=VOC_LABELS), repeats)
    model.eval()
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    eval_seconds = median_seconds(lambda: predict(model, image, size, device), repeats)
    return {"preset": preset, "device": str(device), "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "crop": crop,
            "seconds_per_iteration": train_seconds, "eval_size": size, "eval_images_per_second": 1 / eval_seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["real", "world", "tiny"], default="real")
    parser.add_argument("--batch", type=int, default=2, help="training samples per step")
    parser.add_argument("--crop", type=int, default=224, help="training crop side (the paper's 224)")
    parser.add_argument("--size", type=int, default=512, help="evaluation short side")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args.preset, args.batch, args.crop, args.size, args.repeats)
    print(f"MaskFormer {result['preset']} ({result['parameters'] / 1e6:.1f}M weights) on {result['device']}, "
          f"{result['threads']} threads")
    print(f"  training    {result['seconds_per_iteration']:.2f} s per iteration "
          f"(batch {result['batch']}, crop {result['crop']})")
    print(f"  evaluation  {result['eval_images_per_second']:.2f} images/s (500x375, short side {result['eval_size']})")
    return result


if __name__ == "__main__":
    main()
