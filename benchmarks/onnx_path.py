"""Import time and memory of the prediction path: ONNX file (onnxruntime, no torch) vs run folder (torch).

Each measurement runs in a fresh interpreter: import ``malaria_cells.predict``, ``Classifier.load``, classify
one image. Reported: wall time of each step and of the whole process, peak RSS (VmHWM), and whether torch or
timm got imported.

Run: .venv/bin/python benchmarks/onnx_path.py --onnx MODEL.onnx [--run RUN_DIR] [--image CELL.webp] [--repeat 3]
Writes benchmarks/results/onnx_path.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import command_line, machine_info, save_result

# Runs in a fresh interpreter (python -c). It reads /proc itself rather than importing harness: compiling that module
# would add ~0.7 MB to the peak RSS this measures.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from malaria_cells.predict import Classifier
t1 = time.perf_counter()
clf = Classifier.load(sys.argv[1], threads=2)
t2 = time.perf_counter()
pred = clf.predict([sys.argv[2]])[0]
t3 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "first_predict_s": t3 - t2,
    "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024, "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
    "torch_imported": "torch" in sys.modules, "timm_imported": "timm" in sys.modules,
    "ok": pred.ok,
}))
"""


def measure(model: str, image: str, repeat: int) -> dict:
    """Median over ``repeat`` fresh interpreters of each step's time and the peak RSS."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, model, image], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_wall_s"] = time.perf_counter() - t0
        runs.append(row)
    keys = ("import_s", "load_s", "first_predict_s", "process_wall_s", "peak_rss_mb", "rss_mb")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    med.update(torch_imported=runs[0]["torch_imported"], timm_imported=runs[0]["timm_imported"], repeat=repeat)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="an exported .onnx file")
    ap.add_argument("--run", default=None, help="a run folder, for the torch comparison")
    ap.add_argument("--image", default=None, help="a cell image (default: the first of ../shared/nih-cell-images)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/onnx_path.json")
    args = ap.parse_args()
    image = args.image or str(next(iter(sorted(Path("../shared/nih-cell-images/Parasitized").glob("*.webp")))))
    machine = machine_info(["malaria-cells", "onnxruntime", "torch", "numpy"])
    rows = {"onnx": measure(args.onnx, image, args.repeat)}
    if args.run:
        rows["torch"] = measure(args.run, image, args.repeat)
    params = {"onnx": args.onnx, "run": args.run, "image": image, "repeat": args.repeat}
    save_result(args.out, name="onnx_path", command=command_line(), params=params, results=rows, machine=machine)
    print(
        f"{'path':6s} {'import s':>9s} {'load s':>7s} {'1st pred s':>10s} {'process s':>9s} {'peak RSS MB':>11s} torch"
    )
    for name, r in rows.items():
        print(
            f"{name:6s} {r['import_s']:9.3f} {r['load_s']:7.3f} {r['first_predict_s']:10.3f} "
            f"{r['process_wall_s']:9.2f} {r['peak_rss_mb']:11.0f} {r['torch_imported']}"
        )


if __name__ == "__main__":
    main()
