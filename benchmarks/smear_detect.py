"""Cell detection on held-out development photos: the classical baseline against the learned detector.

Classical (the 40-line baseline of the smear issue): Otsu threshold of the green channel at half resolution,
holes filled, distance transform, local maxima at least 0.7 cell radii apart as markers, watershed; a box per
region, regions under 0.3x or over 2.5x the median area dropped. Learned: the centre-heatmap detector
(``malaria-cells detector train ... --val-fraction 0.2 --out runs/detector-val``: trained on the first 95 photos,
so the last 24 are held out). Both are scored on the last ``--photos`` sorted photos with the same matching
(IoU 0.5 and 0.3, one-to-one), and timed per photo (decode excluded, medians).

    python benchmarks/smear_detect.py --iml ../shared/iml-malaria --detector runs/detector-val/detector.onnx
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result
from PIL import Image
from scipy import ndimage as ndi

from malaria_cells.boxes import load_annotations, match
from malaria_cells.detect import Detector

RESULTS = Path(__file__).resolve().parent / "results"


def classical(rgb: np.ndarray, *, radius_px: float = 40.0) -> np.ndarray:
    """Otsu + distance transform + watershed at half resolution; boxes (N, 4) in px of the photo."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    small = np.asarray(Image.fromarray(rgb).reduce(2))
    g = ndi.gaussian_filter(small[..., 1].astype(np.float32), 1.0)
    mask = ndi.binary_fill_holes(ndi.binary_opening(g < threshold_otsu(g), iterations=2))
    dist = ndi.distance_transform_edt(mask)
    r = radius_px / 2
    peaks = peak_local_max(dist, min_distance=max(1, int(0.7 * r)), threshold_abs=0.4 * r, labels=mask.astype(int))
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    objs = ndi.find_objects(labels)
    boxes, areas = [], []
    for i, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        boxes.append([sl[1].start * 2, sl[0].start * 2, (sl[1].stop - sl[1].start) * 2, (sl[0].stop - sl[0].start) * 2])
        areas.append(float((labels[sl] == i).sum()))
    b, a = np.array(boxes, np.float64).reshape(-1, 4), np.array(areas)
    if len(a):
        med = np.median(a)
        b = b[(a > 0.3 * med) & (a < 2.5 * med)]
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--detector", type=Path, default=Path("runs/detector-val/detector.onnx"))
    ap.add_argument("--photos", type=int, default=24, help="the last N sorted photos (held out from the detector)")
    ap.add_argument("--out", type=Path, default=RESULTS / "smear_detect.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime", "scikit-image", "scipy"))
    truth = load_annotations(args.iml / "annotations.json")
    names = sorted(truth)[-args.photos :]
    detector = Detector(args.detector)
    methods = {"classical (Otsu + watershed)": classical, "learned (centre heatmap)": lambda rgb: detector(rgb).boxes}
    results = {}
    for label, fn in methods.items():
        t = dict(truth=0, found=0, m5=0, m3=0)
        times = []
        for name in names:
            rgb = np.asarray(Image.open(args.iml / "fields" / name).convert("RGB"))
            t0 = time.perf_counter()
            boxes = fn(rgb)
            times.append(time.perf_counter() - t0)
            t["truth"] += len(truth[name].boxes)
            t["found"] += len(boxes)
            t["m5"] += len(match(boxes, truth[name].boxes, iou=0.5)[0])
            t["m3"] += len(match(boxes, truth[name].boxes, iou=0.3)[0])
        results[label] = {
            "recall_iou50": t["m5"] / t["truth"],
            "precision_iou50": t["m5"] / max(1, t["found"]),
            "recall_iou30": t["m3"] / t["truth"],
            "ms_per_photo_median": 1000 * float(np.median(times)),
            "photos": len(names),
            "boxed_cells": t["truth"],
        }
        r = results[label]
        print(
            f"{label:30s} recall@0.5 {r['recall_iou50']:.3f}  precision@0.5 {r['precision_iou50']:.3f}  "
            f"recall@0.3 {r['recall_iou30']:.3f}  {r['ms_per_photo_median']:.1f} ms/photo"
        )
    save_result(
        args.out,
        name="smear_detect",
        command=command_line(),
        params={"photos": names, "detector": str(args.detector)},
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
