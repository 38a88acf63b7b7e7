"""Cells per second of a run's model: torch fp32 vs ONNX fp32 vs ONNX int8 (QDQ and QOperator), CPU threads fixed.

Exports the run three ways into a temporary folder (int8 needs the run's data), then times each model on the same
letterboxed uint8 images (model only: decoding is the same for all), batch 64, in interleaved rounds.

Run: .venv/bin/python benchmarks/inference_speed.py --run RUN_DIR [--threads 2] [--images 1024] [--repeat 7]
Writes benchmarks/results/inference_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from malaria_cells.export import export_run, synthetic_cells
from malaria_cells.models import predict_logits, set_threads
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import Preprocessing
from malaria_cells.train import load_run_model


def interleaved_rates(fns: dict, images: np.ndarray, repeat: int) -> dict[str, dict[str, float]]:
    """Images/s of each function, timed in rounds (every model once per round) so that a change in the
    machine's load hits all of them alike; best and median over ``repeat`` rounds, after one warm-up batch."""
    for fn in fns.values():
        fn(images[:64])
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(images)
            rates[name].append(len(images) / (time.perf_counter() - t0))
    return {name: {"best": max(r), "median": statistics.median(r)} for name, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/inference_speed.json")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.set_num_interop_threads(1)
    model, meta = load_run_model(Path(args.run))
    prep = Preprocessing.from_dict(meta["preprocessing"])
    images = synthetic_cells(args.images, prep.input_size)
    bs = args.batch_size
    fns = {"torch fp32": lambda x: predict_logits(model, x, prep=prep, precision="fp32", batch_size=bs)}
    drops = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        files = {"onnx fp32": export_run(run_dir=Path(args.run), out=Path(tmp) / "fp32.onnx", data_dir=data)}
        for fmt in ("qdq", "qoperator"):
            files[f"onnx int8 {fmt}"] = export_run(
                run_dir=Path(args.run), out=Path(tmp) / f"{fmt}.onnx", int8=True, quant_format=fmt, data_dir=data
            )
        for name, report in files.items():
            clf = Classifier.load(report.path, threads=args.threads)

            def run(x: np.ndarray, clf: Classifier = clf) -> None:
                for a in range(0, len(x), bs):
                    clf.predict_prepared(x[a : a + bs])

            fns[name] = run
            if report.quantization.get("precision") == "int8":
                drops[name] = report.quantization["accuracy_drop_points"]
        rates = interleaved_rates(fns, images, args.repeat)
    result = {
        # The machine may be shared: the 1-minute load average says how busy it was (2 cores = load 2).
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "run": args.run,
        "model": meta["model"],
        "input_size": prep.input_size,
        "threads": args.threads,
        "batch_size": bs,
        "images": args.images,
        "rounds": args.repeat,
        "cells_per_s": rates,
        "int8_accuracy_drop_points": drops,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in rates.items():
        print(f"{k:20s} best {v['best']:6.0f}  median {v['median']:6.0f} cells/s")
    for k, v in result["int8_accuracy_drop_points"].items():
        print(f"{k}: {v:+.2f}")


if __name__ == "__main__":
    main()
