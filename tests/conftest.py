"""Shared fixtures: the real data share (required, never silently skipped) and synthetic cell folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARE = Path(
    os.environ.get("MALARIA_CELLS_SHARE", Path(__file__).resolve().parents[1] / ".." / "shared" / "nih-cell-images")
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Each test session gets its own decoded-image cache, so tests never read a developer's cache.
    monkeypatch.setenv("MALARIA_CELLS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("MALARIA_CELLS_QUIET", "1")


@pytest.fixture(scope="session")
def share() -> Path:
    """The real NIH development share. Missing share = a loud failure, not a skip (CI must have it)."""
    if not (SHARE / "Parasitized").is_dir():
        pytest.fail(f"the NIH cell image share is missing at {SHARE.resolve()} (set MALARIA_CELLS_SHARE)")
    return SHARE


def synthetic_cell(rng: np.random.Generator, infected: bool, size: int = 40) -> Image.Image:
    """A pink disk on black; infected cells carry a dark purple dot (a stand-in for a ring-form parasite)."""
    w, h = size + int(rng.integers(-6, 7)), size + int(rng.integers(-6, 7))
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = h / 2, w / 2, min(w, h) / 2 - 2
    img = np.zeros((h, w, 3), np.float32)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    img[disk] = np.array([225, 160, 170]) + rng.normal(0, 8, (disk.sum(), 3))
    if infected:
        py, px = cy + rng.uniform(-r / 2, r / 2), cx + rng.uniform(-r / 2, r / 2)
        dot = ((yy - py) ** 2 + (xx - px) ** 2 <= (r / 4) ** 2) & disk
        img[dot] = [90, 30, 120]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_synthetic_dataset(
    root: Path,
    *,
    infected_patients: int = 8,
    uninfected_patients: int = 4,
    cells: int = 12,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """Write a folder in the NIH layout with NIH-style names: infected patients have cells in both classes."""
    rng = np.random.default_rng(seed)
    for p in range(1, infected_patients + 1):
        for i in range(cells):
            label = "Parasitized" if i % 2 == 0 else "Uninfected"
            d = root / label
            d.mkdir(parents=True, exist_ok=True)
            synthetic_cell(rng, label == "Parasitized").save(
                d / f"C{100 + p}P{p}ThinF_IMG_20150101_000000_cell_{i}{ext}"
            )
    for p in range(1, uninfected_patients + 1):
        d = root / "Uninfected"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(cells // 2):
            synthetic_cell(rng, False).save(d / f"C{200 + p}NThinF_IMG_20150101_000000_cell_{i}{ext}")
    return root


@pytest.fixture()
def synthetic_data(tmp_path) -> Path:
    """A small synthetic dataset: 12 patients, 120 images."""
    return make_synthetic_dataset(tmp_path / "cells")
