"""Smear pipeline speed: photos/s and cells/s end to end from JPEG files, by stage, and memory over many photos.

1. Stages, one thread, one photo at a time (medians over the photos): decode (JPEG -> RGB), detection, cropping
   (masks + training form), classification.
2. End to end (``smear.iter_fields``: decode + detect + crop + classify, nothing written), 1 and 2 photos at a time,
   and 2 at a time with ``--stain-normalize``, interleaved rounds, median rates.
3. The per-cell-file path beside it, in the same run: as many NIH cell files as the photos held cells, classified
   by ``Classifier.iter_predict`` (read + decode + letterbox + model) with both cores.
4. Memory: ``malaria-cells smear`` (overlays and tables written) on a folder of 100 and of 1,000 photos (the
   development photos repeated through symbolic links), peak RSS of the process.

    python benchmarks/smear_speed.py --iml ../shared/iml-malaria --nih ../shared/nih-cell-images
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import command_line, interleaved_rates, machine_info, save_result

from malaria_cells.progress import available_cores
from malaria_cells.smear import SmearAnalyzer, crop_cells, iter_fields

RESULTS = Path(__file__).resolve().parent / "results"


def stages(analyzer: SmearAnalyzer, photos: list[Path]) -> dict[str, float]:
    """Median ms per photo of each stage, one thread."""
    from malaria_cells.predict import to_image
    from malaria_cells.stain import normalize_cells

    t: dict[str, list[float]] = {"decode": [], "detect": [], "crop": [], "classify": [], "stain_normalize": []}
    cells = []
    for p in photos:
        t0 = time.perf_counter()
        rgb = np.asarray(to_image(p))
        t1 = time.perf_counter()
        det = analyzer.detector(rgb)
        t2 = time.perf_counter()
        crops, _, ok, _ = crop_cells(rgb, det.boxes, size=analyzer.classifier.prep.input_size)
        t3 = time.perf_counter()
        analyzer.classifier.predict_prepared(crops[ok])
        t4 = time.perf_counter()
        normalize_cells(crops[ok])  # --stain-normalize only: timed apart, not in the total
        t5 = time.perf_counter()
        spans = (("decode", t0, t1), ("detect", t1, t2), ("crop", t2, t3), ("classify", t3, t4))
        for k, a, b in (*spans, ("stain_normalize", t4, t5)):
            t[k].append(1000 * (b - a))
        cells.append(len(det))
    out = {f"{k}_ms": float(np.median(v)) for k, v in t.items()}
    out["total_ms"] = sum(v for k, v in out.items() if k != "stain_normalize_ms")
    out["cells_per_photo"] = float(np.mean(cells))
    return out


def peak_rss(cmd_args: list[str], tmp: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``malaria-cells CMD_ARGS`` run in a child process that reports its own
    ``ru_maxrss`` when it ends."""
    report = tmp / "maxrss"
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['malaria-cells', *{cmd_args!r}]\n"
        "try:\n    runpy.run_module('malaria_cells.cli', run_name='__main__')\n"
        f"finally:\n    open({str(report)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "MALARIA_CELLS_QUIET": "1"}
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"malaria-cells {' '.join(cmd_args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(report.read_text()) / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--nih", type=Path, default=Path("../shared/nih-cell-images"))
    ap.add_argument("--photos", type=int, default=40, help="photos per end-to-end round")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", type=int, nargs="*", default=[100, 1000], help="photo counts for the memory runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "smear_speed.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "onnxruntime", "pillow", "scipy"))
    all_photos = sorted((args.iml / "fields").glob("*.JPG"))
    photos = all_photos[: args.photos]
    results: dict = {"cores": available_cores()}

    one = SmearAnalyzer.load(workers=1)
    results["stages_one_thread"] = stages(one, photos)
    print("stages (ms per photo, one thread):", {k: round(v, 1) for k, v in results["stages_one_thread"].items()})

    two = SmearAnalyzer.load(workers=2)
    two_norm = SmearAnalyzer.load(workers=2, stain_normalize=True)
    n_cells = sum(len(r.cells) for r in iter_fields(one, photos))  # also warms both analyzers' caches
    list(iter_fields(two, photos[:4], workers=2))
    list(iter_fields(two_norm, photos[:4], workers=2))
    rates = interleaved_rates(
        {
            "1 photo at a time": lambda: list(iter_fields(one, photos)),
            "2 photos at a time": lambda: list(iter_fields(two, photos, workers=2)),
            "2 photos at a time, --stain-normalize": lambda: list(iter_fields(two_norm, photos, workers=2)),
        },
        len(photos),
        args.repeat,
    )
    results["end_to_end"] = {
        k: {"photos_per_s": v["median"], "cells_per_s": v["median"] * n_cells / len(photos), "rounds": v["rounds"]}
        for k, v in rates.items()
    }
    results["cells_per_photo"] = n_cells / len(photos)
    for k, v in results["end_to_end"].items():
        print(f"end to end, {k}: {v['photos_per_s']:.1f} photos/s, {v['cells_per_s']:,.0f} cells/s")

    from malaria_cells.predict import Classifier

    files = [str(p) for p in sorted((args.nih / "Uninfected").glob("*.webp"))[:n_cells]]
    clf = Classifier.load()
    list(clf.iter_predict(files[:256]))
    cell_rates = interleaved_rates({"cell files": lambda: list(clf.iter_predict(files))}, len(files), args.repeat)
    results["cell_files"] = {"cells_per_s": cell_rates["cell files"]["median"], "files": len(files)}
    print(f"per-cell files (NIH WebP, predict path): {results['cell_files']['cells_per_s']:,.0f} cells/s")

    results["memory"] = {}
    for n in args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "slide"
            folder.mkdir()
            for i in range(n):
                src = all_photos[i % len(all_photos)]
                (folder / f"{i:05d}_{src.name}").symlink_to(src.resolve())
            rss, wall = peak_rss(["smear", str(folder), "--out", str(Path(tmp) / "out")], Path(tmp))
        results["memory"][str(n)] = {"peak_rss_mb": rss, "wall_s": wall, "photos_per_s_with_outputs": n / wall}
        print(f"smear CLI on {n} photos: peak RSS {rss:.0f} MB, {wall:.1f} s ({n / wall:.1f} photos/s with outputs)")
    save_result(
        args.out,
        name="smear_speed",
        command=command_line(),
        params={"photos": len(photos), "repeat": args.repeat, "memory": args.memory},
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
