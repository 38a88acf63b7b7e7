"""Stain normalization of a field photo's cells towards the training cells' colours (Reinhard et al., 2001).

Another lab's Giemsa differs from the NIH slides as a whole: paler, more magenta, another white balance. Within one
photo every red cell shares that shift, so the photo's cells, taken together, measure it: :func:`normalize_cells`
moves the mean and spread of their stained pixels in CIELAB to those of the NIH training cells
(:func:`load_reference`), channel by channel, and leaves the black background black. The cells keep their differences
from each other (a parasite stays darker than its neighbours); only the photo's overall stain moves.

It needs many cells (one photo's worth): a crop alone would be normalized onto itself, and a photo of only infected
cells would lose part of what makes them look infected. It is for models trained on NIH-coloured cells, and for models
adapted to a lab on normalized cells (``adapt --stain-normalize``, which records it in the model); a model adapted on
the lab's raw colours already reads them and must not get it.

The reference is made by ``python benchmarks/stain_reference.py`` from NIH training patients' cells. NumPy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# The background rule of the out-of-distribution check: a pixel whose brightest channel is at most BLACK (0-255).
from malaria_cells.ood import BLACK

REFERENCE_FILE = Path(__file__).resolve().parent / "stain_reference.json"
MIN_PIXELS = 2000  # stained pixels below which a photo's statistics are too few to move it (~3 cells at 48 px)
# A channel whose spread over the photo's cells is below MIN_SPREAD (CIELAB units) is only shifted, never scaled: grey
# cells have a*, b* spreads of float rounding (~1e-4), which scaling would blow up into random colour. Otherwise the
# gain is at most MAX_GAIN: the development photos need up to 5.5 as photographed and ~9 made pale (b*, the spread
# of a pale stain's yellow-blue axis is small).
MIN_SPREAD = 0.5
MAX_GAIN = 16.0

# sRGB (D65) <-> CIE XYZ <-> CIELAB, as in scikit-image's rgb2lab / lab2rgb.
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], np.float64
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65, 2 degree observer
# float32 and a table for sRGB's gamma: a photo's ~150 cells are ~200,000 stained pixels, and float64 powers made the
# normalization cost more than detecting and classifying together (55 ms against 23 ms a photo, smear_speed.py).
_M_IN = (_RGB_TO_XYZ / _WHITE[:, None]).astype(np.float32)  # linear RGB -> XYZ / white
_M_OUT = (_XYZ_TO_RGB * _WHITE[None, :]).astype(np.float32)  # XYZ / white -> linear RGB
_GAMMA_STEPS = 65535  # the output gamma as a table over [0, 1]: within 0.05 of a level of the formula
_c = np.arange(_GAMMA_STEPS + 1, dtype=np.float64) / _GAMMA_STEPS
_GAMMA = np.round(255.0 * np.where(_c > 0.0031308, 1.055 * _c ** (1 / 2.4) - 0.055, 12.92 * _c)).astype(np.uint8)
_LINEAR = np.array(
    [(v / 255.0) / 12.92 if v / 255.0 <= 0.04045 else ((v / 255.0 + 0.055) / 1.055) ** 2.4 for v in range(256)],
    np.float32,
)


@dataclass(frozen=True)
class StainReference:
    """Mean and standard deviation of the stained pixels of the training cells, per CIELAB channel (L*, a*, b*)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cells: int = 0  # how many cells they came from
    source: str = ""  # what they came from


def _mix(m: np.ndarray, x: list[np.ndarray]) -> list[np.ndarray]:
    """Row i of ``m`` times the channels ``x``: a 3 x 3 colour matrix on separate channel arrays (numpy's matmul on
    (N, 3) rows is ~10x slower than these nine multiply-adds)."""
    return [x[0] * m[i, 0] + x[1] * m[i, 1] + x[2] * m[i, 2] for i in range(3)]


def _to_lab(rgb: np.ndarray) -> list[np.ndarray]:
    """L*, a*, b* channels (float32) of uint8 (N, 3) sRGB pixels."""
    lin = [_LINEAR[rgb[:, i]] for i in range(3)]
    f = [np.where(v > 0.008856, np.cbrt(v), np.float32(7.787) * v + np.float32(16.0 / 116.0)) for v in _mix(_M_IN, lin)]
    return [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])]


