"""The single-cell segmenter: the middle cell's mask on a light background, neighbours cut off, training form."""

from __future__ import annotations

import numpy as np

from malaria_cells.segment import cell_mask, on_black, to_training_form

BG = (222, 228, 218)  # a pale field background (IML-like)
CELL = (170, 130, 160)  # a stained red cell


def _disk(img: np.ndarray, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img[m] = colour
    return m


def _scene() -> tuple[np.ndarray, np.ndarray]:
    img = np.empty((72, 72, 3), np.uint8)
    img[:] = BG
    centre = _disk(img, 36, 36, 22, CELL)
    _disk(img, 36 + 44, 36, 22, CELL)  # a touching neighbour on the right, mostly outside
    return img, centre


def test_mask_is_the_middle_cell_without_its_neighbour():
    img, truth = _scene()
    mask = cell_mask(img, ellipse=(36, 36, 22, 22))
    inter = (mask & truth).sum()
    assert inter / truth.sum() > 0.95  # the cell, nearly whole
    assert (mask & ~truth).sum() / truth.sum() < 0.08  # little of the neighbour or the background
    assert not mask[:, 64:].any()  # the neighbour's far side is out


def test_pale_centre_is_filled():
    img, truth = _scene()
    _disk(img, 36, 36, 8, (205, 200, 205))  # central pallor, close to the background level
    mask = cell_mask(img, ellipse=(36, 36, 22, 22))
    assert mask[36, 36] and (mask & truth).sum() / truth.sum() > 0.95


def test_no_cell_gives_an_empty_mask():
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = BG
    assert not cell_mask(img).any()


def test_training_form_is_the_cell_on_black_cut_to_it():
    img, truth = _scene()
    mask = cell_mask(img, ellipse=(36, 36, 22, 22))
    out = to_training_form(img, mask, pad=1)
    ys, xs = np.nonzero(mask)
    assert out.shape[:2] == (ys.max() - ys.min() + 3, xs.max() - xs.min() + 3)
    assert (out[0] == 0).all() and (out[:, 0] == 0).all()  # black frame
    assert on_black(out) and not on_black(img)
    assert (out.reshape(-1, 3) == CELL).all(1).sum() >= 0.9 * truth.sum()
