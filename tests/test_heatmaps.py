"""Tests for occlusion heatmaps (malaria_cells.heatmaps): the mechanics on a model whose evidence sits in a known
square, and the shipped ONNX model on real NIH cells (the heat lands on the stained parasite)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from malaria_cells.heatmaps import colorize, heatmap_png, occlusion, occlusion_map, overlay
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import Preprocessing

SIZE = 48
SPOT = (slice(8, 16), slice(28, 36))  # rows 8-15, columns 28-35: off the diagonal, so a swapped x/y misses it


class SpotModel:
    """P(Parasitized) rises with the purple pixels inside SPOT and nothing else: the evidence has a known place."""

    name = "synthetic"
    prep = Preprocessing(input_size=SIZE)
    meta = {"threshold": 0.5, "class_names": ["Uninfected", "Parasitized"], "model": "spot"}

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch_u8))
        spot = batch_u8[:, SPOT[0], SPOT[1]].astype(np.float64)
        purple = ((spot[..., 2] - spot[..., 1]) > 60).mean(axis=(1, 2))
        return (1 / (1 + np.exp(-12 * (purple - 0.25)))).astype(np.float32)


def _cell(*, dot: bool) -> np.ndarray:
    """A pink disc on black filling most of the frame; a purple square over SPOT when ``dot``."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[(yy - 23.5) ** 2 + (xx - 23.5) ** 2 <= 21**2] = (220, 150, 160)
    if dot:
        img[SPOT] = (120, 40, 160)
    return img


def test_occlusion_finds_the_evidence_where_it_is() -> None:
    model = SpotModel()
    clf = Classifier(model, source="memory", threads=1)
    heat, prob = occlusion_map(clf, _cell(dot=True))
    assert prob > 0.99 and heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 8 <= y < 16 and 28 <= x < 36, (y, x)
    assert heat[40, 10] == 0 and heat[24, 4] == 0  # patches that do not touch the spot hold no evidence
    # One model call: the input and every patch with some cell in it; the black corners are not sent.
    assert len(model.batches) == 1 and 1 + 100 <= model.batches[0] < 1 + 11 * 11


def test_an_uninfected_call_is_explained_by_what_would_make_it_parasitized() -> None:
    clf = Classifier(SpotModel(), source="memory", threads=1)
    heat, prob = occlusion_map(clf, _cell(dot=False))
    assert prob < 0.5
    # Painting a plain cell with its own colour changes nothing: no evidence anywhere, and no division by zero.
    assert np.all(heat == 0)


def test_heatmap_png_is_the_overlay_scaled() -> None:
    clf = Classifier(SpotModel(), source="memory", threads=1)
    expl = occlusion(clf, _cell(dot=True), name="spot.png")
    assert expl.prediction.label == "Parasitized" and expl.prediction.source == "spot.png"
    with Image.open(io.BytesIO(heatmap_png(expl.image, expl.heatmap, scale=3))) as im:
        assert im.format == "PNG" and im.size == (3 * SIZE, 3 * SIZE)
        rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb, overlay(expl.image, expl.heatmap, scale=3))
    hot, cold = colorize(expl.heatmap)[12, 32], colorize(expl.heatmap)[40, 10]
    assert tuple(hot) == (128, 0, 0) and tuple(cold) == (0, 0, 128)  # dark red at the evidence, dark blue without


@pytest.mark.slow
def test_shipped_model_heat_lands_on_the_stained_parasite(share: Path) -> None:
    clf = Classifier.load()  # the shipped ONNX model: no gradients, so this is its only heatmap
    assert clf.backend == "onnx"
    on_stain, called = 0, 0
    for path in sorted((share / "Parasitized").glob("*.webp"))[:20]:
        expl = occlusion(clf, str(path), name=path.name)
        img = expl.image.astype(int)
        inside = ndimage.binary_erosion(img.max(axis=-1) > 10, iterations=3)  # away from the letterbox edge
        stain = np.where(inside, img[..., 2] - img[..., 1], -999)  # Giemsa-stained parasite: blue over green
        if expl.prediction.label != "Parasitized" or stain.max() < 40:
            continue
        called += 1
        y, x = np.unravel_index(stain.argmax(), stain.shape)
        on_stain += expl.heatmap[y, x] >= 0.5
    assert called >= 15
    assert on_stain >= 0.8 * called, f"heat on the most stained pixel in only {on_stain} of {called} cells"
