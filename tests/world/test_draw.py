"""The mini world's drawings (world/draw.py): seeded, exact masks, two families."""

from __future__ import annotations

import numpy as np
import pytest

from factory.core.vocab import SHAPE_COLOURS, SHAPE_FORMS, SHAPES
from world.draw import BACKGROUND_LEVELS, COLOURS, SIZE, draw, form_mask, label_map

ONE, TWO = ("blue_triangle",), ("red_disc", "white_cross")


def test_every_colour_of_the_vocabulary_is_drawn():
    assert set(COLOURS) == set(SHAPE_COLOURS)


@pytest.mark.parametrize("family", ["training", "benchmark"])
def test_drawings_are_seeded(family):
    image, masks = draw(TWO, 7, family)
    again, same = draw(TWO, 7, family)
    assert np.array_equal(image, again) and np.array_equal(masks, same)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and masks.shape == (2, SIZE, SIZE)
    assert not np.array_equal(draw(TWO, 8, family)[0], image)


@pytest.mark.parametrize("family", ["training", "benchmark"])
def test_masks_are_exactly_the_painted_objects(family):
    """Inside a mask, the object's colour; outside every mask, the unsaturated background."""
    for seed, name in enumerate(SHAPES.names):
        classes = (name,) if seed % 2 else (name, SHAPES.names[(seed + 5) % 20])
        image, masks = draw(classes, seed, family)
        assert masks.sum(axis=0).max() == 1  # objects never overlap
        for cls, mask in zip(classes, masks):
            assert mask.sum() >= 100  # large objects: boundaries are not most of a mask
            colour = np.array(COLOURS[cls.split("_")[0]])
            assert np.abs(image[mask].mean(axis=0) - colour).max() < 25
        rest = image[~masks.any(axis=0)].astype(int)
        assert rest.max() <= BACKGROUND_LEVELS[1] and (rest.max(axis=1) - rest.min(axis=1)).max() <= 20


def test_the_families_place_two_objects_in_other_halves():
    for seed in range(10):
        for family, axis in (("training", 0), ("benchmark", 1)):  # columns left/right, rows top/bottom
            _, masks = draw(TWO, seed, family)
            halves = [np.nonzero(m.any(axis=axis))[0] for m in masks]
            low, high = sorted(halves, key=lambda h: h.mean())
            assert low.max() < SIZE // 2 <= high.min(), (family, seed)


def test_forms_are_distinct():
    masks = {form: form_mask(form, (32, 32), 16) for form in SHAPE_FORMS}
    for a in SHAPE_FORMS:
        for b in SHAPE_FORMS:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.7, (a, b, iou)


def test_label_map_holds_the_class_indices():
    _, masks = draw(TWO, 3)
    labels = label_map(TWO, masks)
    assert set(np.unique(labels)) == {0, SHAPES.lookup("red disc").index, SHAPES.lookup("white cross").index}
    assert np.array_equal(labels == SHAPES.lookup("red_disc").index, masks[0])


def test_one_or_two_distinct_classes_only():
    for classes in [(), ("red_disc",) * 2, ("red_disc", "blue_cross", "green_square")]:
        with pytest.raises(ValueError, match="one or two distinct classes"):
            draw(classes, 0)
    assert draw(ONE, 0)[1].shape == (1, SIZE, SIZE)
