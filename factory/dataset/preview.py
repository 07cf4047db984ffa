"""Preview: a grid of samples, each image beside itself with its label map overlaid."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from factory.dataset.codec import COLORS, decode_png

TILE = 192  # pixels per image in the grid; small generated images are scaled up





def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Class colours over the image; background (0) left as it is, ignore (255) in cream."""
    colored = COLORS[label]
    painted = label > 0
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colored[painted]
    return out.round().astype(np.uint8)


def _tile(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((TILE, TILE), Image.NEAREST)


def render_preview(rows: list[dict]) -> Image.Image:
    """rows: dataset rows; each gets its image, the image with its label map, and a caption
    of the prompt and each class (colour swatch, name, score or 'missing')."""
    font = ImageFont.load_default()
    caption = 34
    columns = 4
    cell_w, cell_h = 2 * TILE + 8, TILE + caption
    rows_n = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows_n * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x, y = (n % columns) * cell_w, (n // columns) * cell_h
        image = np.array(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        label = decode_png(row["label"]["bytes"])
        sheet.paste(_tile(image), (x, y))
        sheet.paste(_tile(overlay(image, label)), (x + TILE, y))
        draw.text((x + 2, y + TILE + 2), row["prompt"][:60], fill="black", font=font)
        cursor = x + 2
        for name, index, found, score in zip(row["classes"], row["class_indices"], row["found"], row["scores"]):
            # a swatch in the class's overlay colour, then its name and score
            draw.rectangle((cursor, y + TILE + 19, cursor + 9, y + TILE + 28), fill=tuple(COLORS[index]))
            text = f"{name} {score:.2f}" if found else f"{name} missing"
            draw.text((cursor + 13, y + TILE + 17), text, fill="black" if found else "firebrick", font=font)
            cursor += 13 + int(draw.textlength(text, font=font)) + 10
    return sheet


def preview_png(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    render_preview(rows).save(buffer, format="PNG")
    return buffer.getvalue()
