"""Choose the custom CNN's input size by measurement: same subset, split, epochs and seed at each size.

Run: .venv/bin/python benchmarks/input_size.py [--data DIR] [--sizes 48 64 96] [--max-images 8000] [--epochs 12]
Writes benchmarks/results/input_size.json and prints a table (validation patients; the test split is untouched).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import command_line, machine_info, save_result, sweep, val_metrics
from rich.console import Console
from rich.table import Table

from malaria_cells.data import resolve_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96])
    ap.add_argument("--max-images", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/input_size.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "torch", "numpy"])
    data = resolve_data_dir(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(
            args.sizes,
            lambda size: dict(
                model="custom-cnn",
                input_size=size,
                max_images=args.max_images,
                epochs=args.epochs,
                patience=args.epochs,
            ),
            lambda size, run, wall_s: {
                "input_size": size,
                **val_metrics(run),
                "train_images_per_s": run.meta.to_dict()["train_images_per_s_median"],
                "wall_s": wall_s,
                "best_epoch": run.meta.best_epoch,
            },
            data=data,
            workdir=Path(tmp),
            label=lambda size: f"size{size}",
        )
    t = Table(title=f"custom CNN input size (subset {args.max_images} images, {args.epochs} epochs, val patients)")
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(t)
    params = {"data": str(data), "sizes": args.sizes, "max_images": args.max_images, "epochs": args.epochs}
    save_result(
        args.out, name="input_size", command=command_line(), params=params, results={"rows": rows}, machine=machine
    )


if __name__ == "__main__":
    main()