def _from_lab(lab: list[np.ndarray]) -> np.ndarray:
    """uint8 (N, 3) sRGB of L*, a*, b* channels (out-of-gamut colours clipped)."""
    fy = (lab[0] + 16.0) / 116.0
    f = [fy + lab[1] / 500.0, fy, fy - lab[2] / 200.0]
    xyz = [np.where(v > 0.2068966, v * v * v, (v - np.float32(16.0 / 116.0)) / np.float32(7.787)) for v in f]
    out = np.empty((len(fy), 3), np.uint8)
    for i, c in enumerate(_mix(_M_OUT, xyz)):
        idx = (np.clip(c, 0.0, 1.0) * np.float32(_GAMMA_STEPS) + np.float32(0.5)).astype(np.int32)
        out[:, i] = _GAMMA[idx]
    return out


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB of uint8 sRGB pixels.

    Args:
        rgb: uint8 (..., 3).

    Returns:
        float32 (..., 3): L* in [0, 100], a* and b* roughly in [-128, 127].
    """
    return np.stack(_to_lab(rgb.reshape(-1, 3)), -1).reshape(rgb.shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """uint8 sRGB of CIELAB values (out-of-gamut colours are clipped).

    Args:
        lab: float (..., 3).

    Returns:
        uint8 (..., 3).
    """
    flat = lab.reshape(-1, 3).astype(np.float32)
    return _from_lab([flat[:, i] for i in range(3)]).reshape(lab.shape)


def stained(crops: np.ndarray) -> np.ndarray:
    """Which pixels of letterboxed cells are not black background.

    Args:
        crops: uint8 (..., 3).

    Returns:
        bool (...).
    """
    # Three comparisons, not max(axis=-1): numpy reduces a length-3 last axis ~5x slower.
    return (crops[..., 0] > BLACK) | (crops[..., 1] > BLACK) | (crops[..., 2] > BLACK)


def fit_reference(crops: np.ndarray, *, source: str = "") -> StainReference:
    """The reference of a set of letterboxed training cells.

    Args:
        crops: uint8 (N, S, S, 3), cells on black.
        source: a note on where they came from.

    Returns:
        The per-channel mean and standard deviation of their stained pixels in CIELAB.
    """
    lab = [ch.astype(np.float64) for ch in _to_lab(crops[stained(crops)])]
    mean = (float(lab[0].mean()), float(lab[1].mean()), float(lab[2].mean()))
    std = (float(lab[0].std()), float(lab[1].std()), float(lab[2].std()))
    return StainReference(mean, std, len(crops), source)


def save_reference(ref: StainReference, path: Path = REFERENCE_FILE) -> None:
    """Write a reference as JSON, atomically.

    Args:
        ref: the reference.
        path: where (default: the package's own ``stain_reference.json``).
    """
    from malaria_cells.io import atomic_write_json

    atomic_write_json(path, {"mean": ref.mean, "std": ref.std, "cells": ref.cells, "source": ref.source})


@lru_cache(maxsize=4)
def load_reference(path: Path = REFERENCE_FILE) -> StainReference:
    """Read a reference.

    Args:
        path: a file written by :func:`save_reference` (default: the package's own).

    Returns:
        The reference (cached per path).
    """
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
    lab = _to_lab(crops[fg])
    # Each channel moved by its own scale and shift (the photo's statistics over every 4th pixel: plenty for a mean
    # and a spread, at a quarter of the cost).
    for i, ch in enumerate(lab):
        sample = ch[::4].astype(np.float64)
        spread = float(sample.std())
        k = min(reference.std[i] / spread, MAX_GAIN) if spread >= MIN_SPREAD else 1.0
        lab[i] = (ch - np.float32(sample.mean())) * np.float32(k) + np.float32(reference.mean[i])
    out = np.zeros_like(crops)
    rgb = _from_lab(lab)
    # A stained pixel must not turn into background: the letterbox's black border is how the model finds the cell.
    rgb[~stained(rgb)] = BLACK + 1
    out[fg] = rgb
    return out, True
