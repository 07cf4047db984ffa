"""Preview: a grid of samples, each image beside itself with its label map overlaid."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from factory.dataset.codec import COLORS, decode_png

TILE = 192  # pixels per image in the grid; small generated images are scaled up
LEGEND_LINE = 14  # pixels per line of a caption's class legend


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Class colours over the image; background (0) left as it is, ignore (255) in cream."""
    colored = COLORS[label]
    painted = label > 0
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colored[painted]
    return out.round().astype(np.uint8)


def _tile(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((TILE, TILE), Image.NEAREST)


def _legend(row: dict, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[list[tuple[int, int, str, bool]]]:
    """The row's classes as legend lines that fit under its two tiles: per entry its x offset,
    class index, text (name and score, or 'missing') and whether it was found."""
    lines, cursor = [[]], 2
    for name, index, found, score in zip(row["classes"], row["class_indices"], row["found"], row["scores"]):
        text = f"{name} {score:.2f}" if found else f"{name} missing"
        width = 13 + int(draw.textlength(text, font=font))  # swatch, gap, text
        if lines[-1] and cursor + width > 2 * TILE:  # the next class goes on a line of its own
            lines.append([])
            cursor = 2
        lines[-1].append((cursor, index, text, found))
        cursor += width + 10
    return lines


def render_preview(rows: list[dict]) -> Image.Image:
    """rows: dataset rows; each gets its image, the image with its label map, and a caption
    of the prompt and each class (colour swatch, name, score or 'missing'), wrapped to the cell."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legends = [_legend(row, draw, font) for row in rows]
    caption = 20 + LEGEND_LINE * max((len(legend) for legend in legends), default=1)
    columns = 4
    cell_w, cell_h = 2 * TILE + 8, TILE + caption
    rows_n = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows_n * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (row, legend) in enumerate(zip(rows, legends)):
        x, y = (n % columns) * cell_w, (n // columns) * cell_h
        image = np.array(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        label = decode_png(row["label"]["bytes"])
        sheet.paste(_tile(image), (x, y))
        sheet.paste(_tile(overlay(image, label)), (x + TILE, y))
        draw.text((x + 2, y + TILE + 2), row["prompt"][:60], fill="black", font=font)
        for k, line in enumerate(legend):
            top = y + TILE + 17 + k * LEGEND_LINE
            for offset, index, text, found in line:  # a swatch in the class's overlay colour, then the text
                draw.rectangle((x + offset, top + 2, x + offset + 9, top + 11), fill=tuple(COLORS[index]))
                draw.text((x + offset + 13, top), text, fill="black" if found else "firebrick", font=font)
    return sheet


def preview_png(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    render_preview(rows).save(buffer, format="PNG")
    return buffer.getvalue()
