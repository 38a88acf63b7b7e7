"""Measure what the decoded-image cache saves: one epoch's worth of inputs from files vs from the memmap.

Run: .venv/bin/python benchmarks/cache_speedup.py [--data DIR] [--size 64] [--n 5000] [--repeats 3]
Prints a table and writes benchmarks/results/cache_speedup.json. Single process for both paths, so the ratio
is per core; the cache build itself decodes in parallel on all cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from harness import command_line, machine_info, save_result
from rich.console import Console
from rich.table import Table

from malaria_cells.cache import build_or_load
from malaria_cells.data import resolve_data_dir, scan
from malaria_cells.preprocess import letterbox, load_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cache_speedup.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "numpy", "pillow", "imagecodecs"])
    found = scan(resolve_data_dir(args.data))
    rng = np.random.default_rng(0)
    images = [found.images[i] for i in sorted(rng.choice(len(found.images), size=args.n, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_or_load(images=images, size=args.size, root=found.root, cache_dir=tmp)
        build_s = time.perf_counter() - t0
        decode, mmap = [], []
        for _ in range(args.repeats):
            order = rng.permutation(len(images))
            t0 = time.perf_counter()
            for i in order[:1000]:
                letterbox(load_image(images[i].path), args.size)
            decode.append((time.perf_counter() - t0) / 1000 * len(images))
            t0 = time.perf_counter()
            for a in range(0, len(order), 64):  # batches of 64 in random order, as training reads them
                np.array(cache.array[np.sort(order[a : a + 64])])
            mmap.append(time.perf_counter() - t0)
    params = {"data": found.root, "images": len(images), "size": args.size, "repeats": args.repeats}
    res = {
        "build_s_parallel": build_s,
        "epoch_decode_s_median": statistics.median(decode),
        "epoch_cache_s_median": statistics.median(mmap),
        "speedup": statistics.median(decode) / statistics.median(mmap),
    }
    t = Table(title=f"inputs for one epoch of {len(images):,} images at {args.size}px (one process)")
    t.add_column("path")
    t.add_column("seconds (median)", justify="right")
    t.add_row("decode + letterbox from files", f"{res['epoch_decode_s_median']:.2f}")
    t.add_row("read from the memmap cache", f"{res['epoch_cache_s_median']:.3f}")
    t.add_row("speed-up", f"{res['speedup']:.0f}x")
    t.add_row("building the cache once (all cores)", f"{build_s:.2f}")
    Console().print(t)
    save_result(args.out, name="cache_speedup", command=command_line(), params=params, results=res, machine=machine)


if __name__ == "__main__":
    main()
