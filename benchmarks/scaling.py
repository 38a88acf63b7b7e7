"""How cost grows with the number of images: predict and train time and peak memory at 1k, 5k and 20k images.

Every measurement is the real command in a fresh process, as a user runs it:

- predict: ``malaria-cells predict FOLDER --format csv --out FILE --model models/default.onnx`` on a folder of
  symlinks to N share images (evenly spread over the sorted file list, so both classes and every patient), written
  row by row (``Classifier.iter_predict`` + ``render_predictions``). The CSV is checked: N rows, no errors.
- train: ``malaria-cells train --model custom-cnn --max-images N --epochs 1`` (``--max-images`` caps the whole set
  before the patient split, so ~70 % of N train and ~15 % validate), with a warm image cache: the cache of each
  size is built first by ``train.prepare_data`` (what ``train`` calls) in its own process, timed and reported as the
  cold-cache build, and every timed train run afterwards finds it (checked: no new cache file appears). A fresh
  temporary ``$MALARIA_CELLS_CACHE`` makes the build really cold and is deleted at the end.
- time to accuracy: one ``train --max-images LARGEST --epochs E`` run (``--tta-epochs``, warm cache); for each target
  validation accuracy, the first epoch that reached it and the training time until then (``metrics.jsonl``).

Time is the child's wall clock (process start to exit: imports, scan, work, writing). Memory: the child's peak RSS
(``ru_maxrss`` from ``wait4``: the largest process of its tree, so cache-building workers count) and, sampled every
50 ms from ``/proc/PID/status`` of the child itself, peak anonymous memory (``RssAnon``: heap, arrays; what would
grow if anything were held per image) and peak file-backed memory (``RssFile``: shared libraries and the touched
pages of the memory-mapped cache, page cache the kernel can drop). Rounds are interleaved (every size once per
round) and medians reported; time vs images gets a least-squares line (slope, intercept, R^2).

Run: .venv/bin/python benchmarks/scaling.py [--quick] [--sizes 1000 5000 20000] [--repeat 3] [--threads N]
     [--tta-epochs 4] [--targets 0.90 0.95 0.96]
Writes benchmarks/results/scaling.json (about 12 minutes on 2 quiet cores, 4 of them the time-to-accuracy run;
--quick: sizes 500/1000/2000, 1 round, 2 epochs to accuracy, about 1.5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import command_line, first_reached, machine_info, proc_status, save_result, spread

from malaria_cells.run import Run

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "malaria_cells.cli"]  # the `malaria-cells` entry point of this interpreter
TRAIN_MODEL = "custom-cnn"
SAMPLE_S = 0.05
# train.prepare_data with the defaults `malaria-cells train --model M --max-images N` resolves to.
PREPARE = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from malaria_cells.config import TrainConfig
from malaria_cells.models import get_spec
from malaria_cells.train import prepare_data
t1 = time.perf_counter()
c = TrainConfig()
d = prepare_data(data_dir=Path(sys.argv[1]), input_size=get_spec(sys.argv[2]).input_size, split=None, kind=c.split,
                 val_fraction=c.val_fraction, test_fraction=c.test_fraction, seed=c.seed, max_images=int(sys.argv[3]),
                 cache_dir=None)
print(json.dumps({"import_s": t1 - t0, "prepare_s": time.perf_counter() - t1, "images": len(d.images)}))
"""


