"""Inference matrix: model x runtime x batch, from decoded tensors and end to end from files, with peak RSS.

Models: the custom CNN (64 px), EfficientNet-Lite0 and ResNet50V2 (128 px), each under torch fp32, torch bf16
autocast, ONNX Runtime fp32 and ONNX Runtime int8; and the shipped default model under ONNX Runtime only
(``models/default.onnx``, int8, and ``models/default-fp32.onnx``). Batches of 1 and 64.

- Weights: speed does not depend on the weights' values, so the torch models are ``build_model(name)`` with random
  init (seed 0) unless ``--run NAME=RUN_DIR`` gives trained ones; the JSON says which. Their ONNX files are made with
  the project's exporter (``export.export_torchscript_onnx``, same uint8-input graph as ``malaria-cells export``)
  and int8 with its quantizer (``export.quantize_int8``: static QDQ, MinMax, per-channel, first conv fp32)
  calibrated on 64 real letterboxed cells of the share.
- One fresh process per (model, runtime) cell and pass, so one measurement's memory cannot inflate another's peak
  RSS (VmHWM of that process: imports, model load and all four timings).
- Every runtime goes through the same ``malaria_cells.predict.Classifier``: ONNX files through ``Classifier.load``
  (what users run), torch models through a ``Classifier`` around ``malaria_cells.backends.TorchBackend`` (the
  backend of a run folder), with ``precision`` fp32 or bf16. "decoded" times
  ``Classifier.predict_prepared`` on preloaded uint8 letterboxed cells (model only); "end to end" times
  ``Classifier.predict(paths)`` on image files of the share (read, decode, letterbox, model: what a user sees).
- Timing: every pass runs every cell once, in a fixed order, so a change in the machine's load hits all cells alike;
  in a cell, each (batch, mode) repeats calls for ``--budget`` seconds (at least 3 calls at batch 1, 1 at batch
  64) after warm-up calls (a batch-64 warm-up is skipped where one call would take over 2 s: its one-off set-up is
  then small next to it). Reported: cells/s (median over passes of each pass's cells / time), per-call latency
  p50/p99 over all calls of all passes, peak RSS (median over passes). All cores by default (``--threads``).

Run: .venv/bin/python benchmarks/inference_matrix.py [--quick] [--threads N] [--passes 3] [--budget 0.75]
     [--files 256] [--models custom-cnn efficientnet-lite0 resnet50v2 shipped] [--run custom-cnn=RUN_DIR]
Writes benchmarks/results/inference_matrix.json (about 6 minutes on 2 cores; --quick: about 1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from harness import command_line, machine_info, peak_rss_mb, percentile, rss_mb, save_result, spread

if TYPE_CHECKING:  # the child of an ONNX cell must not import torch, so nothing heavy at module level
    from malaria_cells.predict import Classifier

ROOT = Path(__file__).resolve().parents[1]
TORCH_MODELS = ("custom-cnn", "efficientnet-lite0", "resnet50v2")
RUNTIMES = ("torch fp32", "torch bf16", "ort fp32", "ort int8")
SHIPPED = {"ort int8": "default.onnx", "ort fp32": "default-fp32.onnx"}  # in --shipped-dir
BATCHES = (1, 64)
MODES = ("decoded", "end_to_end")
PACKAGES = ("malaria-cells", "torch", "timm", "onnxruntime", "onnx", "numpy", "pillow")
WARMUP_LIMIT_S = 2.0  # skip a batch-64 warm-up call that would take longer than this
MIN_CALLS = {1: 3}  # at least this many timed calls per batch size (default 1)
CALIBRATION_CELLS = 64


# --------------------------------------------------------------------------------------------- child: one cell


def bench_meta(name: str, input_size: int) -> dict:
    """Metadata of an untrained model: what ``Classifier`` and the ONNX card need (threshold 0.5: speed only)."""
    from malaria_cells.data import CLASSES, POSITIVE
    from malaria_cells.models import default_preprocessing

    return {
        "model": name,
        "preprocessing": default_preprocessing(name, input_size).to_dict(),
        "threshold": 0.5,
        "class_names": list(CLASSES),
        "positive_class": CLASSES[POSITIVE],
        "positive_index": POSITIVE,
    }


def load_classifier(spec: dict) -> Classifier:
    """The cell's ``Classifier``: ``Classifier.load`` for an ONNX file, a torch backend otherwise."""
    from malaria_cells.predict import Classifier

    threads = spec["threads"]
    if spec["runtime"].startswith("ort"):
        return Classifier.load(spec["source"], threads=threads)
    import torch

    from malaria_cells.backends import TorchBackend

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    precision = spec["runtime"].split()[1]
    if spec.get("run"):
        backend = TorchBackend(spec["run"], device="cpu", precision=precision)
    else:
        from malaria_cells.models import build_model

        torch.manual_seed(0)
        meta = bench_meta(spec["model"], spec["input_size"])
        backend = TorchBackend.from_model(build_model(spec["model"]), meta, precision=precision)
    return Classifier(backend, source=spec.get("run") or "random init", threads=threads)


