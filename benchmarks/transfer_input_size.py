"""Choose the transfer backbones' input size by measurement: 128 px (the cells' native ~130 px) vs 224 px (ImageNet's).

For each backbone and size: inference speed of the whole model (cells/s, wall and per CPU-second, batch 64, fp32,
best of ``--repeat`` passes) and, where its ImageNet weights can be had, the validation accuracy/AUC of a
frozen-backbone head trained on the same class-balanced subset, split and seed (validation patients; the test
split is untouched), with the feature extraction time. The CPU is shared here, so the per-CPU-second rate is the
steadier number; the load average at the start is recorded.

Run: .venv/bin/python benchmarks/transfer_input_size.py [--data DIR] [--sizes 128 224] [--max-images 2000]
Writes benchmarks/results/transfer_input_size.json and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import command_line, machine_info, save_result, sweep, val_metrics
from rich.console import Console
from rich.table import Table

from malaria_cells.data import resolve_data_dir
from malaria_cells.models import build_model, set_threads
from malaria_cells.run import Run
from malaria_cells.weights import WeightsUnavailable, load_pretrained

MODELS = ("efficientnet-lite0", "resnet50v2")


def inference_rate(model: torch.nn.Module, size: int, *, batch: int, repeat: int) -> tuple[float, float]:
    """(cells per wall second, cells per CPU second) of the best of ``repeat`` timed batches."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    best = (0.0, 0.0)
    with torch.inference_mode():
        model(x[:8])
        for _ in range(repeat):
            w, c = time.perf_counter(), time.process_time()
            model(x)
            w, c = time.perf_counter() - w, time.process_time() - c
            best = max(best, (batch / w, batch / c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--max-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--views", type=int, default=1, help="cached views per training cell (1: no augmentation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/transfer_input_size.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "torch", "timm", "numpy"])
    set_threads(args.threads)
    data = resolve_data_dir(args.data)

    def speed(name: str, size: int) -> dict:
        wall, cpu = inference_rate(build_model(name), size, batch=64, repeat=args.repeat)
        return {"model": name, "input_size": size, "infer_cells_per_s": wall, "infer_cells_per_cpu_s": cpu}

    def row(setting: tuple[str, int], run: Run, wall_s: float) -> dict:
        meta = run.meta.to_dict()
        return {
            **speed(*setting),
            **val_metrics(run),
            "extraction": meta["transfer"]["extraction"],
            "head_train_s": meta["train_time_s"] - meta["setup_s"],
            "wall_s": wall_s,
        }

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                load_pretrained(build_model(name).backbone, name=name, source="imagenet")
            except WeightsUnavailable as e:
                for size in args.sizes:
                    rows.append({**speed(name, size), "frozen_head": f"not measured: {str(e).split(' (')[0]}"})
                    Console().print(rows[-1])
                continue
            rows += sweep(
                [(name, size) for size in args.sizes],
                lambda setting: dict(
                    model=setting[0],
                    strategy="frozen",
                    input_size=setting[1],
                    max_images=args.max_images,
                    epochs=args.epochs,
                    patience=args.epochs,
                    feature_views=args.views,
                    threads=args.threads,
                    cache_dir=str(Path(tmp) / "cache"),
                ),
                row,
                data=data,
                workdir=Path(tmp),
                label=lambda setting: f"{setting[0]}-{setting[1]}",
            )
    t = Table(title=f"transfer input size (subset {args.max_images}, frozen head, {args.views} view(s), val patients)")
    cols = ["model", "input_size", "infer_cells_per_s", "infer_cells_per_cpu_s", "val_accuracy", "val_roc_auc"]
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols))
    Console().print(t)
    results = {"rows": rows, "torch_threads": torch.get_num_threads()}
    save_result(
        args.out,
        name="transfer_input_size",
        command=command_line(),
        params=vars(args),
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
