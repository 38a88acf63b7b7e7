"""Annotation files (IML JSON and COCO), IoU and one-to-one matching, against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from malaria_cells.boxes import AnnotationError, iou_matrix, load_annotations, match


def test_iml_layout_with_string_numbers(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(
        json.dumps(
            [
                {
                    "image_name": "P1.JPG",
                    "objects": [
                        {"type": "red blood cell", "bbox": {"x": "10", "y": "20", "w": "30", "h": "40"}},
                        {"type": "ring", "bbox": {"x": "100", "y": "0", "w": "50", "h": "50"}},
                        {"type": "difficult", "bbox": {"x": "0", "y": "0", "w": "5", "h": "5"}},
                    ],
                },
                {"image_name": "P2.JPG", "objects": []},
            ]
        )
    )
    a = load_annotations(f)
    assert set(a) == {"P1.JPG", "P2.JPG"}
    assert a["P1.JPG"].boxes.tolist() == [[10, 20, 30, 40], [100, 0, 50, 50], [0, 0, 5, 5]]
    assert a["P1.JPG"].labels.tolist() == [0, 1, -1]
    assert a["P1.JPG"].scored.tolist() == [True, True, False]
    assert len(a["P2.JPG"].boxes) == 0


def test_coco_layout(tmp_path):
    f = tmp_path / "coco.json"
    f.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "x.png"}, {"id": 8, "file_name": "y.png"}],
                "categories": [{"id": 1, "name": "uninfected"}, {"id": 2, "name": "trophozoite"}],
                "annotations": [
                    {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 2},
                    {"image_id": 7, "bbox": [5, 6, 7, 8], "category_id": 1},
                ],
            }
        )
    )
    a = load_annotations(f)
    assert a["x.png"].labels.tolist() == [1, 0] and a["x.png"].boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert len(a["y.png"].boxes) == 0


def _obj(kind: str, w: int) -> str:
    return json.dumps([{"image_name": "x", "objects": [{"type": kind, "bbox": {"x": 1, "y": 1, "w": w, "h": 2}}]}])


@pytest.mark.parametrize("text", ["{not json", '{"a": 1}', _obj("alien", 2), _obj("ring", 0)])
def test_bad_annotation_files_name_the_file(tmp_path, text):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(AnnotationError, match="bad.json") as err:
        load_annotations(f)
    assert err.value.code == "annotations_invalid"


def test_iou_by_hand():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 10, 10], [0, 0, 10, 10], [20, 20, 5, 5], [0, 0, 5, 5]])
    # overlap 5x10 = 50, union 150; identical; disjoint; inside (25 / 100)
    assert np.allclose(iou_matrix(a, b), [[50 / 150, 1.0, 0.0, 0.25]])


def test_match_is_one_to_one_and_respects_the_threshold():
    truth = np.array([[0, 0, 10, 10], [100, 100, 10, 10]])
    pred = np.array([[1, 0, 10, 10], [0, 1, 10, 10], [103, 100, 10, 10], [50, 50, 10, 10]])
    r, c = match(pred, truth, iou=0.5)
    assert len(r) == 2 and sorted(c.tolist()) == [0, 1]  # two predictions on box 0: only one matches
    assert 3 not in r.tolist()
    r, c = match(pred, truth, iou=0.9)  # 103 vs 100: IoU 70/130 < 0.9; 1-px shifts: 90/110 < 0.9
    assert len(r) == 0
    assert match(np.zeros((0, 4)), truth, iou=0.5)[0].size == 0
