"""The mini world: drawn 64x64 images of the ``shapes`` vocabulary, with exact masks.

Each class is a colour and a shape ("red disc", "blue cross"; ``factory.core.vocab.SHAPES``),
one or two objects per image on a textured, unsaturated background, so that a small
generator and detector can learn it on a CPU and the whole mission can be measured on it.
Two families of drawings share the classes and differ in everything else:

- ``training``: what the generator and the oracle learn from. One object near the centre;
  two objects in the left and right halves, in random order.
- ``benchmark``: the world's "real" images, held out: one object anywhere; two objects in
  the top and bottom halves; other background textures.

Objects are large and their halves never meet, so a pixel belongs to at most one class and
a mask is exactly the pixels painted with its object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from factory.core.vocab import SHAPES

SIZE = 64
Family = Literal["training", "benchmark"]

COLOURS = {"red": (210, 45, 45), "green": (45, 170, 70), "blue": (50, 90, 215),
           "yellow": (225, 200, 40), "white": (235, 235, 235)}
BACKGROUND_LEVELS = (60, 160)  # grey levels of the background, well below white objects


def form_mask(form: str, centre: tuple[float, float], radius: float, size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the pixels whose centres fall inside the form."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - centre[0], y - centre[1]
    if form == "disc":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if form == "square":  # smaller than the disc of its radius, so the two differ at every edge
        return (np.abs(dx) <= 0.7 * radius) & (np.abs(dy) <= 0.7 * radius)
    if form == "triangle":  # apex up, base below the centre
        top, base = -radius, 0.8 * radius
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= (dy - top) * radius / (base - top))
    if form == "cross":
        arm = 0.3 * radius
        return ((np.abs(dx) <= radius) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    raise ValueError(f"unknown form {form!r}")


def background(rng: np.random.Generator, family: Family, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float: an unsaturated texture, stripes (training) or blotches (benchmark)."""
    low, high = BACKGROUND_LEVELS
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if family == "training":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
        pattern = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    else:
        coarse = rng.normal(size=(5, 5))
        pattern = np.kron(coarse, np.ones((size // 4, size // 4)))[:size, :size] / 2
    level = rng.uniform(low + 20, high - 20)
    grey = np.clip(level + 15 * pattern + rng.normal(0, 4, (size, size)), low, high)
    tint = rng.uniform(-8, 8, 3)  # a slight colour cast, never a class colour
    return np.clip(grey[..., None] + tint, low, high)


def _placements(n: int, rng: np.random.Generator, family: Family) -> list[tuple[tuple[float, float], float]]:
    """(centre, radius) per object."""
    if n == 1:
        radius = rng.uniform(14, 20) if family == "training" else rng.uniform(12, 20)
        if family == "training":
            centre = tuple(SIZE / 2 + rng.uniform(-4, 4, 2))
        else:
            centre = tuple(rng.uniform(radius, SIZE - radius, 2))
        return [(centre, radius)]
    # Two objects, one per half: centres at least 26 px apart, radii at most 12, so never touching.
    places = []
    for half in (0, 1):
        along, across = SIZE / 4 + half * SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-6, 6)
        centre = (along, across) if family == "training" else (across, along)
        places.append((centre, rng.uniform(9, 12)))
    return [places[i] for i in rng.permutation(2)]


def draw(classes: Sequence[str], seed: int, family: Family = "training") -> tuple[np.ndarray, np.ndarray]:
    """(64, 64, 3) uint8 image and (O, 64, 64) bool exact masks of one or two `classes`
    (canonical ``shapes`` names, in prompt order), seeded by `seed`."""
    if len(classes) not in (1, 2) or len(set(classes)) != len(classes):
        raise ValueError(f"the mini world draws one or two distinct classes, got {list(classes)}")
    rng = np.random.default_rng(seed)
    image = background(rng, family)
    masks = np.zeros((len(classes), SIZE, SIZE), bool)
    for k, (name, (centre, radius)) in enumerate(zip(classes, _placements(len(classes), rng, family))):
        colour, form = SHAPES.lookup(name).name.split("_")
        masks[k] = form_mask(form, centre, radius)
        shade = np.array(COLOURS[colour]) * rng.uniform(0.9, 1.05) + rng.normal(0, 5, (SIZE, SIZE, 3))
        image[masks[k]] = shade[masks[k]]
    return np.clip(image, 0, 255).round().astype(np.uint8), masks


def label_map(classes: Sequence[str], masks: np.ndarray) -> np.ndarray:
    """(64, 64) uint8: each pixel's ``shapes`` class index, 0 background."""
    out = np.zeros(masks.shape[1:], np.uint8)
    for name, mask in zip(classes, masks):
        out[mask] = SHAPES.lookup(name).index
    return out
