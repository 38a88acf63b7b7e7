"""Decoded-cell speed of custom-CNN layouts and ONNX Runtime settings, int8, batch 64, as shipped.

Candidates: stage layouts of :class:`malaria_cells.models.CustomCNN` (channels, convolutions per stage) at 48 px and
the shipped model itself. Each is exported with the project's exporter (uint8 NHWC input, as ``malaria-cells export``)
and quantized with its int8 quantizer, calibrated on 64 real cells; speed does not depend on the weights' values, so
the layouts use random init (seed 0). Timing: ``Classifier.predict_prepared`` on 1,024 preloaded letterboxed cells
in batches of 64 (what ``make bench`` calls "decoded"), every candidate in every round (interleaved), median of the
rounds; all cores.

Run: .venv/bin/python benchmarks/arch_speed.py [--rounds 7] [--threads N]
Writes benchmarks/results/arch_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from malaria_cells.backends import OnnxBackend  # noqa: E402
from malaria_cells.export import export_torchscript_onnx, quantize_int8  # noqa: E402
from malaria_cells.models import CNN_STAGES, SLIM_STAGES, CustomCNN  # noqa: E402
from malaria_cells.predict import Classifier  # noqa: E402
from malaria_cells.preprocess import Preprocessing  # noqa: E402

LAYOUTS = {
    "cnn (shipped layout)": CNN_STAGES,
    "slim": SLIM_STAGES,
    "slim-narrow": ((16, 1), (24, 1), (48, 1), (96, 2), (192, 1)),
    "no-stage2-second": ((16, 1), (32, 1), (64, 2), (128, 2), (256, 1)),
}


def cells(n: int, size: int) -> np.ndarray:
    """n real letterboxed cells of the NIH share (both classes), uint8 (n, size, size, 3)."""
    from malaria_cells.data import scan
    from malaria_cells.preprocess import letterbox, load_image

    found = scan(ROOT.parent / "shared" / "nih-cell-images")
    picks = harness.spread(found.images, n)
    return np.stack([letterbox(load_image(im.path), size) for im in picks])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all usable cores")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["int8", "int8-qop", "fp32"],
        help="int8 (QDQ, as shipped), int8-qop (QOperator), fp32",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "arch_speed.json"))
    args = ap.parse_args()
    machine = harness.machine_info(["onnxruntime", "torch"])
    x = cells(1024, args.size)
    prep = Preprocessing(input_size=args.size)  # the custom CNN's: [0, 1] scaling, letterboxed on black
    fns, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, stages in LAYOUTS.items():
            torch.manual_seed(0)
            model = CustomCNN(stages=stages).eval()
            fp32 = Path(tmp) / f"{layout}.onnx"
            export_torchscript_onnx(model, prep, fp32)
            params = sum(p.numel() for p in model.parameters())
            for variant in args.variants:
                path = fp32 if variant == "fp32" else Path(tmp) / f"{layout}-{variant}.onnx"
                if variant != "fp32":
                    fmt, per_channel = {"int8": ("qdq", True), "int8-qop": ("qoperator", True)}[variant]
                    quantize_int8(fp32, path, x[:64], quant_format=fmt, per_channel=per_channel)
                meta = {
                    "model": "custom-cnn",
                    "preprocessing": prep.to_dict(),
                    "threshold": 0.5,
                    "class_names": ["Uninfected", "Parasitized"],
                }
                clf = Classifier(OnnxBackend(path, threads=args.threads, meta=meta), source=layout)
                name = f"{layout} · {variant}"
                info[name] = {
                    "layout": layout,
                    "variant": variant,
                    "stages": [list(st) for st in stages],
                    "parameters": params,
                    "onnx_kb": path.stat().st_size / 1e3,
                }
                fns[name] = lambda c=clf: [c.predict_prepared(x[a : a + 64]) for a in range(0, len(x), 64)]
        shipped = ROOT / "models" / "default.onnx"
        if shipped.exists():
            clf = Classifier(OnnxBackend(shipped, threads=args.threads), source="shipped")
            xs = x if clf.prep.input_size == args.size else cells(1024, clf.prep.input_size)
            fns["shipped models/default.onnx"] = lambda c=clf, xs=xs: [
                c.predict_prepared(xs[a : a + 64]) for a in range(0, len(xs), 64)
            ]
            info["shipped models/default.onnx"] = {"onnx_kb": shipped.stat().st_size / 1e3}
        for fn in fns.values():
            fn()  # warm-up
        rates = harness.interleaved_rates(fns, len(x), args.rounds)
    results = {name: {**info[name], "cells_per_s": rates[name]} for name in fns}
    for name, r in results.items():
        print(
            f"{name:32s} {r['cells_per_s']['median']:8.0f} cells/s (median of {args.rounds})  {r.get('parameters', '')}"
        )
    harness.save_result(
        args.out,
        name="arch_speed",
        command=harness.command_line(),
        params={
            "rounds": args.rounds,
            "threads": args.threads,
            "size": args.size,
            "batch": 64,
            "cells": len(x),
            "variants": args.variants,
        },
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
