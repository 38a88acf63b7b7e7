"""Knowing when not to answer: is an input the kind of image the cell model was trained on?

The model was trained on NIH crops: one segmented red cell on a black background, filling most of the frame, in
Giemsa colours. Anything else gets a confident but meaningless answer (a field photo: "Parasitized 0.996"; purple
noise: P >= 0.965). :func:`check` measures a few signals of the decoded image and names the first that is out of the
range of the training cells:

- ``not a single cell``: a large image (a field photo), or several separate objects, or no object on black;
- ``background not black``: the border of the image is not black (a loose crop: ``--segment`` puts it on black);
- ``cell too small in frame`` / ``cell fills the frame``: the object's share of the image is outside the training
  cells' range;
- ``grayscale``: no colour (stain colour is what the model reads);
- ``unusual colours``: the object's mean colour is far from the training cells' (Mahalanobis distance in RGB);
- ``unusual texture``: the object is far rougher inside than stained cells (neighbouring-pixel differences).

The limits come from the training cells themselves (:data:`REFERENCE`, made by ``python benchmarks/ood_bank.py
--fit``: the 0.1st and 99.9th percentiles of NIH training patients' cells, widened by a margin) and are checked
against a bank of out-of-distribution inputs in the same script. NumPy and SciPy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from malaria_cells.segment import dilate, erode

REFERENCE = Path(__file__).resolve().parent / "ood_reference.json"
MEASURE_PX = 40  # the image is measured at about this size (longer side)
BLACK = 20  # 0-255: a pixel whose brightest channel is at most this is background (NIH crops: exactly 0)


@dataclass(frozen=True)
class Signals:
    """What :func:`check` measures of one image."""

    width: int
    height: int
    border: float  # median brightest channel of the outer 2 px (0 for NIH crops)
    blobs: int  # separate objects covering >= 2 % of the image each
    fill: float  # the largest object's share of the image
    chroma: float  # mean (max - min channel) over the object's pixels: 0 for grey
    colour: tuple[float, float, float]  # mean R, G, B over the object's pixels
    texture: float = 0.0  # mean absolute difference between neighbouring pixels inside the object (0-255)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**self.__dict__, "colour": list(self.colour)}


def signals(rgb: np.ndarray) -> Signals:
    """Measure an image (as decoded, before letterboxing).

    Args:
        rgb: uint8 (H, W, 3).

    Returns:
        The signals.
    """
    h, w = rgb.shape[:2]
    # Measured at ~64 px on the longer side: the signals are shares, means and a texture, not details, and this is
    # on every prediction's path (0.5 -> ~0.15 ms a cell at 40 px).
    step = max(1, round(max(h, w) / MEASURE_PX))
    small = rgb[::step, ::step]
    r, g8, b = small[..., 0], small[..., 1], small[..., 2]
    # channel-wise maxima of three 2-D planes: ~10x faster than small.max(axis=2) on a short last axis
    bright = np.maximum(np.maximum(r, g8), b)
    ring = np.concatenate([bright[:2].ravel(), bright[-2:].ravel(), bright[:, :2].ravel(), bright[:, -2:].ravel()])
    obj = dilate(erode((bright > BLACK)[None]))[0]  # opening with a 3 x 3 cross: drops 1-px specks
    labels, n = ndi.label(obj)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    area = obj.size
    big = sizes >= 0.02 * area
    texture = 0.0
    if n:
        keep = labels == (int(np.argmax(sizes)) + 1)
        px = small[keep]
        # Inside the object (2 px in from its edge, so the cell's rim against black does not count): stained cells
        # are smooth; photos of other things and noise are not.
        inner = erode(erode(keep[None]))[0]
        g = small[..., 1].astype(np.float32)
        dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
        both = inner[:, 1:] & inner[:, :-1]
        both_y = inner[1:] & inner[:-1]
        if both.any() and both_y.any():
            texture = float((dx[both].mean() + dy[both_y].mean()) / 2)
    else:
        px = small.reshape(-1, 3)
    if len(px):
        c0, c1, c2 = (px[:, k].astype(np.int16) for k in range(3))
        chroma = float((np.maximum(np.maximum(c0, c1), c2) - np.minimum(np.minimum(c0, c1), c2)).mean())
        colour = (float(c0.mean()), float(c1.mean()), float(c2.mean()))
    else:
        chroma, colour = 0.0, (0.0, 0.0, 0.0)
    return Signals(
        width=w,
        height=h,
        border=float(np.median(ring)),
        blobs=int(big.sum()),
        fill=float(sizes.max() / area) if n else 0.0,
        chroma=chroma,
        colour=colour,  # type: ignore[arg-type]
        texture=texture,
    )


@lru_cache(maxsize=4)
def load_reference(path: str | None = None) -> dict[str, Any]:
    """The limits fitted on the training cells (:data:`REFERENCE` unless ``path``)."""
    return json.loads(Path(path or REFERENCE).read_text(encoding="utf-8"))


def check(s: Signals, reference: dict[str, Any] | None = None) -> str:
    """The first reason the image is unlike the training cells, or ``""`` when it looks like one.

    Args:
        s: the image's signals.
        reference: the limits (default: :func:`load_reference`).

    Returns:
        A short reason ("not a single cell", "background not black", ...) or "".
    """
    ref = reference or load_reference()
    if max(s.width, s.height) > ref["max_side"]:
        return "not a single cell"
    if s.border > ref["max_border"]:
        return "background not black"
    if s.blobs != 1:
        return "not a single cell"
    if s.fill < ref["min_fill"]:
        return "cell too small in frame"
    if s.fill > ref["max_fill"]:
        return "cell fills the frame"
    if s.chroma < ref["min_chroma"]:
        return "grayscale"
    mean, inv = np.asarray(ref["colour_mean"]), np.asarray(ref["colour_inv_cov"])
    d = np.asarray(s.colour) - mean
    if float(np.sqrt(d @ inv @ d)) > ref["max_colour_distance"]:
        return "unusual colours"
    if s.texture > ref.get("max_texture", np.inf):
        return "unusual texture"
    return ""


def colour_distance(s: Signals, reference: dict[str, Any] | None = None) -> float:
    """Mahalanobis distance of the object's mean colour from the training cells'."""
    ref = reference or load_reference()
    d = np.asarray(s.colour) - np.asarray(ref["colour_mean"])
    return float(np.sqrt(d @ np.asarray(ref["colour_inv_cov"]) @ d))