def time_calls(
    call: Callable[[int], None], *, budget_s: float, min_calls: int, max_calls: int = 100_000
) -> list[float]:
    """Seconds of each call of ``call(i)`` (the i-th call), repeated until ``budget_s`` and ``min_calls`` are met."""
    times: list[float] = []
    spent = 0.0
    while len(times) < max_calls and (len(times) < min_calls or spent < budget_s):
        t0 = time.perf_counter()
        call(len(times))
        dt_s = time.perf_counter() - t0
        times.append(dt_s)
        spent += dt_s
    return times


def run_cell(spec: dict) -> dict:
    """Time one (model, runtime) cell in this process: batches x {decoded, end to end}; peak RSS at the end."""
    t_start = time.perf_counter()
    clf = load_classifier(spec)
    load_s = time.perf_counter() - t_start
    rss_after_load_mb = rss_mb()
    cells = np.load(spec["cells_npy"])
    paths = Path(spec["files_txt"]).read_text().splitlines()
    assert cells.shape[1] == clf.prep.input_size, (cells.shape, clf.prep.input_size)

    def decoded(b: int) -> Callable[[int], None]:
        def call(i: int) -> None:
            a = (i * b) % (len(cells) - b + 1)
            clf.predict_prepared(cells[a : a + b])

        return call

    def end_to_end(b: int) -> Callable[[int], None]:
        def call(i: int) -> None:
            a = (i * b) % (len(paths) - b + 1)
            preds = clf.predict(paths[a : a + b], batch_size=b)
            if not all(p.ok for p in preds):
                raise SystemExit(f"unreadable file in the benchmark set: {[p.error for p in preds if not p.ok][:1]}")

        return call

    # Warm-up: first calls pay one-off costs (kernel selection, decode threads starting, page cache).
    t0 = time.perf_counter()
    decoded(1)(0)
    decoded(1)(1)
    one = time.perf_counter() - t0
    end_to_end(1)(0)
    warmed_64 = {}
    for b in spec["batches"]:
        warmed_64[b] = b == 1 or one / 2 * b < WARMUP_LIMIT_S
        if b > 1 and warmed_64[b]:
            decoded(b)(0)
            end_to_end(b)(0)
    out: dict[str, Any] = {}
    for b in spec["batches"]:
        for mode, make in (("decoded", decoded), ("end_to_end", end_to_end)):
            times = time_calls(make(b), budget_s=spec["budget_s"], min_calls=spec.get("min_calls", {}).get(str(b), 1))
            out[f"{b}/{mode}"] = {"cells_per_s": b * len(times) / sum(times), "call_s": times}
    return {
        "model": spec["model"],
        "runtime": spec["runtime"],
        "backend": clf.backend,
        "precision_in_file": clf.card.get("quantization", {}).get("precision") if clf.backend == "onnx" else None,
        "input_size": clf.prep.input_size,
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load_mb,
        "peak_rss_mb": peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
        "warmed_up": {str(b): w for b, w in warmed_64.items()},
        "timings": out,
    }


# --------------------------------------------------------------------------------------------- parent


