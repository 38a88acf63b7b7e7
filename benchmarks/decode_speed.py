"""How fast cells go from WebP bytes to the model's input, per decoder and thread count, and end to end.

Decoders: Pillow (what ``malaria_cells.preprocess`` used before imagecodecs), imagecodecs' libwebp binding (what it
uses now), and OpenCV when it is installed (emfet's decoder, for reference). Each is timed decoding only and
decoding + the 48 px letterbox, on 1 thread and in a pool of all cores (as ``Classifier`` decodes a batch), on the
same in-memory file bytes (disk reads excluded; the OS cache serves them anyway). Then the shipped model end to
end from files (``Classifier.predict``: read, decode, letterbox, ONNX int8, batch 64): model threads x decode
threads in this process, then decode processes pipelined ahead of the model (``decode_processes``: what
``malaria-cells predict`` uses for large inputs), split half/half and all/all.
Rounds are interleaved (every variant once per round, so a change of load hits all alike); medians are reported.

Run: .venv/bin/python benchmarks/decode_speed.py [--data DIR] [--files 512] [--repeat 5]
Writes benchmarks/results/decode_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import command_line, interleaved_rates, machine_info, save_result, spread
from PIL import Image
from rich.console import Console
from rich.table import Table

from malaria_cells import preprocess
from malaria_cells.data import resolve_data_dir, scan
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import decode_image, letterbox

try:
    import cv2
except ImportError:
    cv2 = None


@contextlib.contextmanager
def pillow_only() -> Iterator[None]:
    """Decode WebP with Pillow (imagecodecs switched off) inside the block; not thread-safe: enter it from one
    thread only (Classifier's decode threads just read the switch)."""
    saved, preprocess.imagecodecs = preprocess.imagecodecs, None
    try:
        yield
    finally:
        preprocess.imagecodecs = saved


def decoders() -> dict[str, Callable[[bytes], Image.Image]]:
    """Name -> bytes-to-RGB-image function."""
    out: dict[str, Callable[[bytes], Image.Image]] = {}

    def pillow(b: bytes) -> Image.Image:
        return preprocess._decode_pillow(b, name="<bytes>", max_pixels=preprocess.MAX_PIXELS)

    out["Pillow"] = pillow
    if preprocess.imagecodecs is not None:
        out["imagecodecs"] = decode_image
    if cv2 is not None:
        cv2.setNumThreads(1)

        def opencv(b: bytes) -> Image.Image:
            bgr = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
            return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

        out["OpenCV"] = opencv
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--files", type=int, default=512, help="share files, evenly spread over the sorted list")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=48, help="letterbox side in px (the shipped model's)")
    ap.add_argument("--model", default=None, help="ONNX file for the end-to-end rows (default: the shipped one)")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = ap.parse_args()
    machine = machine_info(
        ["pillow", "imagecodecs", "onnxruntime", "numpy"], {"opencv": cv2.__version__} if cv2 else {}
    )
    data = resolve_data_dir(args.data)
    images = scan(data).images
    paths = [im.path for im in spread(images, args.files)]
    blobs = [Path(p).read_bytes() for p in paths]
    cores = len(os.sched_getaffinity(0))
    pools = {1: None, cores: ThreadPoolExecutor(cores)} if cores > 1 else {1: None}

    variants: dict[str, Callable[[], object]] = {}
    for name, dec in decoders().items():
        for stage, fn in (("decode", dec), (f"decode + letterbox {args.size}", None)):
            fn = fn or (lambda b, dec=dec: letterbox(dec(b), args.size))
            for threads, pool in pools.items():
                variants[f"{name} | {stage} | {threads}"] = (
                    (lambda fn=fn: [fn(b) for b in blobs])
                    if pool is None
                    else (lambda fn=fn, pool=pool: list(pool.map(fn, blobs)))
                )
    # End to end: threads only (the model and the decode threads share the cores), then decode processes.
    clfs = []
    for threads, procs in [(1, 0), *([(cores, 0), (cores - cores // 2, cores // 2), (cores, cores)] * (cores > 1))]:
        clf = Classifier.load(args.model, threads=threads, decode_processes=procs)
        clfs.append(clf)
        label = f"{threads} | {procs}"
        if procs == 0:
            variants[f"Pillow | end to end, shipped model | {label}"] = lambda clf=clf: _pillow_predict(clf, paths)
        if preprocess.imagecodecs is not None:
            variants[f"imagecodecs | end to end, shipped model | {label}"] = lambda clf=clf: clf.predict(paths)

    for fn in variants.values():  # warm-up: thread pools, ONNX sessions
        fn()
    rates = interleaved_rates(variants, len(blobs), args.repeat)
    for clf in clfs:
        clf.close()
    rows = []
    for k, r in rates.items():
        decoder, stage, threads, *procs = k.split(" | ")
        rows.append(
            {
                "decoder": decoder,
                "stage": stage,
                "threads": int(threads),  # decode threads; end to end, the model's threads
                "decode_processes": int(procs[0]) if procs else 0,
                "cells_per_s": r["median"],
            }
        )
    # The reference: Pillow in this process with the same threads (all cores for the rows with processes).
    base = {(r["stage"], r["threads"]): r["cells_per_s"] for r in rows if r["decoder"] == "Pillow"}
    for r in rows:
        ref = base.get((r["stage"], r["threads"])) if not r["decode_processes"] else base.get((r["stage"], cores))
        r["vs_pillow"] = r["cells_per_s"] / ref if ref else None

    table = Table(title=f"WebP -> model input, {len(blobs)} share files, median of {args.repeat} interleaved rounds")
    for col in ("stage", "decoder", "threads", "decode processes", "cells/s", "vs Pillow"):
        table.add_column(col, justify="left" if col in ("stage", "decoder") else "right")
    for r in sorted(rows, key=lambda r: (r["stage"], r["decode_processes"], r["threads"], r["decoder"])):
        table.add_row(
            r["stage"],
            r["decoder"],
            str(r["threads"]),
            str(r["decode_processes"]),
            f"{r['cells_per_s']:,.0f}",
            f"{r['vs_pillow']:.2f}x" if r["vs_pillow"] else "—",
        )
    Console().print(table)
    params = {"data": str(data), "files_requested": args.files, "repeat": args.repeat, "letterbox_px": args.size}
    results = {"files": len(blobs), "rows": rows}
    save_result(args.out, name="decode_speed", command=command_line(), params=params, results=results, machine=machine)
    print(f"wrote {args.out}")


def _pillow_predict(clf: Classifier, paths: list[str]) -> object:
    with pillow_only():
        return clf.predict(paths)


if __name__ == "__main__":
    main()
