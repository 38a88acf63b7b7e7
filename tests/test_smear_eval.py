"""Scoring a smear photo against its boxes: hand-counted detection tables, "where cells are boxed" included."""

import numpy as np

from malaria_cells.boxes import FieldBoxes, where_boxed
from malaria_cells.smear import FieldResult, SmearCell
from malaria_cells.smear_eval import score_photo


def _cell(i, x, y, label="Uninfected", prob=0.1, border=False):
    return SmearCell(i, x, y, 20, 20, 300, border, prob, label)


def test_where_boxed_by_hand():
    truth = np.array([[0, 0, 20, 20]])
    pred = np.array([[0, 0, 20, 20], [18, 0, 20, 20], [15, 0, 20, 20], [100, 100, 20, 20]])
    # IoU: 1; 2x20 / 760 = 0.053 (< 0.1); 5x20 / 700 = 0.143 (>= 0.1); 0
    assert where_boxed(pred, truth).tolist() == [True, False, True, False]
    assert where_boxed(pred, np.zeros((0, 4))).tolist() == [False] * 4
    assert where_boxed(np.zeros((0, 4)), truth).shape == (0,)


def test_precision_where_cells_are_boxed_leaves_out_unboxed_and_other_detections():
    boxes = np.array([[0, 0, 20, 20], [40, 0, 20, 20], [80, 0, 20, 20], [120, 0, 20, 20]], np.float32)
    truth = FieldBoxes("a.jpg", boxes, np.array([0, 1, 0, 0]))
    cells = [
        _cell(0, 0, 0),  # matches box 0
        _cell(1, 41, 0, "Parasitized", 0.99),  # matches box 1
        _cell(2, 92, 0),  # IoU 8x20 / 640 = 0.25 with box 2: partial, a false alarm where cells are boxed
        _cell(3, 300, 300),  # overlaps no box: a cell nobody boxed, left out
        _cell(4, 128, 0, "Other", float("nan")),  # partial overlap (0.43) but labelled Other: left out
        _cell(5, 500, 0, border=True),  # cut by the border: never "inner"
    ]
    result = FieldResult("a.jpg", 1000, 1000, cells)
    ps, y, p, _ = score_photo(result, truth)
    assert (ps.found, ps.found_inner, ps.matched50, ps.matched50_inner) == (6, 5, 2, 2)
    assert (ps.found_boxed, ps.matched50_inner) == (3, 2)  # cells 0, 1, 2
    assert ps.counted == 4 and ps.infected == 1  # counted: inner red cells 0-3
    assert y.tolist() == [0, 1] and np.allclose(p, [0.1, 0.99])
    # a cell labelled Other that matched a box is a correct detection (it stays in), whatever its label
    cells[0] = _cell(0, 0, 0, "Other", float("nan"))
    ps, _, _, _ = score_photo(FieldResult("a.jpg", 1000, 1000, cells), truth)
    assert (ps.found_boxed, ps.matched50_inner) == (3, 2)
