import io

import numpy as np
import pytest
from PIL import Image

from factory.core.vocab import VOC
from factory.dataset.codec import PALETTE, encode_image, encode_label
from factory.dataset.preview import TILE, overlay, preview_png, render_preview

COLOURS = np.array(PALETTE, np.uint8).reshape(256, 3)
SIZE = 64


def hand_made(seed, classes, found, scores, label_values, image_format="png"):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    label = np.zeros((SIZE, SIZE), np.uint8)
    for k, value in enumerate(label_values):
        label[8 + 20 * k:24 + 20 * k, 10:40] = value
    label[-4:, -4:] = 255
    row = {"image": {"bytes": encode_image(image, image_format), "path": None},
           "label": {"bytes": encode_label(label), "path": None},
           "classes": classes, "class_indices": [VOC.lookup(name).index for name in classes],
           "found": found, "scores": scores,
           "prompt": f"a photograph of a {' and a '.join(classes)}"}
    return row, image, label


@pytest.fixture
def rows():
    return [hand_made(0, ["dog"], [True], [0.91], [12]),
            hand_made(1, ["cat", "dog"], [True, False], [0.7, 0.0], [8]),
            hand_made(2, ["pottedplant"], [True], [0.55], [16], image_format="jpeg")]


def test_render_preview_size_and_mode(rows):
    sheet = render_preview([r for r, _, _ in rows])
    assert sheet.mode == "RGB"
    columns = 4
    assert sheet.size == (columns * (2 * TILE + 8), TILE + 34)
    # Five rows of samples need two rows of cells.
    five = render_preview([rows[0][0]] * 5)
    assert five.size == (columns * (2 * TILE + 8), 2 * (TILE + 34))
    assert render_preview([]).size == (columns * (2 * TILE + 8), TILE + 34)


def test_render_preview_tiles(rows):
    sheet = np.array(render_preview([r for r, _, _ in rows]))
    scale = TILE // SIZE
    (row0, image0, label0) = rows[0]
    # Left tile: the image scaled up (nearest); right tile: the overlay.
    left = sheet[:TILE, :TILE]
    assert np.array_equal(left[::scale, ::scale], image0)
    right = sheet[:TILE, TILE:2 * TILE]
    assert np.array_equal(right[::scale, ::scale], overlay(image0, label0))
    # The second sample's cell starts after the first cell and its gap.
    x = 2 * TILE + 8
    assert np.array_equal(sheet[:TILE, x:x + TILE][::scale, ::scale], rows[1][1])
    # The fourth cell is empty: white.
    x = 3 * (2 * TILE + 8)
    assert (sheet[:, x:] == 255).all()
    # A caption was drawn under the tiles (not all white).
    assert (sheet[TILE:, :2 * TILE] < 128).any()


def test_preview_png(rows):
    data = preview_png([r for r, _, _ in rows])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == render_preview([r for r, _, _ in rows]).size


def test_overlay_keeps_background_and_colours_classes():
    _, image, label = hand_made(0, ["dog", "cat"], [True, True], [0.9, 0.8], [12, 8])
    out = overlay(image, label, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    background = label == 0
    assert background.any()
    assert np.array_equal(out[background], image[background])
    for value in (12, 8, 255):
        where = label == value
        assert where.any()
        expected = np.round(0.5 * image[where].astype(np.float32) + 0.5 * COLOURS[value]).astype(np.uint8)
        assert np.abs(out[where].astype(int) - expected).max() <= 1
        assert not np.array_equal(out[where], image[where])


def test_overlay_full_alpha_is_the_palette():
    image = np.full((4, 4, 3), 100, np.uint8)
    label = np.array([[0, 12, 8, 255]] * 4, np.uint8)
    out = overlay(image, label, alpha=1.0)
    assert (out[:, 0] == 100).all()
    assert tuple(out[0, 1]) == (64, 0, 128)  # dog
    assert tuple(out[0, 2]) == (64, 0, 0)  # cat
    assert tuple(out[0, 3]) == (224, 224, 192)  # ignore


def test_a_long_legend_wraps_inside_its_cell():
    names = ["pottedplant", "diningtable", "motorbike", "aeroplane", "tvmonitor", "sheep"]
    row, _, _ = hand_made(3, names, [True] * 5 + [False], [0.91, 0.82, 0.73, 0.64, 0.55, 0.0], [16, 11])
    sheet = np.array(render_preview([row]))
    cell_w = 2 * TILE + 8
    assert sheet.shape[0] > TILE + 34  # more legend lines than one
    assert (sheet[TILE:, cell_w:] == 255).all()  # nothing spills into the next (empty) cell
    legend = sheet[TILE + 17:, :2 * TILE]
    for k in range(1, 3):  # every line of the legend holds something
        band = legend[(k - 1) * 14:k * 14]
        assert (band != 255).any(), k
