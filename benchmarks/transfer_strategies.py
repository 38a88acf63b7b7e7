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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from harness import command_line, machine_info, save_result, sweep
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from malaria_cells.data import resolve_data_dir
from malaria_cells.models import build_model
from malaria_cells.run import Run
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


def settings(models: list[str], tmp: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(run label, cache folder, config overrides) of every run, in order; a fine-tune starts from the cold frozen run
    (its folder is ``tmp / label``). Lazy, so each model's weights are fetched just before its runs."""
    yield "custom-cnn-scratch", "cache", dict(model="custom-cnn", strategy="scratch")
    for name in models:
        source, real = weights_for(name, tmp)
        tag = "" if real else "-random-weights-speed-only"
        frozen = f"{name}-frozen-cold{tag}"
        yield frozen, "cache", dict(model=name, strategy="frozen", weights=source)
        yield f"{name}-frozen-warm{tag}", "cache", dict(model=name, strategy="frozen", weights=source)
        finetune = dict(model=name, strategy="finetune", init_from=str(tmp / frozen))
        yield f"{name}-finetune-cached{tag}", "cache", finetune
        # Another cache folder has no activations, and epochs <= 2 x views: the frozen part runs every step.
        yield f"{name}-finetune-online{tag}", "cache2", finetune
        yield f"{name}-scratch{tag}", "cache", dict(model=name, strategy="scratch")


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
    machine = machine_info(["malaria-cells", "torch", "timm", "numpy"])
    data = resolve_data_dir(args.data)

    def row(setting: tuple[str, str, dict], run: Run, wall_s: float) -> dict:
        meta = run.meta.to_dict()
        tr = meta.get("transfer") or {}
        return {
            "run": setting[0],
            "model": run.meta.model,
            "strategy": run.meta.strategy,
            "input_size": run.meta.preprocessing.input_size,
            "train_cells": next(r["images"] for r in run.meta.split_counts if r["split"] == "train"),
            "wall_s": wall_s,
            "setup_s": meta["setup_s"],
            "epoch_cells_per_s": meta["train_images_per_s_median"],
            "extraction": tr.get("extraction"),
            "frozen_part": tr.get("frozen_part"),
        }

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = dict(max_images=args.max_images, epochs=args.epochs, patience=100, threads=args.threads)
        rows = sweep(
            settings(args.models, tmp),
            lambda s: dict(**common, feature_views=args.views, cache_dir=str(tmp / s[1]), **s[2]),
            row,
            data=data,
            workdir=tmp,
            label=lambda s: s[0],
        )
    t = Table(title=f"strategy throughput ({args.max_images} cells subset, {args.epochs} epoch(s), {args.views} views)")
    cols = ["run", "train_cells", "wall_s", "setup_s", "epoch_cells_per_s"]
    for col in [*cols, "extraction cells/s"]:
        t.add_column(col, justify="right")
    for r in rows:
        ext = (r["extraction"] or {}).get("images_per_s")
        t.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols), str(ext or "—"))
    Console().print(t)
    results = {"rows": rows, "torch_threads": torch.get_num_threads()}
    save_result(
        args.out,
        name="transfer_strategies",
        command=command_line(),
        params=vars(args),
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
