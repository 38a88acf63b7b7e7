"""What the detector's false alarms are: unmatched detections of cells not cut by the border, split by how much they
overlap any annotated box.

On the held-out development photos (the last ``--photos`` by file name; the detector of ``--detector`` never saw
them), every detection not cut by the photo's border is matched one-to-one to the annotated boxes at IoU 0.5 and
0.3. An unmatched one either overlaps no annotated box at all (IoU < 0.1: a cell the annotators did not box, or
not a cell) or overlaps one partly (a second detection on a boxed cell, a box drawn around two touching cells, or
a detection straddling neighbours). Per photo and pooled. ``--sheet PNG`` writes a contact sheet of the detections
that overlap no box, for a person to say what they are (it shows the share's photos: keep it out of the repository).

    python benchmarks/detector_false_alarms.py --detector runs/detector-val/detector.onnx [--sheet /tmp/unboxed.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result
from PIL import Image

from malaria_cells.boxes import BOXED_IOU, load_annotations, match, where_boxed
from malaria_cells.detect import Detector

RESULTS = Path(__file__).resolve().parent / "results"
TILE = 64  # px of one contact-sheet tile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--detector", type=Path, default=Path("runs/detector-val/detector.onnx"))
    ap.add_argument("--photos", type=int, default=24, help="the last N photos by name (held out from the detector)")
    ap.add_argument("--out", type=Path, default=RESULTS / "detector_false_alarms.json")
    ap.add_argument("--sheet", type=Path, default=None, help="contact sheet (PNG) of the detections overlapping no box")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime"))
    boxes = load_annotations(args.iml / "annotations.json")
    det = Detector(args.detector)
    tiles: list[np.ndarray] = []
    per_photo, total = [], {"inner": 0, "matched_iou50": 0, "matched_iou30": 0, "no_overlap": 0, "partial": 0}
    for name in sorted(boxes)[-args.photos :]:
        rgb = np.asarray(Image.open(args.iml / "fields" / name).convert("RGB"))
        d = det(rgb)
        truth = boxes[name].boxes
        inner = np.flatnonzero(~d.on_border)
        p50, _ = match(d.boxes, truth, iou=0.5)
        p30, _ = match(d.boxes, truth, iou=0.3)
        boxed = where_boxed(d.boxes, truth)
        unmatched = inner[~np.isin(inner, p50)]
        row = {
            "photo": name,
            "inner": int(len(inner)),
            "matched_iou50": int(np.isin(inner, p50).sum()),
            "matched_iou30": int(np.isin(inner, p30).sum()),
            "no_overlap": int((~boxed[unmatched]).sum()),
            "partial": int(boxed[unmatched].sum()),
        }
        for i in unmatched[~boxed[unmatched]]:
            x, y, w, h = d.boxes[i]
            side = max(w, h) * 1.3  # the box and a margin around it, square
            cx, cy = x + w / 2, y + h / 2
            box = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
            # crop (not resize's box): a box reaching past the photo's edge is padded, not refused
            tiles.append(np.asarray(Image.fromarray(rgb).crop(box).resize((TILE, TILE), Image.BILINEAR)))
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
    if args.sheet is not None and tiles:
        cols = 16
        sheet = np.full((-(-len(tiles) // cols) * TILE, cols * TILE, 3), 255, np.uint8)
        for k, t in enumerate(tiles):
            sheet[k // cols * TILE : (k // cols + 1) * TILE, k % cols * TILE : (k % cols + 1) * TILE] = t
        Image.fromarray(sheet).save(args.sheet)
        print(f"wrote {args.sheet} ({len(tiles)} detections overlapping no box, IoU < {BOXED_IOU})")
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
