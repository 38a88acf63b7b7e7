"""Stain normalization of a field photo's cells towards the training cells' colours (Reinhard et al., 2001).

Another lab's Giemsa differs from the NIH slides as a whole: paler, more magenta, another white balance. Within one
photo every red cell shares that shift, so the photo's cells, taken together, measure it: :func:`normalize_cells`
moves the mean and spread of their stained pixels in CIELAB to those of the NIH training cells
(:data:`REFERENCE`), channel by channel, and leaves the black background black. The cells keep their differences
from each other (a parasite stays darker than its neighbours); only the photo's overall stain moves.

It needs many cells (one photo's worth): a crop alone would be normalized onto itself, and a photo of only infected
cells would lose part of what makes them look infected. It is for models trained on NIH-coloured cells; a model
adapted to a lab (``adapt``) already reads that lab's colours and must not get it.

The reference is made by ``python benchmarks/stain_reference.py`` from NIH training patients' cells. NumPy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REFERENCE_FILE = Path(__file__).resolve().parent / "stain_reference.json"
BLACK = 20  # 0-255: a pixel whose brightest channel is at most this is background (as ood.BLACK)
MIN_PIXELS = 2000  # stained pixels below which a photo's statistics are too few to move it (~3 cells at 48 px)

# sRGB (D65) <-> CIE XYZ <-> CIELAB, as in scikit-image's rgb2lab / lab2rgb.
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], np.float64
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65, 2 degree observer


@dataclass(frozen=True)
class StainReference:
    """Mean and standard deviation of the stained pixels of the training cells, per CIELAB channel (L*, a*, b*)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cells: int = 0  # how many cells they came from
    source: str = ""  # what they came from


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB of uint8 sRGB pixels.

    Args:
        rgb: uint8 (..., 3).

    Returns:
        float64 (..., 3): L* in [0, 100], a* and b* roughly in [-128, 127].
    """
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """uint8 sRGB of CIELAB values (out-of-gamut colours are clipped).

    Args:
        lab: float (..., 3).

    Returns:
        uint8 (..., 3).
    """
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE
    c = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, None)
    c = np.where(c > 0.0031308, 1.055 * c ** (1 / 2.4) - 0.055, 12.92 * c)
    return np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)


def stained(crops: np.ndarray) -> np.ndarray:
    """bool (..., H, W): the pixels of letterboxed cells that are not black background."""
    return crops.max(axis=-1) > BLACK


def fit_reference(crops: np.ndarray, *, source: str = "") -> StainReference:
    """The reference of a set of letterboxed training cells.

    Args:
        crops: uint8 (N, S, S, 3), cells on black.
        source: a note on where they came from.

    Returns:
        The per-channel mean and standard deviation of their stained pixels in CIELAB.
    """
    lab = rgb_to_lab(crops[stained(crops)])
    return StainReference(tuple(lab.mean(0).tolist()), tuple(lab.std(0).tolist()), len(crops), source)


def save_reference(ref: StainReference, path: Path = REFERENCE_FILE) -> None:
    """Write a reference as JSON (the package's own by default)."""
    from malaria_cells.io import atomic_write_json

    atomic_write_json(path, {"mean": ref.mean, "std": ref.std, "cells": ref.cells, "source": ref.source})


@lru_cache(maxsize=4)
def load_reference(path: Path = REFERENCE_FILE) -> StainReference:
    """The reference stored with the package (or another file)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return StainReference(tuple(d["mean"]), tuple(d["std"]), int(d.get("cells", 0)), str(d.get("source", "")))


def normalize_cells(
    crops: np.ndarray, *, reference: StainReference | None = None, min_pixels: int = MIN_PIXELS
) -> tuple[np.ndarray, bool]:
    """Move one photo's cells to the reference stain: per CIELAB channel, (x - photo mean) / photo SD * reference SD
    + reference mean, over the stained pixels of all the cells together; the background stays black.

    Args:
        crops: uint8 (N, S, S, 3), the photo's letterboxed cells.
        reference: default: the package's NIH reference.
        min_pixels: with fewer stained pixels in all, the cells are returned unchanged.

    Returns:
        (the cells, whether they were changed).
    """
    reference = reference or load_reference()
    fg = stained(crops)
    if int(fg.sum()) < min_pixels:
        return crops, False
    lab = rgb_to_lab(crops[fg])
    mu, sd = lab.mean(0), lab.std(0)
    lab = (lab - mu) / np.maximum(sd, 1e-6) * np.asarray(reference.std) + np.asarray(reference.mean)
    out = np.zeros_like(crops)
    rgb = lab_to_rgb(lab)
    # A stained pixel must not turn into background: the letterbox's black border is how the model finds the cell.
    rgb[rgb.max(axis=-1) <= BLACK] = BLACK + 1
    out[fg] = rgb
    return out, True
