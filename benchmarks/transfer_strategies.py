"""Training throughput of each strategy on a small subset: scratch, frozen (cold and warm feature cache), finetune
(on cached frozen-part activations and online), so the cost of a full ``reproduce`` can be estimated.

Every run trains one class-balanced subset at the model's default input size for ``--epochs`` epochs. ResNet50V2's
ImageNet weights cannot be downloaded here, so when they are unavailable it runs from a random-weights file in
timm's names: its speed numbers hold, its accuracy means nothing (and is not reported).

Run: .venv/bin/python benchmarks/transfer_strategies.py [--data DIR] [--max-images 600] [--models efficientnet-lite0]
Writes benchmarks/results/transfer_strategies.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from malaria_cells.config import resolve_config
from malaria_cells.data import resolve_data_dir
from malaria_cells.io import atomic_write_json
from malaria_cells.models import build_model
from malaria_cells.train import train
from malaria_cells.weights import TIMM_ARCH, WeightsUnavailable, load_pretrained


def weights_for(name: str, tmp: Path) -> tuple[str, bool]:
    """ImageNet when it can be had, else a random-weights file (speed only). Returns (source, real)."""
    try:
        load_pretrained(build_model(name).backbone, name=name, source="imagenet")
        return "imagenet", True
    except WeightsUnavailable:
        path = tmp / f"{name}-random.safetensors"
        state = timm.create_model(TIMM_ARCH[name], num_classes=1000).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return str(path), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "resnet50v2"])
    ap.add_argument("--max-images", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/transfer_strategies.json")
    args = ap.parse_args()
    data = resolve_data_dir(args.data)
    load = os.getloadavg()
    rows = []

    def run(label: str, tmp: Path, cache: str, **kw) -> Path:
        cfg = resolve_config(
            overrides=dict(
                max_images=args.max_images,
                epochs=args.epochs,
                patience=100,
                threads=args.threads,
                feature_views=args.views,
                cache_dir=str(tmp / cache),
                **kw,
            )
        )
        t0 = time.perf_counter()
        out = train(config=cfg, data_dir=data, run_dir=tmp / label)
        meta = json.loads((out / "metadata.json").read_text())
        tr = meta.get("transfer") or {}
        row = {
            "run": label,
            "model": cfg.model,
            "strategy": cfg.strategy,
            "input_size": meta["preprocessing"]["input_size"],
            "train_cells": next(r["images"] for r in meta["split_counts"] if r["split"] == "train"),
            "wall_s": time.perf_counter() - t0,
            "setup_s": meta["setup_s"],
            "epoch_cells_per_s": meta["train_images_per_s_median"],
            "extraction": tr.get("extraction"),
            "frozen_part": tr.get("frozen_part"),
        }
        rows.append(row)
        Console().print(row)
        return out

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run("custom-cnn-scratch", tmp, "cache", model="custom-cnn", strategy="scratch")
        for name in args.models:
            source, real = weights_for(name, tmp)
            tag = "" if real else "-random-weights-speed-only"
            frozen = run(f"{name}-frozen-cold{tag}", tmp, "cache", model=name, strategy="frozen", weights=source)
            run(f"{name}-frozen-warm{tag}", tmp, "cache", model=name, strategy="frozen", weights=source)
            run(f"{name}-finetune-cached{tag}", tmp, "cache", model=name, strategy="finetune", init_from=str(frozen))
            # Another cache folder has no activations, and epochs <= 2 x views: the frozen part runs every step.
            run(f"{name}-finetune-online{tag}", tmp, "cache2", model=name, strategy="finetune", init_from=str(frozen))
            run(f"{name}-scratch{tag}", tmp, "cache", model=name, strategy="scratch")
    t = Table(title=f"strategy throughput ({args.max_images} cells subset, {args.epochs} epoch(s), {args.views} views)")
    cols = ["run", "train_cells", "wall_s", "setup_s", "epoch_cells_per_s"]
    for col in [*cols, "extraction cells/s"]:
        t.add_column(col, justify="right")
    for r in rows:
        ext = (r["extraction"] or {}).get("images_per_s")
        t.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols), str(ext or "—"))
    Console().print(t)
    atomic_write_json(
        Path(args.out),
        {
            "config": vars(args),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": load,
            "rows": rows,
            "date": time.strftime("%Y-%m-%d"),
        },
    )


if __name__ == "__main__":
    main()
