"""Image cells of the dataset: PNG/JPEG bytes to arrays and back.

Images are RGB PNG or JPEG; label maps are palette PNGs whose pixel indices are the labels
(as VOC's SegmentationClass: 0 background, class index, 255 ignore), drawn in VOC's colours;
class masks are 1-bit PNGs. A cell is a Hugging Face `Image` struct {bytes, path}.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map: label PNGs open in any viewer with VOC's colours."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


PALETTE = voc_palette()  # index 255, VOC's "void", is already cream (224, 224, 192)
COLORS = np.array(PALETTE, np.uint8).reshape(256, 3)  # label index -> RGB


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_label(label: np.ndarray) -> bytes:
    """Palette PNG whose pixel indices are the labels (as VOC's SegmentationClass)."""
    image = Image.fromarray(label, mode="P")
    image.putpalette(PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buffer, format="PNG")  # 1-bit PNG
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A PNG's pixels as stored: a palette PNG gives its indices, never colours."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def decode_image(struct: dict) -> np.ndarray:
    """An `image` cell -> uint8 RGB (H, W, 3)."""
    with Image.open(io.BytesIO(struct["bytes"])) as image:
        return np.asarray(image.convert("RGB"))


def decode_label(struct: dict) -> np.ndarray:
    """A `label` cell (palette PNG) -> its pixel indices, uint8 (H, W)."""
    return decode_png(struct["bytes"])


def decode_masks(structs: Sequence[dict]) -> np.ndarray:
    """A `masks` cell (1-bit PNG per class) -> bool (K, H, W)."""
    masks = [decode_png(s["bytes"]).astype(bool) for s in structs]
    return np.stack(masks) if masks else np.zeros((0, 0, 0), bool)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as stored (e.g. from pyarrow's to_pylist) -> the same row with decoded images."""
    row = dict(row)
    if "image" in row:
        row["image"] = decode_image(row["image"])
    if "label" in row:
        row["label"] = decode_label(row["label"])
    if "masks" in row:
        row["masks"] = decode_masks(row["masks"])
    return row


def objects(values: Sequence) -> np.ndarray:
    """An object array of per-row values (arrays of different shapes, lists, strings).

    Filled item by item: numpy would broadcast a list of equal-shaped arrays into one array.
    Ray Data turns such a column into a list column.
    """
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One array when every row has the same shape, else an object array of per-row arrays."""
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else objects(arrays)


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch of stored rows -> decoded image columns."""
    batch = dict(batch)
    if "image" in batch:
        batch["image"] = _column([decode_image(s) for s in batch["image"]])
    if "label" in batch:
        batch["label"] = _column([decode_label(s) for s in batch["label"]])
    if "masks" in batch:  # K differs between rows: always per-row arrays
        batch["masks"] = objects([decode_masks(list(structs)) for structs in batch["masks"]])
    return batch
