"""Zero-shot robustness to other labs' stains: cell models scored on the other lab's annotated cells, as photographed
and with the photos' stain shifted (the development photos are all pale; other slides of that lab are saturated
magenta), and on NIH validation patients.

Each model classifies the annotated boxes of every ``--every``-th development photo (the smear pipeline's crops, so
detection plays no part), in three stain conditions applied to the whole photo: as photographed; saturated
magenta (saturation x2.2, red and blue x1.08, green x0.85); pale (saturation x0.6). Metrics at the model's own
threshold and at its high-specificity operating point (where it has one: the point `smear` screens with), ROC-AUC,
and the specificity at which 85 % of infected cells are still found; 95 % intervals resample photos. No photo of the
other lab was used to train these models. ``--stain-normalize`` first moves each photo's cells to the NIH training
cells' stain (as ``smear --stain-normalize``; without it, each model's own choice: a model adapted with
``--stain-normalize`` normalizes); the NIH cells are never normalized. ``--first NAME`` keeps the photos from NAME on
(sorted), e.g. the test photos of ``adapt``'s split, to score adapted models on photos they never saw. A final-fit
model (trained on every NIH patient) saw the NIH validation cells: its NIH column is then marked as such and means
nothing.

    python benchmarks/stain_shift.py --models models/default.onnx runs/custom-cnn-48-stain/model.onnx
    python benchmarks/stain_shift.py --first PA171785.JPG --models models/default.onnx runs/adapt-iml-final/model.onnx \
        runs/adapt-iml-final-norm/model.onnx --out benchmarks/results/stain_shift_adapted.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result, spread
from PIL import Image

from malaria_cells import metrics as M
from malaria_cells.boxes import load_annotations
from malaria_cells.data import scan
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import load_image
from malaria_cells.smear import SmearAnalyzer
from malaria_cells.split import make_split

RESULTS = Path(__file__).resolve().parent / "results"
CONDITIONS = {
    "as photographed": (1.0, (1.0, 1.0, 1.0)),
    "saturated magenta": (2.2, (1.08, 0.85, 1.08)),
    "pale": (0.6, (1.0, 1.0, 1.0)),
}


def shift(rgb: np.ndarray, saturation: float, gain: tuple[float, float, float]) -> np.ndarray:
    """The photo with its colours pushed away from grey by ``saturation`` and each channel scaled by ``gain``."""
    f = rgb.astype(np.float32)
    gray = f.mean(axis=2, keepdims=True)
    f = (gray + (f - gray) * saturation) * np.asarray(gain, np.float32)
    return np.clip(f, 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="ONNX files or run folders")
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--data", type=Path, default=Path("../shared/nih-cell-images"))
    ap.add_argument("--every", type=int, default=1, help="every N-th development photo")
    ap.add_argument("--first", default=None, help="only the photos from this name on (sorted)")
    ap.add_argument("--nih-cells", type=int, default=2000)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument(
        "--stain-normalize",
        action="store_true",
        help="each photo's cells moved to the NIH cells' stain first (smear --stain-normalize)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "stain_shift.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime"))
    boxes = load_annotations(args.iml / "annotations.json")
    names = sorted(n for n in boxes if args.first is None or n >= args.first)[:: args.every]
    photos = {n: np.asarray(Image.open(args.iml / "fields" / n).convert("RGB")) for n in names}
    found = scan(args.data)
    split = make_split(found.images, kind="patient", val_fraction=0.15, test_fraction=0.15, seed=0)
    val = spread([found.images[i] for i in split.indices(found.images, "val")], args.nih_cells)
    nih = [np.asarray(load_image(Path(found.root) / im.rel)) for im in val]
    y_nih = np.array([im.label for im in val])
    results: dict = {}
    for model in args.models:
        clf = Classifier.load(model)
        # None: the model's own choice (an adapted model records whether it was trained on normalized cells)
        analyzer = SmearAnalyzer(classifier=clf, stain_normalize=True if args.stain_normalize else None)
        row: dict = {"threshold": clf.threshold, "stain_normalized": analyzer.stain_normalize}
        p_nih = np.array([p.probability for p in clf.predict(nih)])
        row["nih_validation"] = M.binary_metrics(y_nih, p_nih, clf.threshold)
        row["nih_validation_seen_in_training"] = bool(clf.card.get("final_fit"))
        for cond, (sat, gain) in CONDITIONS.items():
            y, p, g = [], [], []
            for i, n in enumerate(names):
                fb = boxes[n]
                r = analyzer.analyze_array(shift(photos[n], sat, gain), name=n, boxes=fb)
                for c in r.cells:
                    if c.truth is not None and c.truth >= 0 and not np.isnan(c.prob_parasitized):
                        y.append(c.truth)
                        p.append(c.prob_parasitized)
                        g.append(i)
            y, p, g = np.array(y), np.array(p), np.array(g)
            ci = M.bootstrap_ci(y, p, g, threshold=clf.threshold, n_boot=args.n_boot, seed=0)
            row[cond] = {
                **{k: ci[k] for k in ("roc_auc", "sensitivity", "specificity")},
                "specificity_at_sensitivity_0.85": M.specificity_at_sensitivity(y, p, 0.85),
                "cells": int(len(y)),
                "infected": int(y.sum()),
                "called_infected_pct": float(100 * (p >= clf.threshold).mean()),
                "true_infected_pct": float(100 * y.mean()),
            }
            hs = clf.operating_points.get("high_specificity")
            if hs is not None:
                # The point `smear` screens with (chosen on NIH patients, never on these cells).
                at = M.bootstrap_ci(y, p, g, threshold=hs, n_boot=args.n_boot, seed=0)
                row[cond]["high_specificity"] = {
                    "threshold": hs,
                    **{k: at[k] for k in ("sensitivity", "specificity")},
                    "called_infected_pct": float(100 * (p >= hs).mean()),
                }
            m = row[cond]
            print(f"{Path(model).parent.name}/{Path(model).name:16s} {cond:18s} AUC {m['roc_auc']['value']:.3f}  "
                  f"sens {m['sensitivity']['value']:.3f}  spec {m['specificity']['value']:.3f}  "
                  f"spec@sens0.85 {m['specificity_at_sensitivity_0.85']:.3f}  "
                  f"called {m['called_infected_pct']:.2f} % / true {m['true_infected_pct']:.2f} %")  # fmt: skip
        print(f"{'':36s} NIH validation: accuracy {row['nih_validation']['accuracy']:.4f}  "
              f"AUC {row['nih_validation']['roc_auc']:.4f}")  # fmt: skip
        results[str(model)] = row
    save_result(
        args.out,
        name="stain_shift",
        command=command_line(),
        params={
            "photos": len(names),
            "every": args.every,
            "first": args.first,
            "conditions": CONDITIONS,
            "nih_cells": len(y_nih),
            "stain_normalize": args.stain_normalize,
        },
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
