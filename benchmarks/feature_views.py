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
import tempfile
from pathlib import Path

from harness import command_line, machine_info, save_result, sweep, train_run, val_metrics
from rich.console import Console
from rich.table import Table

from malaria_cells.data import resolve_data_dir
from malaria_cells.run import Run


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
    machine = machine_info(["malaria-cells", "torch", "timm", "numpy"])
    data = resolve_data_dir(args.data)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = dict(model=args.model, threads=args.threads, cache_dir=str(tmp / "cache"))

        def row(views: int, run: Run, wall_s: float) -> dict:
            out = {
                "views": views,
                **val_metrics(run),
                "val_loss_best": min(r["val_loss"] for r in run.history()),
                "extraction": run.meta.to_dict()["transfer"]["extraction"],
                "wall_s": wall_s,
            }
            if args.finetune_epochs:
                ft, _ = train_run(
                    dict(
                        **common,
                        strategy="finetune",
                        init_from=str(run.path),
                        epochs=args.finetune_epochs,
                        feature_views=views,
                    ),
                    data=data,
                    run_dir=tmp / f"finetune{views}",
                )
                history = ft.history()
                out["finetune"] = {
                    "val_roc_auc_per_epoch": [r["val_roc_auc"] for r in history],
                    "val_loss_per_epoch": [r["val_loss"] for r in history],
                    "train_loss_per_epoch": [r["train_loss"] for r in history],
                    "val_accuracy": ft.meta.val_metrics_at_threshold["accuracy"],
                }
            return out

        rows = sweep(
            args.views,
            lambda views: dict(
                **common,
                strategy="frozen",
                max_images=args.max_images,
                epochs=args.epochs,
                patience=args.epochs,
                feature_views=views,
            ),
            row,
            data=data,
            workdir=tmp,
            label=lambda views: f"views{views}",
        )
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
    save_result(
        args.out,
        name="feature_views",
        command=command_line(),
        params=vars(args),
        results={"rows": rows},
        machine=machine,
    )


if __name__ == "__main__":
    main()
