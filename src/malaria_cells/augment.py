"""Label-preserving cell augmentations: the eight dihedral transforms and mild colour jitter.

Cells have no orientation, so every flip and 90-degree rotation keeps the label; colour jitter stays mild
because stain colour carries the signal. The black background stays black. Training draws augmentations at
random (:func:`augment`); the frozen-backbone feature cache uses fixed, numbered views (:func:`view`), so the
head still sees augmented cells although the backbone runs only once per view.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The one numbering of the dihedral views lives in the torch-free preprocess module (the inference path needs it);
# training and the feature stores use it from here.
from malaria_cells.preprocess import DIHEDRAL, MAX_VIEWS, check_view, dihedral_view  # noqa: F401

# Hue rotation about the grey axis (the SVG/CSS hueRotate matrix): keeps luminance, shifts stain colour a little.
_HUE_A = torch.tensor([[0.213, 0.715, 0.072], [0.213, 0.715, 0.072], [0.213, 0.715, 0.072]])
_HUE_B = torch.tensor([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
_HUE_C = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])

VIEW_JITTER_SEED = 20180306  # fixed (not the run's seed) so runs with different seeds share a feature cache


def dihedral(x: torch.Tensor, k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``k`` quarter turns, then mirror it where ``flip``.

    Args:
        x: (N, C, H, W) with H == W.
        k: int (N,) quarter turns, 0-3.
        flip: bool (N,).

    Returns:
        The transformed batch (a new tensor).
    """
    x = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            x[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    x[flip] = x[flip].flip(3)
    return x


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Scale brightness and contrast of the cell (not the background) and rotate its hue.

    Args:
        x: float (N, 3, H, W) in 0-255, black background.
        brightness: (N,) factors (1 = unchanged).
        contrast: (N,) factors applied to the deviation from the cell's mean colour.
        hue: (N,) hue rotation in radians.

    Returns:
        float (N, 3, H, W) in 0-255, background still black.
    """
    n = x.shape[0]
    fg = (x.sum(1, keepdim=True) > 0).float()
    rot = _HUE_A + torch.cos(hue).view(n, 1, 1) * _HUE_B + torch.sin(hue).view(n, 1, 1) * _HUE_C
    x = torch.einsum("nij,njhw->nihw", rot, x)
    area = fg.sum((2, 3), keepdim=True).clamp_min(1)
    mean = (x * fg).sum((2, 3), keepdim=True) / area
    x = ((x - mean) * contrast.view(n, 1, 1, 1) + mean) * brightness.view(n, 1, 1, 1)
    return (x * fg).clamp_(0, 255)


def augment(
    batch_u8: torch.Tensor,
    gen: torch.Generator,
    *,
    brightness: float = 0.1,
    contrast: float = 0.1,
    hue_deg: float = 10.0,
) -> torch.Tensor:
    """Random dihedral transform (flips, 90-degree rotations) and mild brightness/contrast/hue jitter.

    Args:
        batch_u8: uint8 (N, H, W, 3).
        gen: random generator (seeded per epoch, so a resumed run draws the same augmentations).
        brightness: max relative change (0.1 = +-10 %).
        contrast: max relative change of the deviation from the cell's mean.
        hue_deg: max hue rotation in degrees.

    Returns:
        uint8 (N, H, W, 3), augmented.
    """
    n = batch_u8.shape[0]
    x = batch_u8.permute(0, 3, 1, 2).float()
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    x = dihedral(x, k, flip)
    b = 1 + (torch.rand(n, generator=gen) * 2 - 1) * brightness
    c = 1 + (torch.rand(n, generator=gen) * 2 - 1) * contrast
    theta = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(hue_deg)
    x = color_jitter(x, b, c, theta)
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1)


def view_jitter(
    view: int, n: int, *, brightness: float = 0.1, contrast: float = 0.1, hue_deg: float = 10.0
) -> np.ndarray:
    """The fixed colour jitter of numbered view ``view`` for ``n`` images (view 0 has none).

    Args:
        view: view number, 0 to ``MAX_VIEWS - 1``.
        n: images (the jitter of image i depends only on ``view``, ``i`` and ``n``).
        brightness: max relative change.
        contrast: max relative change.
        hue_deg: max hue rotation in degrees.

    Returns:
        float32 (n, 3): brightness factor, contrast factor, hue in radians.
    """
    if view == 0:
        return np.tile(np.array([1.0, 1.0, 0.0], np.float32), (n, 1))
    u = np.random.default_rng([VIEW_JITTER_SEED, view, n]).uniform(-1, 1, (n, 3))
    scale = np.array([brightness, contrast, math.radians(hue_deg)])
    return (u * scale + np.array([1.0, 1.0, 0.0])).astype(np.float32)


def view(batch_u8: torch.Tensor, number: int, jitter: np.ndarray | None) -> torch.Tensor:
    """Numbered view ``number`` of a batch: dihedral transform ``DIHEDRAL[number]`` plus fixed colour jitter.

    Args:
        batch_u8: uint8 (N, H, W, 3).
        number: 0 (the image itself) to ``MAX_VIEWS - 1``.
        jitter: float (N, 3) rows of :func:`view_jitter` for these images, or ``None`` for no colour change.

    Returns:
        uint8 (N, H, W, 3).

    Raises:
        ValueError: ``number`` out of range.
    """
    turns, mirror = check_view(number)
    if number == 0:
        return batch_u8
    n = batch_u8.shape[0]
    x = dihedral(
        batch_u8.permute(0, 3, 1, 2).float(), torch.full((n,), turns), torch.full((n,), mirror, dtype=torch.bool)
    )
    if jitter is not None:
        j = torch.from_numpy(np.asarray(jitter, np.float32))
        x = color_jitter(x, j[:, 0], j[:, 1], j[:, 2])
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1)


def stain_jitter(batch_u8: torch.Tensor, gen: torch.Generator, *, strength: float = 1.0) -> torch.Tensor:
    """Strong stain changes, for robustness to other labs' stains: saturation, per-channel gain and brightness.

    At ``strength`` 1: saturation x0.6-1.8 (pale to saturated Giemsa), per-channel gain x0.85-1.15 (hue shifts
    toward magenta or blue), brightness x0.8-1.2; ``strength`` scales each range around 1. The black background
    stays black.

    Args:
        batch_u8: uint8 (N, H, W, 3) cells on black.
        gen: random generator.
        strength: 0 (no change) to 1 (the ranges above); values above 1 widen them.

    Returns:
        uint8 (N, H, W, 3).
    """
    if strength <= 0:
        return batch_u8
    n = batch_u8.shape[0]
    f = batch_u8.float()
    cell = (batch_u8.amax(-1, keepdim=True) > 0).float()
    gray = f.mean(-1, keepdim=True)
    u = lambda *shape: torch.rand(*shape, generator=gen) * 2 - 1  # noqa: E731 - uniform in [-1, 1]
    sat = torch.exp(u(n, 1, 1, 1) * 0.55 * strength)  # log-uniform: x0.58-1.73 at strength 1
    gain = 1 + u(n, 1, 1, 3) * 0.15 * strength
    bright = 1 + u(n, 1, 1, 1) * 0.2 * strength
    f = (gray + (f - gray) * sat) * gain * bright
    return (f.clamp(0, 255) * cell).to(torch.uint8)
