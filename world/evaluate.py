"""What the mini world's models are measured by (the targets of their model cards).

- ``oracle_quality``: the oracle on the drawn benchmark: objects found, mask IoU.
- ``generator_quality``: the generator judged by the oracle: how often it draws the prompted
  classes, how often something else, and where its cross-attention lies (DAAM's heat inside
  the objects it drew against the background).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from factory.core.vocab import SHAPES
from factory.detection.detections import Detector
from factory.diffusion.daam import CrossAttentionRecorder, daam_scores
from factory.diffusion.pipelines import generate
from factory.diffusion.tokens import class_token_positions
from world.draw import SIZE, draw
from world.utils import prompt_of


@dataclass
class OracleQuality:
    objects: int
    found: float           # fraction of objects whose class mask (score >= threshold) has IoU >= 0.5
    mean_iou: float        # mean IoU of the class mask over all objects (a missed object counts 0)
    false_classes: float   # fraction of images where a class that is not drawn is detected
    offset: tuple[float, float] = (0.0, 0.0)  # mean (dy, dx) px from a drawn object's centroid to its mask's

    def as_dict(self) -> dict:
        return {"objects": self.objects, "found": round(self.found, 4), "mean_iou": round(self.mean_iou, 4),
                "false_classes": round(self.false_classes, 4)}


def oracle_quality(detector: Detector, items: list[tuple[tuple[str, ...], int]], score_threshold: float = 0.5,
                   batch: int = 32) -> OracleQuality:
    """How well `detector` labels drawn benchmark images: per object, the merged mask of every
    instance of its class at or above `score_threshold` (what the labeler keeps), against the exact mask."""
    ious, offsets, false = [], [], 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        drawn = [draw(classes, seed, "benchmark") for classes, seed in chunk]
        asked = [[SHAPES.lookup(name) for name in classes] for classes, _ in chunk]
        for (classes, _), (_, masks), found in zip(chunk, drawn, detector(np.stack([d[0] for d in drawn]), asked)):
            keep = found.scores >= score_threshold
            indices = {SHAPES.lookup(name).index for name in classes}
            false += bool(set(found.classes[keep].tolist()) - indices)
            for name, mask in zip(classes, masks):
                mine = keep & (found.classes == SHAPES.lookup(name).index)
                predicted = (found.masks[mine] >= 0.5).any(axis=0) if mine.any() else np.zeros_like(mask)
                union = (predicted | mask).sum()
                ious.append((predicted & mask).sum() / union if union else 0.0)
                if predicted.any():
                    offsets.append(np.mean(np.nonzero(predicted), axis=1) - np.mean(np.nonzero(mask), axis=1))
    ious_a = np.array(ious)
    return OracleQuality(objects=len(ious), found=float((ious_a >= 0.5).mean()), mean_iou=float(ious_a.mean()),
                         false_classes=false / len(items),
                         offset=tuple(np.mean(offsets, axis=0).tolist()) if offsets else (0.0, 0.0))


@dataclass
class GeneratorQuality:
    one: float         # one-object images in which the oracle finds the prompted class
    two: float         # two-object images in which it finds both prompted classes
    unprompted: float  # images in which it finds a class that was not prompted
    images: int
    steps: int
    guidance_scale: float
    # DAAM (Tang et al., 2023) word heat in [0, 1] of each prompted class the oracle found: its mean
    # over the class's own pixels, and over the background (pixels of no found object).
    daam_inside: float = float("nan")
    daam_outside: float = float("nan")

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def quality_prompts(count: int) -> list[tuple[str, ...]]:
    """`count` one-object prompts (every class in turn), then `count` two-object prompts (pairs
    in a fixed shuffled order, each in both orders)."""
    rng = np.random.default_rng(13)
    pairs = list(itertools.combinations(SHAPES.names, 2))
    pairs = [pairs[i] if k % 2 else pairs[i][::-1] for k, i in enumerate(rng.permutation(len(pairs)))]
    return [(SHAPES.names[k % len(SHAPES)],) for k in range(count)] + [pairs[k % len(pairs)] for k in range(count)]


def generator_quality(pipe: StableDiffusionPipeline, detector: Detector, count: int = 100, *, steps: int = 25,
                      guidance_scale: float = 4.0, score_threshold: float = 0.5, batch: int = 20,
                      seed: int = 0) -> GeneratorQuality:
    """`count` one-object and `count` two-object images, each class set judged by the oracle, and
    the DAAM heat of every prompted class the oracle found, inside its mask and on the background."""
    classes = quality_prompts(count)
    hits, unprompted, inside, outside = [], 0, [], []
    for start in tqdm(range(0, len(classes), batch), desc="generator quality", unit="batch", leave=False):
        chunk = classes[start:start + batch]
        prompts = [prompt_of(c) for c in chunk]
        with CrossAttentionRecorder(pipe) as recorder:
            images = generate(pipe, prompts, [seed + start + k for k in range(len(chunk))],
                              steps=steps, guidance_scale=guidance_scale, height=SIZE, width=SIZE)
        words = [[SHAPES.lookup(name).natural for name in c] for c in chunk]
        heat = daam_scores(recorder.heatmaps([class_token_positions(pipe.tokenizer, p, w)
                                              for p, w in zip(prompts, words)]), size=images.shape[1:3])
        found_all = detector(images, [[SHAPES.lookup(name) for name in c] for c in chunk])
        for prompted, found, maps in zip(chunk, found_all, heat):
            keep = found.scores >= score_threshold
            seen = {SHAPES.by_index(int(i)).name for i in found.classes[keep] if i}
            hits.append(set(prompted) <= seen)
            unprompted += bool(seen - set(prompted))
            objects = {name: (found.masks[keep & (found.classes == SHAPES.lookup(name).index)] >= 0.5).any(axis=0)
                       for name in prompted if name in seen}
            if objects:
                background = ~np.logical_or.reduce(list(objects.values()))
                for o, name in enumerate(prompted):
                    if name in objects and objects[name].any() and background.any():
                        inside.append(maps[o][objects[name]].mean())
                        outside.append(maps[o][background].mean())
    return GeneratorQuality(one=float(np.mean(hits[:count])), two=float(np.mean(hits[count:])),
                            unprompted=unprompted / len(classes), images=len(classes), steps=steps,
                            guidance_scale=guidance_scale, daam_inside=_mean(inside), daam_outside=_mean(outside))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
