"""Cells per second of a run's model: torch fp32 vs ONNX fp32 vs ONNX int8 (QDQ and QOperator), CPU threads fixed.

Exports the run three ways into a temporary folder (int8 needs the run's data), then times each model on the same
letterboxed uint8 images (model only: decoding is the same for all), batch 64, in interleaved rounds.

Run: .venv/bin/python benchmarks/inference_speed.py --run RUN_DIR [--threads 2] [--images 1024] [--repeat 7]
Writes benchmarks/results/inference_speed.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import command_line, interleaved_rates, machine_info, save_result

from malaria_cells.export import export_run, synthetic_cells
from malaria_cells.models import predict_logits, set_threads
from malaria_cells.predict import Classifier
from malaria_cells.run import Run


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
    machine = machine_info(["malaria-cells", "torch", "onnxruntime", "onnx", "numpy"])
    set_threads(args.threads)
    torch.set_num_interop_threads(1)
    run = Run.open(args.run)
    model, prep = run.load_model(), run.meta.prep
    images = synthetic_cells(args.images, prep.input_size)
    bs = args.batch_size
    fns = {"torch fp32": lambda x: predict_logits(model, x, prep=prep, precision="fp32", batch_size=bs)}
    drops = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        files = {"onnx fp32": export_run(run_dir=run.path, out=Path(tmp) / "fp32.onnx", data_dir=data)}
        for fmt in ("qdq", "qoperator"):
            files[f"onnx int8 {fmt}"] = export_run(
                run_dir=run.path, out=Path(tmp) / f"{fmt}.onnx", int8=True, quant_format=fmt, data_dir=data
            )
        for name, report in files.items():
            clf = Classifier.load(report.path, threads=args.threads)

            def predict(x: np.ndarray, clf: Classifier = clf) -> None:
                for a in range(0, len(x), bs):
                    clf.predict_prepared(x[a : a + bs])

            fns[name] = predict
            if report.quantization.get("precision") == "int8":
                drops[name] = report.quantization["accuracy_drop_points"]
        for fn in fns.values():  # warm-up: one batch each
            fn(images[:bs])
        rates = interleaved_rates({k: lambda fn=fn: fn(images) for k, fn in fns.items()}, len(images), args.repeat)
    params = {
        "run": args.run,
        "model": run.meta.model,
        "input_size": prep.input_size,
        "threads": args.threads,
        "batch_size": bs,
        "images": args.images,
        "rounds": args.repeat,
    }
    results = {"cells_per_s": rates, "int8_accuracy_drop_points": drops}
    save_result(
        args.out, name="inference_speed", command=command_line(), params=params, results=results, machine=machine
    )
    for k, v in rates.items():
        print(f"{k:20s} best {v['best']:6.0f}  median {v['median']:6.0f} cells/s")
    for k, v in drops.items():
        print(f"{k}: {v:+.2f}")


if __name__ == "__main__":
    main()
