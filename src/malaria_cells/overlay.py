"""Pictures a microscopist checks: a field photo with its cells outlined by label, and a contact sheet of the cells
called infected, most confident first. Pillow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colours: infected red (thick, with its probability), uninfected green (thin), cut by the border grey, unknown
# (no usable mask) yellow. Chosen to stay apart on pale and on saturated Giemsa stains.
COLOURS = {
    "Parasitized": (230, 20, 20),
    "Uninfected": (20, 170, 60),
    "border": (140, 140, 140),
    "Unknown": (240, 190, 0),
    "Other": (90, 60, 200),  # white cell, platelet clump, debris: not counted
    "missed": (0, 90, 255),  # evaluation: an annotated cell no detection matched
    "false": (255, 0, 255),  # evaluation: a detection no annotated cell matched
}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def draw_overlay(
    rgb: np.ndarray | Image.Image,
    cells: Sequence[Any],
    *,
    extra: Sequence[tuple[tuple[float, float, float, float], str]] = (),
    title: str | None = None,
) -> Image.Image:
    """The photo with every cell's box coloured by its label.

    Args:
        rgb: the photo.
        cells: objects with ``x, y, w, h, label, on_border, prob_parasitized`` (``smear.SmearCell``).
        extra: more boxes ``((x, y, w, h), colour key)`` (missed and false detections in an evaluation).
        title: a line written in the top-left corner (counts, parasitemia).

    Returns:
        An RGB image the size of the photo.
    """
    img = (rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb))).convert("RGB")
    draw = ImageDraw.Draw(img)
    scale = max(1.0, max(img.size) / 1280)  # line widths and text grow with the photo
    font = _font(int(16 * scale))
    for c in cells:
        key = "border" if c.on_border else c.label
        colour = COLOURS.get(key, COLOURS["Unknown"])
        width = int((4 if c.label == "Parasitized" else 2) * scale)
        draw.rectangle([c.x, c.y, c.x + c.w, c.y + c.h], outline=colour, width=width)
        if c.label == "Parasitized" and not np.isnan(c.prob_parasitized):
            text = f"{c.prob_parasitized:.2f}"
            tx, ty = c.x, max(0, c.y - int(18 * scale))
            box = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(box, fill=(255, 255, 255))
            draw.text((tx, ty), text, fill=colour, font=font)
    for (x, y, w, h), key in extra:
        draw.rectangle([x, y, x + w, y + h], outline=COLOURS[key], width=int(3 * scale))
    if title:
        box = draw.textbbox((6, 6), title, font=_font(int(20 * scale)))
        draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(255, 255, 255))
        draw.text((6, 6), title, fill=(0, 0, 0), font=_font(int(20 * scale)))
    return img


def contact_sheet(
    crops: Sequence[np.ndarray], captions: Sequence[str], *, columns: int = 8, tile: int = 96, title: str = ""
) -> Image.Image:
    """Cells side by side with a caption under each, as a microscopist reviews the calls.

    Args:
        crops: uint8 (S, S, 3) images.
        captions: one short line per crop (photo, cell, probability).
        columns: tiles per row.
        tile: side of each tile in px.
        title: a heading line.

    Returns:
        The sheet (a white image with a note when there are no crops).
    """
    font = _font(11)
    head = 24 if title else 0
    rows = max(1, -(-len(crops) // columns))
    sheet = Image.new("RGB", (columns * tile, head + rows * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0), font=_font(14))
    if not len(crops):
        draw.text((8, head + 8), "no cells", fill=(0, 0, 0), font=font)
    for i, (crop, caption) in enumerate(zip(crops, captions, strict=True)):
        r, c = divmod(i, columns)
        x, y = c * tile, head + r * (tile + 16)
        sheet.paste(Image.fromarray(np.asarray(crop)).resize((tile - 4, tile - 4), Image.NEAREST), (x + 2, y + 2))
        draw.text((x + 2, y + tile), caption[:18], fill=(0, 0, 0), font=font)
    return sheet
