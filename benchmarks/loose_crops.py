"""Loose crops: cells of validation patients framed unlike the training crops, classified with and without
``--segment`` (the middle cell put back on black before the model sees it).

Framings: as they are (NIH crops); a 50 % light margin around the cell (a loose crop cut from a field photo); the
other lab's box crops are in ``ood_bank.py``. Accuracy against the NIH labels at the model's threshold, and how
many inputs get a flag (and so the label Unknown by default).

    python benchmarks/loose_crops.py --data ../shared/nih-cell-images --cells 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result, spread

from malaria_cells.data import scan
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import load_image
from malaria_cells.split import make_split

RESULTS = Path(__file__).resolve().parent / "results"
LIGHT = (222, 228, 218)


def loose(c: np.ndarray) -> np.ndarray:
    """The cell on a light background with a margin of half its size on every side."""
    h, w = c.shape[:2]
    canvas = np.empty((2 * h, 2 * w, 3), np.uint8)
    canvas[:] = LIGHT
    cell = c.max(2) > 20
    canvas[h // 2 : h // 2 + h, w // 2 : w // 2 + w][cell] = c[cell]
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/nih-cell-images"))
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS / "loose_crops.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime", "scipy"))
    found = scan(args.data)
    split = make_split(found.images, kind="patient", val_fraction=0.15, test_fraction=0.15, seed=0)
    val = spread([found.images[i] for i in split.indices(found.images, "val")], args.cells)
    cells = [np.asarray(load_image(Path(found.root) / im.rel)) for im in val]
    y = np.array([im.label for im in val])
    framings = {"NIH crop (as trained)": cells, "50 % light margin": [loose(c) for c in cells]}
    results = {}
    seen = False
    for mode in ("off", "auto"):
        clf = Classifier.load(segment=mode)
        # A final fit trained on every NIH patient: these cells were in its training set (the framing's effect, not
        # the accuracy, is what this measures then).
        seen = bool(clf.card.get("final_fit"))
        for framing, images in framings.items():
            preds = clf.predict(images)
            p = np.array([x.probability for x in preds])
            called = (p >= clf.threshold).astype(int)
            flagged = np.array([bool(x.flag) for x in preds])
            key = f"{framing}, segment {mode}"
            results[key] = {
                "cells": len(y),
                "accuracy": float((called == y).mean()),
                "specificity": float((called[y == 0] == 0).mean()),
                "sensitivity": float((called[y == 1] == 1).mean()),
                "flagged": float(flagged.mean()),
                "accuracy_unflagged": float((called[~flagged] == y[~flagged]).mean()) if (~flagged).any() else None,
            }
            r = results[key]
            print(f"{key:40s} accuracy {r['accuracy']:.4f}  specificity {r['specificity']:.4f}  "
                  f"sensitivity {r['sensitivity']:.4f}  flagged {100 * r['flagged']:.1f} %")  # fmt: skip
    save_result(
        args.out,
        name="loose_crops",
        command=command_line(),
        params={
            "cells": len(y),
            "split": "default patient split, seed 0, validation patients",
            "seen_in_training": seen,
        },
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
