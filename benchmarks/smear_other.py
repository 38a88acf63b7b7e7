"""How dark is a red cell? The measurement behind smear.OTHER_DARK_SHARE (white-cell nuclei and debris are "Other").

For the first 95 development photos (the detector's training part), the share of each cell mask darker
than ``DARK_LEVEL`` x the photo's background (green channel) is computed for annotated uninfected and infected
cells, and for detections that match no annotated box and are not cut by the border (white cells, platelet clumps,
debris, and red cells the annotators skipped). Prints percentiles and how many of each kind reach each threshold.

    python benchmarks/smear_other.py --iml ../shared/iml-malaria
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result
from PIL import Image

from malaria_cells.boxes import load_annotations, match
from malaria_cells.detect import Detector
from malaria_cells.smear import OTHER_DARK_SHARE, crop_cells

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--photos", type=int, default=95, help="the first N sorted photos (the detector's training part)")
    ap.add_argument("--every", type=int, default=1, help="every Nth of them")
    ap.add_argument("--out", type=Path, default=RESULTS / "smear_other.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime"))
    truth = load_annotations(args.iml / "annotations.json")
    detector = Detector()
    dark: dict[str, list[float]] = {"uninfected": [], "infected": [], "unmatched detections": []}
    names = sorted(truth)[: args.photos : args.every]
    for name in names:
        rgb = np.asarray(Image.open(args.iml / "fields" / name).convert("RGB"))
        fb = truth[name]
        _, _, ok, d = crop_cells(rgb, fb.boxes, size=64)
        for v, good, label in zip(d, ok, fb.labels, strict=True):
            if good and label >= 0:
                dark["infected" if label == 1 else "uninfected"].append(float(v))
        det = detector(rgb)
        matched, _ = match(det.boxes, fb.boxes, iou=0.3)
        rest = np.setdiff1d(np.arange(len(det)), matched)
        rest = rest[~det.on_border[rest]]
        _, _, ok, d = crop_cells(rgb, det.boxes[rest], size=64)
        dark["unmatched detections"] += [float(v) for v, good in zip(d, ok, strict=True) if good]
    thresholds = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    results = {}
    for kind, values in dark.items():
        v = np.array(values)
        results[kind] = {
            "n": len(v),
            "percentiles": {str(q): float(np.percentile(v, q)) for q in (50, 90, 99, 100)} if len(v) else {},
            "at_or_above": {str(t): int((v >= t).sum()) for t in thresholds},
            # every value from 0.6 up: the gap between infected red cells and white cells / debris lies there
            "values_from_0.6": sorted(float(x) for x in v if x >= 0.6),
        }
        pct = " ".join(f"{x:.3f}" for x in results[kind]["percentiles"].values())
        counts = ", ".join(f"{t}: {n}" for t, n in results[kind]["at_or_above"].items())
        print(f"{kind:22s} n={len(v):5d}  p50/p90/p99/max {pct}  >= {counts}")
        print(f"{'':22s} from 0.6 up: {' '.join(f'{x:.2f}' for x in results[kind]['values_from_0.6'])}")
    print(f"threshold in use: {OTHER_DARK_SHARE}")
    save_result(
        args.out,
        name="smear_other",
        command=command_line(),
        params={"photos": names, "threshold_in_use": OTHER_DARK_SHARE},
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