def measure(cmd: list[str], *, env: dict[str, str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``cmd`` to completion; its wall time, exit code, peak RSS (wait4) and sampled memory peaks."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                break
            status = proc_status(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], status.get(k, 0))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
            time.sleep(SAMPLE_S)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    return {
        "wall_s": wall,
        "exit_code": proc.returncode,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux; this parent is small, so no inherited size
        "peak_rss_sampled_mb": peaks["VmHWM"] / 1024,
        "peak_rss_anon_mb": peaks["RssAnon"] / 1024,
        "peak_rss_file_mb": peaks["RssFile"] / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _check(result: dict, log: Path, what: str) -> None:
    if result["exit_code"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        raise SystemExit(f"{what} failed (exit {result['exit_code']}):\n" + "\n".join(tail))


def link_folder(images: list[Any], folder: Path) -> Path:
    """A folder of symlinks to ``images``, keeping their class folders, for ``predict FOLDER``."""
    for im in images:
        dest = folder / im.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(Path(im.path).resolve())
    return folder


def line_fit(x: list[float], y: list[float]) -> dict[str, float | None]:
    """Least-squares line of seconds vs images: seconds per 1,000 images, fixed seconds (intercept), and R^2."""
    if len(x) < 2 or any(v is None for v in (*x, *y)):
        return {"s_per_1k_images": None, "intercept_s": None, "r2": None}
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    ss_res = float(np.sum((ys - (slope * xs + intercept)) ** 2))
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    return {"s_per_1k_images": float(slope) * 1000, "intercept_s": float(intercept), "r2": 1 - ss_res / ss_tot}


def summarise(rows: dict[int, list[dict]], extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Medians per size, the time line fit, and how peak memory changes from the smallest to the largest size."""
    out_rows = []
    for n, runs in sorted(rows.items()):
        wall = statistics.median(r["wall_s"] for r in runs)
        row = {
            "images": n,
            "wall_s": wall,
            "wall_s_runs": [r["wall_s"] for r in runs],
            "images_per_s": n / wall,
            "s_per_1k_images": wall / n * 1000,
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        }
        for k in ("peak_rss_mb", "peak_rss_sampled_mb", "peak_rss_anon_mb", "peak_rss_file_mb", *extra_keys):
            vals = [r[k] for r in runs if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
        out_rows.append(row)
    small, large = out_rows[0], out_rows[-1]

    def ratio(k: str) -> float | None:
        return large[k] / small[k] if large.get(k) and small.get(k) else None

    return {
        "rows": out_rows,
        "fit_wall_s": line_fit([r["images"] for r in out_rows], [r["wall_s"] for r in out_rows]),
        "rss_ratio_largest_to_smallest": {
            "sizes": [small["images"], large["images"]],
            "peak_rss": ratio("peak_rss_mb"),
            "anon": ratio("peak_rss_anon_mb"),
            "file": ratio("peak_rss_file_mb"),
        },
    }


def cold_build(n: int, *, data: Path, env: dict[str, str], tmp: Path, timeout_s: float) -> dict[str, Any]:
    """``train.prepare_data`` for ``n`` images in a fresh process with an empty cache: the cold-cache build."""
    log = tmp / f"prepare-{n}.log"
    r = measure([sys.executable, "-c", PREPARE, str(data), TRAIN_MODEL, str(n)], env=env, log=log, timeout_s=timeout_s)
    _check(r, log, f"prepare_data for {n} images")
    r.update(json.loads(log.read_text().strip().splitlines()[-1]))
    return r


def predict_once(n: int, folder: Path, *, model: str, env: dict, tmp: Path, timeout_s: float) -> dict:
    """``malaria-cells predict`` on a folder of ``n`` images to a CSV file; the CSV must have ``n`` good rows."""
    csv_path, log = tmp / f"predict-{n}.csv", tmp / f"predict-{n}.log"
    cmd = [*CLI, "predict", str(folder), "--format", "csv", "--out", str(csv_path), "--model", model]
    # No --threads: predict's own split of the cores between the model and its decoding processes, as a user gets.
    r = measure(cmd, env=env, log=log, timeout_s=timeout_s)
    _check(r, log, f"predict on {n} images")
    lines = csv_path.read_text().splitlines()
    errors = sum(1 for ln in lines[1:] if not ln.endswith(","))  # the error column is last and empty when fine
    if len(lines) - 1 != n or errors:
        raise SystemExit(f"predict on {n} images wrote {len(lines) - 1} rows, {errors} with errors")
    csv_path.unlink()
    return r


def train_once(
    n: int, *, epochs: int, data: Path, threads: int, env: dict, tmp: Path, timeout_s: float, tag: str
) -> tuple[dict, list[dict]]:
    """``malaria-cells train`` on ``--max-images n`` for ``epochs`` epochs; its measurement and per-epoch rows."""
    run_dir, log = tmp / f"train-{n}-{tag}", tmp / f"train-{n}-{tag}.log"
    caches_before = sorted((tmp / "cache").glob("*.u8"))
    cmd = [*CLI, "train", "--model", TRAIN_MODEL, "--data", str(data), "--max-images", str(n), "--epochs", str(epochs)]
    r = measure([*cmd, "--out", str(run_dir), "--threads", str(threads)], env=env, log=log, timeout_s=timeout_s)
    _check(r, log, f"train on {n} images")
    run = Run.open(run_dir)
    history = run.history()
    counts = {row.get("split"): row for row in run.meta.split_counts}
    last = history[-1]
    r.update(
        cache_warm=sorted((tmp / "cache").glob("*.u8")) == caches_before,
        epoch_s=last["epoch_s"],
        train_images_per_s=last["train_images_per_s"],
        val_accuracy_after_1_epoch=history[0].get("val_accuracy"),
        split_counts=run.meta.split_counts,
        train_images=counts.get("train", {}).get("images"),
        precision=run.meta.precision,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return r, history


def time_to_accuracy(r: dict, history: list[dict], targets: tuple[float, ...]) -> dict[str, Any]:
    """When a multi-epoch run first reached each validation accuracy (training time incl. validation)."""
    return {
        "images": r["max_images"],
        "train_images": r["train_images"],
        "epochs": len(history),
        "process_wall_s": r["wall_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "cache_warm": r["cache_warm"],
        "reached": first_reached(history, targets),
        "history": [
            {k: h.get(k) for k in ("epoch", "elapsed_s", "epoch_s", "val_accuracy", "val_roc_auc")} for h in history
        ],
        "what": "elapsed_s: training time from the first epoch's start (validation and checkpoints included; not "
        "the process start-up, scan or cache load); val_accuracy at threshold 0.5 on the run's validation patients; "
        "the learning-rate schedule spans --epochs, so a longer run may get there at a different epoch",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="images (default: as malaria-cells: $MALARIA_CELLS_DATA, share)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 20000])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians over them")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="train threads (default: all)")
    ap.add_argument("--model", default="models/default.onnx", help="the model predict uses (ONNX file or run)")
    ap.add_argument("--tta-epochs", type=int, default=4, help="time-to-accuracy run at the largest size (0: none)")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.90, 0.95, 0.96], help="val accuracies")
    ap.add_argument("--skip", nargs="*", default=[], choices=["predict", "train"], help="leave a part out")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before one command is killed")
    ap.add_argument("--quick", action="store_true", help="sizes 500 1000 2000, one round (about a minute)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # development: seconds
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeat, args.tta_epochs = [500, 1000, 2000], 1, 2
    if args.tiny:
        args.sizes, args.repeat, args.tta_epochs = [200, 400, 800], 1, 2
    t_start = time.perf_counter()
    machine = machine_info(["malaria-cells", "torch", "onnxruntime", "numpy", "pillow", "imagecodecs"])

    from malaria_cells.data import resolve_data_dir, scan

    data = resolve_data_dir(args.data)
    found = scan(data)
    sizes = sorted(args.sizes)
    if sizes[-1] > len(found.images):
        raise SystemExit(f"{data} holds {len(found.images):,} images, fewer than the largest size {sizes[-1]:,}")
    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))
    # Progress bars off (their refresh is work that is not the command's), the cache in a fresh folder.
    env = {**os.environ, "MALARIA_CELLS_QUIET": "1", "MALARIA_CELLS_CACHE": str(tmp / "cache")}
    common = {"env": env, "tmp": tmp, "timeout_s": args.timeout}
    predict_runs: dict[int, list[dict]] = {n: [] for n in sizes}
    train_runs: dict[int, list[dict]] = {n: [] for n in sizes}
    builds: dict[int, list[dict]] = {n: [] for n in sizes}
    tta = None
    try:
        folders = {n: link_folder(spread(found.images, n), tmp / f"predict-{n}") for n in sizes}
        if "train" not in args.skip:
            # Cold cache, once per size (a second build would not be cold). This also reads every file once, so
            # the page cache is as warm for the first predict round as for the later ones.
            for n in sizes:
                print(f"cold cache build: {n:,} images", flush=True)
                builds[n].append(cold_build(n, data=data, **common))
        for rnd in range(args.repeat):
            for n in sizes:
                if "predict" not in args.skip:
                    print(f"round {rnd + 1}/{args.repeat}: predict {n:,} images", flush=True)
                    r = predict_once(n, folders[n], model=args.model, **common)
                    predict_runs[n].append(r)
                if "train" not in args.skip:
                    print(f"round {rnd + 1}/{args.repeat}: train 1 epoch on {n:,} images", flush=True)
                    r, _ = train_once(n, epochs=1, data=data, threads=args.threads, tag=str(rnd), **common)
                    train_runs[n].append(r)
        if "train" not in args.skip and args.tta_epochs > 0:
            n = sizes[-1]
            print(f"time to accuracy: train {args.tta_epochs} epochs on {n:,} images", flush=True)
            r, history = train_once(n, epochs=args.tta_epochs, data=data, threads=args.threads, tag="tta", **common)
            tta = time_to_accuracy({**r, "max_images": n}, history, tuple(args.targets))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    params = {
        "quick": bool(args.quick or args.tiny),
        "threads": args.threads,
        "repeat": args.repeat,
        "data": str(data),
        "sizes": sizes,
        "model": args.model,
        "tta_epochs": args.tta_epochs,
        "targets": args.targets,
        "skip": args.skip,
    }
    result: dict[str, Any] = {
        "images_chosen": "evenly spread over the share's sorted file list (predict); train: --max-images N, "
        "train's own class-balanced subset (seed 0)",
        "memory_fields": {
            "peak_rss_mb": "ru_maxrss from wait4: the largest process of the command's tree",
            "peak_rss_anon_mb": "peak RssAnon of the command's process (sampled every 50 ms): heap and arrays",
            "peak_rss_file_mb": "peak RssFile (sampled): shared libraries and touched pages of the memory-mapped "
            "cache; page cache, dropped by the kernel under pressure",
        },
    }
    if "predict" not in args.skip:
        result["predict"] = {
            "command": f"malaria-cells predict FOLDER --format csv --out FILE --model {args.model} "
            "(threads: predict's default split between the model and decoding processes)",
            **summarise(predict_runs),
        }
    if "train" not in args.skip:
        extra = ("epoch_s", "train_images_per_s", "train_images", "val_accuracy_after_1_epoch")
        result["train"] = {
            "command": f"malaria-cells train --model {TRAIN_MODEL} --max-images N --epochs 1 --threads {args.threads} "
            "(warm cache)",
            "cache_always_warm": all(r["cache_warm"] for runs in train_runs.values() for r in runs),
            "precision": next((r["precision"] for runs in train_runs.values() for r in runs), None),
            **summarise(train_runs, extra),
        }
        rows = result["train"]["rows"]
        # The epoch alone (no start-up, scan or validation) against the images it trained on.
        result["train"]["fit_epoch_s_vs_train_images"] = line_fit(
            [r["train_images"] for r in rows], [r["epoch_s"] for r in rows]
        )
        result["cache_build"] = {
            "command": "train.prepare_data (scan, class-balanced subset, patient split, decode + letterbox into the "
            "memory-mapped cache) in a fresh process, empty cache; once per size; decoding uses all cores",
            "prepare_s": "prepare_data's own time (wall_s adds the interpreter, imports and worker start-up)",
            **summarise(builds, ("prepare_s",)),
        }
        rows = result["cache_build"]["rows"]
        result["cache_build"]["fit_prepare_s"] = line_fit([r["images"] for r in rows], [r["prepare_s"] for r in rows])
        if tta:
            result["time_to_accuracy"] = {
                "command": f"malaria-cells train --model {TRAIN_MODEL} --max-images {tta['images']} "
                f"--epochs {args.tta_epochs} --threads {args.threads} (warm cache)",
                **tta,
            }
    result["wall_s"] = time.perf_counter() - t_start
    save_result(args.out, name="scaling", command=command_line(), params=params, results=result, machine=machine)
    print_summary(result)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


def print_summary(result: dict) -> None:
    """One line per part and size."""
    for part in ("predict", "train", "cache_build"):
        if part not in result:
            continue
        s = result[part]
        for r in s["rows"]:
            print(
                f"{part:12s} {r['images']:>7,} images  {r['wall_s']:7.1f} s  {r['images_per_s']:7.0f} images/s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB (anon {r['peak_rss_anon_mb'] or 0:5.0f}, "
                f"file {r['peak_rss_file_mb'] or 0:5.0f})"
            )
        # The cache build's own time (prepare_s), not the interpreter and imports around it.
        f = s["fit_prepare_s"] if part == "cache_build" else s["fit_wall_s"]
        q = s["rss_ratio_largest_to_smallest"]
        r2 = f"{f['r2']:.4f}" if f["r2"] is not None else "n/a"
        print(
            f"{part:12s} fit: {f['s_per_1k_images']:.2f} s per 1k images + {f['intercept_s']:.1f} s, R^2 {r2}; "
            f"peak RSS x{q['peak_rss'] or 0:.2f} from {q['sizes'][0]:,} to {q['sizes'][1]:,} images"
        )
    tta = result.get("time_to_accuracy")
    if tta:
        for target, hit in tta["reached"].items():
            where = f"epoch {hit['epoch']}, {hit['elapsed_s']:.0f} s" if hit else f"not within {tta['epochs']} epochs"
            print(f"val accuracy >= {target}: {where} ({tta['images']:,} images)")


if __name__ == "__main__":
    main()
