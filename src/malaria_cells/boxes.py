"""Boxes around cells in field photos: reading annotations (IML-Malaria's JSON and COCO), IoU, and matching.

A box is ``(x, y, w, h)`` in pixels of the original photo, ``x, y`` its top-left corner. NumPy and SciPy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from malaria_cells.errors import MalariaCellsError

# IML-Malaria's types: one uninfected type, four life-cycle stages (all infected) and "difficult" (ambiguous: left out
# of cell-level scoring, still a cell for detection).
UNINFECTED_TYPES = frozenset({"red blood cell", "uninfected", "rbc"})
INFECTED_TYPES = frozenset({"ring", "trophozoite", "schizont", "gametocyte", "parasitized", "infected"})
IGNORED_TYPES = frozenset({"difficult"})
# Annotators of crowded fields skip whole cells. A detection overlapping no annotated box by at least this IoU (0-1)
# lies where nobody boxed cells: precision "where cells are boxed" leaves it out (it cannot be judged).
BOXED_IOU = 0.1


class AnnotationError(MalariaCellsError, ValueError):
    """An annotation file that cannot be read (the message names the file and the entry)."""

    code = "annotations_invalid"


@dataclass
class FieldBoxes:
    """The annotated cells of one photo."""

    image: str  # file name, as written in the annotation file
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (N, 4) x, y, w, h
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # 1 infected, 0 uninfected, -1 ignored
    types: list[str] = field(default_factory=list)  # the file's own type names

    @property
    def scored(self) -> np.ndarray:
        """Mask of boxes that count in cell-level scoring (not "difficult")."""
        return self.labels >= 0


def _label(kind: str) -> int:
    k = kind.strip().lower()
    if k in INFECTED_TYPES:
        return 1
    if k in UNINFECTED_TYPES:
        return 0
    if k in IGNORED_TYPES:
        return -1
    raise ValueError(f"unknown cell type {kind!r}")


def load_annotations(path: str | Path) -> dict[str, FieldBoxes]:
    """Read box annotations: IML-Malaria's JSON list or a COCO JSON object.

    IML: ``[{"image_name": ..., "objects": [{"type": ..., "bbox": {"x", "y", "w", "h"}}]}]`` (numbers may be
    strings). COCO: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "bbox": [x, y, w, h],
    "category_id"}], "categories": [{"id", "name"}]}``; category names are read like IML types.

    Args:
        path: the JSON file.

    Returns:
        File name -> its boxes (photos without boxes are kept, with none).

    Raises:
        AnnotationError: unreadable JSON, an unknown layout or cell type, a negative or empty box.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: unreadable annotation file ({e})") from None
    try:
        if isinstance(raw, list):
            entries = [
                (str(e["image_name"]), [(o["type"], [float(o["bbox"][k]) for k in "xywh"]) for o in e["objects"]])
                for e in raw
            ]
        elif isinstance(raw, dict) and {"images", "annotations"} <= raw.keys():
            names = {c["id"]: c["name"] for c in raw.get("categories", [])}
            files = {im["id"]: str(im["file_name"]) for im in raw["images"]}
            per: dict[str, list] = {name: [] for name in files.values()}
            for a in raw["annotations"]:
                per[files[a["image_id"]]].append((names.get(a.get("category_id"), "red blood cell"), a["bbox"]))
            entries = list(per.items())
        else:
            raise ValueError("neither the IML layout (a list of images) nor COCO (images + annotations)")
        out: dict[str, FieldBoxes] = {}
        for name, objs in entries:
            boxes = np.array([b for _, b in objs], np.float32).reshape(-1, 4)
            if len(boxes) and ((boxes[:, 2:] <= 0).any() or (boxes[:, :2] < -1).any()):
                raise ValueError(f"{name}: a box with a negative position or an empty size")
            fb = FieldBoxes(name, boxes, np.array([_label(t) for t, _ in objs], np.int64), [t for t, _ in objs])
            if name in out:  # a photo listed twice: its boxes add up
                prev = out[name]
                fb = FieldBoxes(
                    name,
                    np.concatenate([prev.boxes, fb.boxes]),
                    np.concatenate([prev.labels, fb.labels]),
                    prev.types + fb.types,
                )
            out[name] = fb
        return out
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: {e}") from None


def where_boxed(pred: np.ndarray, truth: np.ndarray, *, iou: float = BOXED_IOU) -> np.ndarray:
    """Which predicted boxes overlap some annotated box by at least ``iou``.

    Args:
        pred: (N, 4) predicted boxes.
        truth: (M, 4) annotated boxes.
        iou: the least overlap (default :data:`BOXED_IOU`).

    Returns:
        (N,) bool.
    """
    if len(pred) == 0 or len(truth) == 0:
        return np.zeros(len(pred), bool)
    return iou_matrix(np.asarray(pred, np.float64), np.asarray(truth, np.float64)).max(axis=1) >= iou


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` with every box in ``b``.

    Args:
        a: (N, 4) x, y, w, h.
        b: (M, 4) x, y, w, h.

    Returns:
        (N, M) IoU in [0, 1].
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2) top-left corner of the intersection
    hi = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    ix, iy = hi[..., 0] - lo[..., 0], hi[..., 1] - lo[..., 1]
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(pred: np.ndarray, truth: np.ndarray, *, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to true boxes that maximises total IoU, keeping pairs with IoU >= ``iou``.

    Args:
        pred: (N, 4) predicted boxes.
        truth: (M, 4) annotated boxes.
        iou: the least IoU of a match (0.5 is the usual detection criterion).

    Returns:
        (pred index, truth index) of the matched pairs.
    """
    if len(pred) == 0 or len(truth) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = iou_matrix(pred, truth)
    r, c = linear_sum_assignment(-m)
    keep = m[r, c] >= iou
    return r[keep].astype(np.int64), c[keep].astype(np.int64)
