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
import tempfile
from pathlib import Path

from harness import command_line, machine_info, save_result, sweep, val_metrics
from rich.console import Console
from rich.table import Table

from malaria_cells.data import resolve_data_dir
from malaria_cells.run import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 64, 128, 256, 512], help="0 = linear head")
    ap.add_argument("--max-images", type=int, default=None, help="class-balanced subset (default: all)")
    ap.add_argument("--out", default="benchmarks/results/frozen_head.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "torch", "timm", "numpy"])
    data = resolve_data_dir(args.data)

    def row(hidden: int, run: Run, wall_s: float) -> dict:
        meta = run.meta.to_dict()
        return {
            "head_hidden": hidden,
            "trainable_parameters": meta["trainable_parameters"],
            "best_epoch": run.meta.best_epoch,
            **val_metrics(run),
            "head_train_s": meta["train_time_s"] - meta["setup_s"],
        }

    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(
            args.hidden,
            lambda hidden: dict(model=args.model, strategy="frozen", head_hidden=hidden, max_images=args.max_images),
            row,
            data=data,
            workdir=Path(tmp),
            label=lambda hidden: f"head{hidden}",
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
    params = {"model": args.model, "hidden": args.hidden, "data": str(data), "max_images": args.max_images}
    save_result(
        args.out, name="frozen_head", command=command_line(), params=params, results={"rows": rows}, machine=machine
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
