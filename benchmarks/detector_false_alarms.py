"""What the detector's false alarms are: unmatched detections of cells not cut by the border, split by how much they
overlap any annotated box.

On the held-out development photos (the last ``--photos`` by file name; the detector of ``--detector`` never saw
them), every detection not cut by the photo's border is matched one-to-one to the annotated boxes at IoU 0.5 and
0.3. An unmatched one either overlaps no annotated box at all (IoU < 0.1: a cell the annotators did not box, or
not a cell) or overlaps one partly (a second detection on a boxed cell, a box drawn around two touching cells, or
a detection straddling neighbours). Per photo and pooled. Reads the photos only; writes no image.

    python benchmarks/detector_false_alarms.py --detector runs/detector-val/detector.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result
from PIL import Image

from malaria_cells.boxes import iou_matrix, load_annotations, match
from malaria_cells.detect import Detector

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--detector", type=Path, default=Path("runs/detector-val/detector.onnx"))
    ap.add_argument("--photos", type=int, default=24, help="the last N photos by name (held out from the detector)")
    ap.add_argument("--out", type=Path, default=RESULTS / "detector_false_alarms.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime"))
    boxes = load_annotations(args.iml / "annotations.json")
    det = Detector(args.detector)
    per_photo, total = [], {"inner": 0, "matched_iou50": 0, "matched_iou30": 0, "no_overlap": 0, "partial": 0}
    for name in sorted(boxes)[-args.photos :]:
        d = det(np.asarray(Image.open(args.iml / "fields" / name).convert("RGB")))
        truth = boxes[name].boxes
        inner = np.flatnonzero(~d.on_border)
        p50, _ = match(d.boxes, truth, iou=0.5)
        p30, _ = match(d.boxes, truth, iou=0.3)
        best = iou_matrix(d.boxes, truth).max(axis=1) if len(truth) and len(d.boxes) else np.zeros(len(d.boxes))
        unmatched = inner[~np.isin(inner, p50)]
        row = {
            "photo": name,
            "inner": int(len(inner)),
            "matched_iou50": int(np.isin(inner, p50).sum()),
            "matched_iou30": int(np.isin(inner, p30).sum()),
            "no_overlap": int((best[unmatched] < 0.1).sum()),
            "partial": int((best[unmatched] >= 0.1).sum()),
        }
        row["precision_iou50"] = row["matched_iou50"] / max(1, row["inner"])
        per_photo.append(row)
        for k in total:
            total[k] += row[k]
        print(f"{name}: precision {row['precision_iou50']:.3f}  unmatched: {row['no_overlap']} overlap no box, "
              f"{row['partial']} overlap one partly")  # fmt: skip
    total["precision_iou50"] = total["matched_iou50"] / max(1, total["inner"])
    total["precision_iou30"] = total["matched_iou30"] / max(1, total["inner"])
    print(f"pooled: precision {total['precision_iou50']:.3f} (IoU 0.3: {total['precision_iou30']:.3f}); unmatched "
          f"{total['no_overlap']} overlap no box, {total['partial']} overlap one partly")  # fmt: skip
    save_result(
        args.out,
        name="detector_false_alarms",
        command=command_line(),
        params={"photos": args.photos, "detector": str(args.detector)},
        results={"pooled": total, "per_photo": per_photo},
        machine=machine,
    )


if __name__ == "__main__":
    main()