def prepare_inputs(data: str | None, n_files: int, sizes: set[int], tmp: Path) -> tuple[Path, dict[int, Path], dict]:
    """Pick ``n_files`` share images, write their paths and their letterboxed uint8 arrays per input size."""
    from malaria_cells.data import resolve_data_dir, scan
    from malaria_cells.preprocess import letterbox, load_image

    found = scan(resolve_data_dir(data))
    picked = spread(found.images, n_files)
    files_txt = tmp / "files.txt"
    files_txt.write_text("\n".join(im.path for im in picked) + "\n")
    arrays = {}
    for size in sorted(sizes):
        arr = np.stack([letterbox(load_image(im.path), size) for im in picked])
        arrays[size] = tmp / f"cells_{size}.npy"
        np.save(arrays[size], arr)
    info = {
        "data": found.root,
        "files": len(picked),
        "parasitized": sum(im.label for im in picked),
        "patients": len({im.patient for im in picked}),
        "how": "evenly spread over the share's sorted file list",
    }
    return files_txt, arrays, info


def export_onnx(name: str, run: str | None, input_size: int, calibration: np.ndarray, tmp: Path) -> dict[str, Path]:
    """fp32 and int8 ONNX files of a model, with the project's exporter and quantizer and a readable card."""
    import torch

    from malaria_cells.export import _set_metadata, export_torchscript_onnx, onnx_metadata, quantize_int8
    from malaria_cells.models import build_model
    from malaria_cells.preprocess import Preprocessing

    if run:
        from malaria_cells.run import Run

        opened = Run.open(run)
        model, meta = opened.load_model(), opened.meta.to_dict()
    else:
        torch.manual_seed(0)
        model, meta = build_model(name).eval(), bench_meta(name, input_size)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    fp32, int8 = tmp / f"{name}-fp32.onnx", tmp / f"{name}-int8.onnx"
    export_torchscript_onnx(model, prep, fp32)
    quantize_int8(fp32, int8, calibration)
    weights = f"run {run}" if run else "random init (benchmark only)"
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        # Classifier.load reads the card from the file; the threshold is a placeholder, speed is all that counts.
        quant = {"precision": precision, "method": f"benchmark export ({weights})"}
        _set_metadata(path, onnx_metadata(meta, extra={"quantization": quant}), doc=f"benchmark {name} {precision}")
    return {"ort fp32": fp32, "ort int8": int8}


def run_child(spec: dict, tmp: Path, timeout_s: float) -> dict:
    """Run one cell in a fresh interpreter (this script with ``--cell``) and return its result."""
    spec_path = tmp / "spec.json"
    out_path = tmp / "cell_out.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--cell", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out_path.read_text())


def summarise(model: str, runtime: str, results: list[dict], extra: dict) -> dict:
    """One matrix cell: medians over passes, latency percentiles over every call of every pass."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"model": model, "runtime": runtime, **extra, "error": results[0]["error"] if results else "not run"}
    first = ok[0]
    batches: dict[str, dict] = {}
    for key in first["timings"]:
        b, mode = key.split("/")
        per_pass = [r["timings"][key]["cells_per_s"] for r in ok]
        calls = [t for r in ok for t in r["timings"][key]["call_s"]]
        batches.setdefault(b, {})[mode] = {
            "cells_per_s": statistics.median(per_pass),
            "cells_per_s_passes": per_pass,
            "latency_ms": {
                "p50": percentile(calls, 50) * 1e3,
                "p99": percentile(calls, 99) * 1e3,
                "calls": len(calls),
            },
        }
    return {
        "model": model,
        "runtime": runtime,
        **extra,
        "input_size": first["input_size"],
        "backend": first["backend"],
        "precision_in_file": first["precision_in_file"],
        "torch_imported": first["torch_imported"],
        "passes": len(ok),
        "failed_passes": [r["error"] for r in results if "error" in r],
        "load_s": statistics.median(r["load_s"] for r in ok),
        "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in ok if r["rss_after_load_mb"]),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
        "peak_rss_mb_passes": [r["peak_rss_mb"] for r in ok],
        "batch_64_warmed_up": first["warmed_up"].get("64"),
        "batches": batches,
    }


def print_table(cells: list[dict], threads: int) -> None:
    """The matrix as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cells/s (median of passes) and per-call latency p50/p99 ms; {threads} thread(s)")
    for col in ("model", "runtime", "peak RSS MB"):
        t.add_column(col, justify="left" if col != "peak RSS MB" else "right")
    for b in BATCHES:
        for mode in MODES:
            t.add_column(f"b{b} {mode.replace('_', ' ')}", justify="right")
    for c in cells:
        if "error" in c:
            t.add_row(c["model"], c["runtime"], "", f"[red]{c['error'][:60]}[/]")
            continue
        row = [c["model"], c["runtime"], f"{c['peak_rss_mb']:.0f}"]
        for b in BATCHES:
            for mode in MODES:
                m = c["batches"].get(str(b), {}).get(mode)
                row.append(
                    f"{m['cells_per_s']:,.0f} ({m['latency_ms']['p50']:.1f}/{m['latency_ms']['p99']:.1f})" if m else ""
                )
        t.add_row(*row)
    Console(width=200).print(t)


