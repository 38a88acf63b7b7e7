"""Fit the stain reference of ``smear --stain-normalize``: the CIELAB mean and spread of NIH training cells.

The cells are those of the training patients of the default patient split (seed 0), spread over patients,
letterboxed at 48 px as the smear pipeline cuts them; the result is the package's ``stain_reference.json``.

    python benchmarks/stain_reference.py [--data ../shared/nih-cell-images] [--cells 3000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import spread

from malaria_cells.data import scan
from malaria_cells.preprocess import letterbox, load_image
from malaria_cells.split import make_split
from malaria_cells.stain import REFERENCE_FILE, fit_reference, save_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/nih-cell-images"))
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--out", type=Path, default=REFERENCE_FILE)
    args = ap.parse_args()
    found = scan(args.data)
    split = make_split(found.images, kind="patient", val_fraction=0.15, test_fraction=0.15, seed=0)
    train = spread([found.images[i] for i in split.indices(found.images, "train")], args.cells)
    crops = np.stack([letterbox(load_image(Path(found.root) / im.rel), args.size) for im in train])
    ref = fit_reference(
        crops,
        source=f"{len(train)} NIH cells of the training patients of the default split (seed 0), {args.size} px; "
        "python benchmarks/stain_reference.py",
    )
    save_reference(ref, args.out)
    print(f"L*a*b* mean {np.round(ref.mean, 2)}, SD {np.round(ref.std, 2)} from {ref.cells} cells -> {args.out}")


if __name__ == "__main__":
    main()
