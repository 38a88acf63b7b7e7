"""Choose the custom CNN's input size by measurement: same subset, split, epochs and seed at each size.

Run: .venv/bin/python benchmarks/input_size.py [--data DIR] [--sizes 48 64 96] [--max-images 8000] [--epochs 12]
Writes benchmarks/results/input_size.json and prints a table (validation patients; the test split is untouched).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from malaria_cells.config import resolve_config
from malaria_cells.data import resolve_data_dir
from malaria_cells.io import atomic_write_json
from malaria_cells.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96])
    ap.add_argument("--max-images", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/input_size.json")
    args = ap.parse_args()
    data = resolve_data_dir(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            cfg = resolve_config(
                overrides=dict(
                    model="custom-cnn",
                    input_size=size,
                    max_images=args.max_images,
                    epochs=args.epochs,
                    patience=args.epochs,
                )
            )
            t0 = time.perf_counter()
            run = train(config=cfg, data_dir=data, run_dir=Path(tmp) / f"size{size}")
            wall = time.perf_counter() - t0
            meta = json.loads((run / "metadata.json").read_text())
            vm = meta["val_metrics_at_threshold"]
            rows.append(
                {
                    "input_size": size,
                    "val_accuracy": vm["accuracy"],
                    "val_roc_auc": vm["roc_auc"],
                    "val_mcc": vm["mcc"],
                    "train_images_per_s": meta["train_images_per_s_median"],
                    "wall_s": wall,
                    "best_epoch": meta["best_epoch"],
                }
            )
    t = Table(title=f"custom CNN input size (subset {args.max_images} images, {args.epochs} epochs, val patients)")
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(t)
    atomic_write_json(Path(args.out), {"config": vars(args), "rows": rows, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
