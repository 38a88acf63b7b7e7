"""Which head a frozen ImageNet backbone needs: linear, or one hidden layer of several widths.

Every head trains with the frozen strategy's defaults on the same patient-level split (seed 0, the split
``malaria-cells reproduce`` uses) and is scored on the validation patients only: the test split is untouched, so
the choice does not peek at the numbers it is reported with. The backbone features come from the feature cache
(the first run extracts them: ~8 min for Lite0 on the whole share on 2 cores; later runs take seconds).

Run: .venv/bin/python benchmarks/frozen_head.py [--data DIR] [--model efficientnet-lite0] [--hidden 0 64 128 256 512]
Writes benchmarks/results/frozen_head.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchinfo import git_state, package_versions
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
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 64, 128, 256, 512], help="0 = linear head")
    ap.add_argument("--max-images", type=int, default=None, help="class-balanced subset (default: all)")
    ap.add_argument("--out", default="benchmarks/results/frozen_head.json")
    args = ap.parse_args()
    data = resolve_data_dir(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            cfg = resolve_config(
                overrides=dict(model=args.model, strategy="frozen", head_hidden=hidden, max_images=args.max_images)
            )
            run = train(config=cfg, data_dir=data, run_dir=Path(tmp) / f"head{hidden}")
            meta = json.loads((run / "metadata.json").read_text())
            val = meta["val_metrics_at_threshold"]
            rows.append(
                {
                    "head_hidden": hidden,
                    "trainable_parameters": meta["trainable_parameters"],
                    "best_epoch": meta["best_epoch"],
                    "val_accuracy": val["accuracy"],
                    "val_roc_auc": val["roc_auc"],
                    "val_mcc": val["mcc"],
                    "val_cells": val["n"],
                    "head_train_s": meta["train_time_s"] - meta["setup_s"],
                }
            )
    table = Table(title=f"{args.model} frozen: head vs validation metrics (val patients, threshold on val)")
    for col in ("head", "trainable params", "best epoch", "val accuracy", "val AUC", "val MCC"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            "linear" if r["head_hidden"] == 0 else f"MLP {r['head_hidden']}",
            f"{r['trainable_parameters']:,}",
            str(r["best_epoch"]),
            f"{100 * r['val_accuracy']:.2f} %",
            f"{r['val_roc_auc']:.4f}",
            f"{r['val_mcc']:.3f}",
        )
    Console().print(table)
    commit, dirty = git_state()
    atomic_write_json(
        Path(args.out),
        {
            "benchmark": "frozen_head",
            "command": "python benchmarks/frozen_head.py --hidden " + " ".join(map(str, args.hidden)),
            "model": args.model,
            "data": str(data),
            "max_images": args.max_images,
            "rows": rows,
            "packages": package_versions(["torch", "timm", "numpy"]),
            "git_commit": commit,
            "git_dirty": dirty,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