def plan_jobs(
    args: argparse.Namespace, *, runs: dict[str, str], sizes: dict[str, int], arrays: dict, files_txt: Path, tmp: Path
) -> list[tuple[str, str, dict, dict]]:
    """Every (model, runtime) cell: its child spec and what the JSON says about it; ONNX files exported here."""
    jobs: list[tuple[str, str, dict, dict]] = []
    for model in args.models:
        size = sizes[model]
        base = {
            "model": model,
            "threads": args.threads,
            "input_size": size,
            "cells_npy": str(arrays[size]),
            "files_txt": str(files_txt),
            "batches": args.batches,
            "budget_s": args.budget,
            "min_calls": {str(k): v for k, v in MIN_CALLS.items()},
        }
        if model == "shipped":
            for runtime, file in SHIPPED.items():
                if runtime in args.runtimes:
                    spec = {**base, "runtime": runtime, "source": str(Path(args.shipped_dir) / file)}
                    jobs.append((model, runtime, spec, {"weights": "trained (shipped)", "source": spec["source"]}))
            continue
        weights = f"trained: {runs[model]}" if model in runs else "random init (seed 0); speed only"
        onnx_files = {}
        if any(r.startswith("ort") for r in args.runtimes):
            print(f"exporting {model} to ONNX fp32 and int8 ...", flush=True)
            calibration = np.load(arrays[size])[:CALIBRATION_CELLS]
            onnx_files = export_onnx(model, runs.get(model), size, calibration, tmp)
        for runtime in args.runtimes:
            spec = {**base, "runtime": runtime, "run": runs.get(model)}
            if runtime.startswith("ort"):
                spec["source"] = str(onnx_files[runtime])
            jobs.append((model, runtime, spec, {"weights": weights}))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="images (default: as malaria-cells: $MALARIA_CELLS_DATA, share)")
    ap.add_argument("--models", nargs="+", default=[*TORCH_MODELS, "shipped"], choices=[*TORCH_MODELS, "shipped"])
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--run", action="append", default=[], metavar="MODEL=RUN_DIR", help="trained weights for MODEL")
    ap.add_argument("--shipped-dir", default="models", help="folder with default.onnx and default-fp32.onnx")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all usable cores")
    ap.add_argument("--passes", type=int, default=3, help="fresh processes per cell; medians over them")
    ap.add_argument("--budget", type=float, default=0.75, help="seconds of timed calls per (batch, mode) and pass")
    ap.add_argument("--files", type=int, default=256, help="share images for end to end (and decoded)")
    ap.add_argument("--cell-timeout", type=float, default=600.0, help="seconds before one cell's process is killed")
    ap.add_argument("--quick", action="store_true", help="about 1 minute: 1 pass, short budget, no ResNet50V2")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # development: seconds, custom CNN only
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell from a spec file
    ap.add_argument("--out", default="benchmarks/results/inference_matrix.json")
    args = ap.parse_args()

    if args.cell:
        spec = json.loads(Path(args.cell).read_text())
        Path(spec["out"]).write_text(json.dumps(run_cell(spec)))
        return
    if args.quick:
        args.passes, args.budget, args.files = 1, 0.3, 128
        args.models = [m for m in args.models if m != "resnet50v2"]
    if args.tiny:
        args.passes, args.budget, args.files = 1, 0.05, 64
        args.models = [m for m in args.models if m in ("custom-cnn", "shipped")]
    args.files = max(args.files, *args.batches)  # a batch needs that many distinct cells
    t_start = time.perf_counter()
    machine = machine_info(PACKAGES)
    runs = dict(r.split("=", 1) for r in args.run)
    if set(runs) - set(TORCH_MODELS):
        raise SystemExit(f"--run takes MODEL=RUN_DIR with MODEL in {', '.join(TORCH_MODELS)}")

    from malaria_cells.errors import RunError
    from malaria_cells.models import default_preprocessing
    from malaria_cells.run import Run

    sizes = {m: default_preprocessing(m).input_size for m in args.models if m in TORCH_MODELS}
    for model, run in runs.items():  # a run may have been trained at another size than the registry's
        try:
            sizes[model] = Run.open(run).meta.preprocessing.input_size
        except RunError as e:
            raise SystemExit(f"--run {model}={run}: {e}") from None
    if "shipped" in args.models:
        sizes["shipped"] = _onnx_input_size(Path(args.shipped_dir) / SHIPPED["ort int8"])
    with tempfile.TemporaryDirectory(prefix="inference-matrix-") as tmp_name:
        tmp = Path(tmp_name)
        files_txt, arrays, inputs = prepare_inputs(args.data, args.files, set(sizes.values()), tmp)
        jobs = plan_jobs(args, runs=runs, sizes=sizes, arrays=arrays, files_txt=files_txt, tmp=tmp)
        results: dict[tuple[str, str], list[dict]] = {(m, r): [] for m, r, _, _ in jobs}
        for p in range(args.passes):
            for model, runtime, spec, _ in jobs:
                print(f"pass {p + 1}/{args.passes}: {model} / {runtime}", flush=True)
                results[(model, runtime)].append(run_child(spec, tmp, args.cell_timeout))
    cells = [summarise(m, r, results[(m, r)], extra) for m, r, _, extra in jobs]
    params = {
        "quick": bool(args.quick or args.tiny),
        "threads": args.threads,
        "passes": args.passes,
        "budget_s": args.budget,
        "models": args.models,
        "runtimes": args.runtimes,
        "batches": args.batches,
        "files": args.files,
        "runs": runs,
    }
    results = {
        "inputs": inputs,
        "what": {
            "decoded": "Classifier.predict_prepared on preloaded uint8 letterboxed cells (the model only)",
            "end_to_end": "Classifier.predict(paths): read the file, decode, letterbox, model (as a user sees it)",
            "cells_per_s": "cells / seconds of timed calls in one pass; median over passes",
            "latency_ms": "seconds per call (one call = one batch), percentiles over all calls of all passes "
            "(linear interpolation, harness.percentile)",
            "peak_rss_mb": "VmHWM of a fresh process per cell and pass (imports, load, all timings); median",
            "torch": "malaria_cells.backends.TorchBackend (a run folder's backend); bf16 = torch.autocast bfloat16",
            "ort": "Classifier.load(file.onnx): onnxruntime CPU, graph optimisations on, intra-op threads = threads",
            "int8": "export.quantize_int8: static QDQ, MinMax on 64 share cells, per-channel, first conv fp32",
            "weights": "speed does not depend on weight values; untrained models are random init",
        },
        "cells": cells,
        "wall_s": time.perf_counter() - t_start,
    }
    save_result(
        args.out, name="inference_matrix", command=command_line(), params=params, results=results, machine=machine
    )
    print_table(cells, args.threads)
    print(f"wrote {args.out} in {results['wall_s']:.0f} s")


def _onnx_input_size(path: Path) -> int:
    """The input side of an exported malaria-cells ONNX file, from its metadata (no session needed)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return int(json.loads(meta["preprocessing"])["input_size"])


if __name__ == "__main__":
    main()
