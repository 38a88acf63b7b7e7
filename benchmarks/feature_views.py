"""How many cached augmented views per training cell a frozen-backbone head (and a fine-tune from it) needs.

Same subset, split and seed for each count; the head trains on the cached features (a random view per cell and
epoch) and is scored on the validation patients (the test split is untouched); with ``--finetune-epochs`` a
fine-tuning run then starts from each head and trains on the cached activations of the same views. Views are
filled incrementally in one feature cache, so each count only extracts the views the previous one lacked.

Run: .venv/bin/python benchmarks/feature_views.py [--data DIR] [--views 1 2 4] [--max-images 2000]
Writes benchmarks/results/feature_views.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=3, help="0: frozen heads only")
    ap.add_argument("--out", default="benchmarks/results/feature_views.json")
    args = ap.parse_args()
    data = resolve_data_dir(args.data)
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for views in args.views:
            cfg = resolve_config(
                overrides=dict(
                    model=args.model,
                    strategy="frozen",
                    max_images=args.max_images,
                    epochs=args.epochs,
                    patience=args.epochs,
                    feature_views=views,
                    threads=args.threads,
                    cache_dir=str(Path(tmp) / "cache"),
                )
            )
            t0 = time.perf_counter()
            run = train(config=cfg, data_dir=data, run_dir=Path(tmp) / f"views{views}")
            meta = json.loads((run / "metadata.json").read_text())
            vm = meta["val_metrics_at_threshold"]
            rows.append(
                {
                    "views": views,
                    "val_accuracy": vm["accuracy"],
                    "val_roc_auc": vm["roc_auc"],
                    "val_mcc": vm["mcc"],
                    "val_loss_best": min(r["val_loss"] for r in json.loads(f"[{','.join(_lines(run))}]")),
                    "extraction": meta["transfer"]["extraction"],
                    "wall_s": time.perf_counter() - t0,
                }
            )
            if args.finetune_epochs:
                ft = train(
                    config=resolve_config(
                        overrides=dict(
                            model=args.model,
                            strategy="finetune",
                            init_from=str(run),
                            epochs=args.finetune_epochs,
                            feature_views=views,
                            threads=args.threads,
                            cache_dir=str(Path(tmp) / "cache"),
                        )
                    ),
                    data_dir=data,
                    run_dir=Path(tmp) / f"finetune{views}",
                )
                history = json.loads(f"[{','.join(_lines(ft))}]")
                rows[-1]["finetune"] = {
                    "val_roc_auc_per_epoch": [r["val_roc_auc"] for r in history],
                    "val_loss_per_epoch": [r["val_loss"] for r in history],
                    "train_loss_per_epoch": [r["train_loss"] for r in history],
                    "val_accuracy": json.loads((ft / "metadata.json").read_text())["val_metrics_at_threshold"][
                        "accuracy"
                    ],
                }
            Console().print(rows[-1])
    t = Table(title=f"{args.model} frozen head vs cached views (subset {args.max_images}, val patients)")
    for col in ("views", "val_accuracy", "val_roc_auc", "val_mcc", "val_loss_best", "extracted"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["views"]),
            *(f"{r[k]:.4f}" for k in ("val_accuracy", "val_roc_auc", "val_mcc", "val_loss_best")),
            str(r["extraction"]["computed"]),
        )
    Console().print(t)
    atomic_write_json(
        Path(args.out),
        {"config": vars(args), "loadavg_at_start": load, "rows": rows, "date": time.strftime("%Y-%m-%d")},
    )


def _lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


if __name__ == "__main__":
    main()
