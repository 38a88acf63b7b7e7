"""Training: one run folder per run, resumable after a kill, with early stopping and a threshold chosen on val.

A run folder holds ``config.yaml`` (resolved), ``split.csv``, ``metrics.jsonl`` (one line per epoch),
``metadata.json`` (model, preprocessing, classes, threshold, versions, data hash), ``best.safetensors``,
``last.safetensors`` and ``state.pt`` (optimizer, schedule, epoch, RNG: what ``--resume`` needs).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import platform
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from malaria_cells import metrics as M
from malaria_cells.cache import build_or_load
from malaria_cells.config import TrainConfig, load_config, save_config
from malaria_cells.data import CLASSES, POSITIVE, CellImage, Scan, scan
from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text, read_jsonl
from malaria_cells.models import (
    autocast,
    build_model,
    count_parameters,
    default_device,
    get_spec,
    predict_logits,
    resolve_precision,
    set_threads,
    sigmoid,
    to_input,
)
from malaria_cells.preprocess import Preprocessing
from malaria_cells.progress import console, make_progress
from malaria_cells.split import Split, describe, load_split, make_split, save_split

PACKAGES = ("malaria-cells", "torch", "timm", "numpy", "pillow", "scikit-learn", "onnxruntime")


@dataclass
class Prepared:
    """Data ready for training: the images, the split, and a uint8 cache aligned with the images."""

    scan: Scan
    images: list[CellImage]
    split: Split
    array: np.ndarray  # uint8 (N, S, S, 3), memmap
    labels: np.ndarray  # int (N,)
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def resolve_model_defaults(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` that means "the model's default" from the registry.

    Args:
        config: the config as given.

    Returns:
        A new config with model, strategy, weights, input size, epochs and lr resolved.
    """
    spec = get_spec(config.model)
    strategy = config.strategy or spec.strategy
    if strategy not in spec.strategies:
        raise ValueError(f"model {config.model} supports strategies {', '.join(spec.strategies)}, not {strategy!r}")
    weights = config.weights or (spec.weights if strategy != "scratch" else "none")
    return dataclasses.replace(
        config,
        strategy=strategy,
        weights=weights,
        input_size=config.input_size or spec.input_size,
        epochs=config.epochs if config.epochs is not None else spec.epochs,
        lr=config.lr if config.lr is not None else spec.lr,
    )


def subsample(images: list[CellImage], max_images: int | None, seed: int) -> list[CellImage]:
    """A class-balanced random subset of at most ``max_images`` images (every patient keeps some cells).

    Args:
        images: all images.
        max_images: the cap, or ``None`` for all.
        seed: sampling seed.

    Returns:
        The subset, in the original order.
    """
    if not max_images or max_images >= len(images):
        return images
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in (0, 1):
        idx = np.array([i for i, im in enumerate(images) if im.label == label])
        take = min(len(idx), max_images // 2)
        keep += rng.choice(idx, size=take, replace=False).tolist()
    return [images[i] for i in sorted(keep)]


def prepare_data(
    *,
    data_dir: Path,
    input_size: int,
    split: Split | None,
    kind: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_images: int | None,
    cache_dir: str | None,
) -> Prepared:
    """Scan, subsample, split (or reuse a split) and cache the images at the model's input size.

    Args:
        data_dir: folder or zip archive.
        input_size: px.
        split: an existing split (resume, or another run's split) or ``None`` to make one.
        kind: split kind when making one.
        val_fraction: of images, by whole patients.
        test_fraction: of images, by whole patients.
        seed: split and subsample seed.
        max_images: class-balanced cap on images (quick runs).
        cache_dir: decoded-image cache folder.

    Returns:
        The prepared data; unreadable images are reported and dropped.
    """
    found = scan(data_dir)
    for path, reason in found.problems[:10]:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if len(found.problems) > 10:
        console.print(f"[yellow]... {len(found.problems) - 10} more files skipped (see `malaria-cells data check`)")
    if split is None:
        images = subsample(found.images, max_images, seed)
        split = make_split(images, kind=kind, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    else:
        images = [im for im in found.images if im.rel in split.assignment]
        missing = len(split.assignment) - len(images)
        if missing:
            console.print(f"[yellow]{missing} image(s) of the split are not in {data_dir}; continuing without them")
    cache = build_or_load(images=images, size=input_size, root=found.root, cache_dir=cache_dir)
    labels = np.array([im.label for im in images], dtype=np.int64)
    idx = {
        w: np.array([i for i in split.indices(images, w) if cache.ok[i]], dtype=np.int64)
        for w in ("train", "val", "test")
    }
    return Prepared(found, images, split, cache.array, labels, idx["train"], idx["val"], idx["test"])


# Hue rotation about the grey axis (the SVG/CSS hueRotate matrix): keeps luminance, shifts stain colour a little.
_HUE_A = torch.tensor([[0.213, 0.715, 0.072], [0.213, 0.715, 0.072], [0.213, 0.715, 0.072]])
_HUE_B = torch.tensor([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
_HUE_C = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])


def augment(
    batch_u8: torch.Tensor,
    gen: torch.Generator,
    *,
    brightness: float = 0.1,
    contrast: float = 0.1,
    hue_deg: float = 10.0,
) -> torch.Tensor:
    """Random dihedral transform (flips, 90-degree rotations) and mild brightness/contrast/hue jitter.

    Cells have no orientation, so all eight dihedral transforms are label-preserving; colour jitter stays
    mild because stain colour carries the signal. The black background stays black.

    Args:
        batch_u8: uint8 (N, H, W, 3).
        gen: random generator (seeded per epoch, so a resumed run draws the same augmentations).
        brightness: max relative change (0.1 = +-10 %).
        contrast: max relative change of the deviation from the cell's mean.
        hue_deg: max hue rotation in degrees.

    Returns:
        uint8 (N, H, W, 3), augmented.
    """
    n = batch_u8.shape[0]
    x = batch_u8.permute(0, 3, 1, 2).float()
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            x[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    x[flip] = x[flip].flip(3)
    fg = (x.sum(1, keepdim=True) > 0).float()
    b = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * brightness
    c = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * contrast
    theta = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(hue_deg)
    rot = _HUE_A + torch.cos(theta).view(n, 1, 1) * _HUE_B + torch.sin(theta).view(n, 1, 1) * _HUE_C
    x = torch.einsum("nij,njhw->nihw", rot, x)
    area = fg.sum((2, 3), keepdim=True).clamp_min(1)
    mean = (x * fg).sum((2, 3), keepdim=True) / area
    x = ((x - mean) * c + mean) * b
    x = (x * fg).clamp_(0, 255)
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up then cosine decay to ``floor`` x peak (multiplier of the peak lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def save_weights(model: nn.Module, path: Path) -> None:
    """Save a model's state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_run_model(run_dir: Path, *, which: str = "best") -> tuple[nn.Module, dict]:
    """Rebuild a run's model with its trained weights.

    Args:
        run_dir: the run folder.
        which: "best" or "last".

    Returns:
        (model in eval mode, metadata dict).
    """
    run_dir = Path(run_dir)
    import json

    meta = json.loads((run_dir / "metadata.json").read_text())
    model = build_model(meta["model"])
    model.load_state_dict(load_file(str(run_dir / f"{which}.safetensors")))
    model.eval()
    return model, meta


def _bce(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    y = y * (1 - smoothing) + 0.5 * smoothing
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), y)


def train(*, config: TrainConfig, data_dir: Path, run_dir: Path, resume: bool = False) -> Path:
    """Train a model and write a complete run folder.

    Args:
        config: the run's config (``None`` fields resolved from the model's defaults). Ignored when
            resuming: the run folder's own ``config.yaml`` is used.
        data_dir: folder or zip archive of cell images.
        run_dir: the run folder (created).
        resume: continue the run in ``run_dir`` from its last completed epoch.

    Returns:
        ``run_dir``.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / "state.pt"
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir}: no config.yaml; nothing to resume")
        config = load_config(run_dir / "config.yaml")
        split = load_split(run_dir / "split.csv")
    else:
        if (run_dir / "state.pt").exists() or (run_dir / "metadata.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or pick another --out")
        config = resolve_model_defaults(config)
        split = None
    set_threads(config.threads)
    device = default_device()
    precision = resolve_precision(config.precision, device)
    spec = get_spec(config.model)
    prep = Preprocessing(input_size=config.input_size, mean=spec.mean, std=spec.std)

    data = prepare_data(
        data_dir=Path(data_dir),
        input_size=config.input_size,
        split=split,
        kind=config.split,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        max_images=config.max_images,
        cache_dir=config.cache_dir,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(config, run_dir / "config.yaml")
        save_split(data.split, data.images, run_dir / "split.csv")
    _print_split(data)

    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device).to(memory_format=torch.channels_last)
    if config.strategy != "scratch":
        raise NotImplementedError(f"strategy {config.strategy!r} arrives with the transfer-learning work")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(data.train_idx) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup_steps=warmup, total_steps=total_steps)
    )

    history: list[dict] = []
    start_epoch, best_score, best_epoch, bad_epochs, elapsed_before = 0, -math.inf, -1, 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(load_file(str(run_dir / "last.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        best_score, best_epoch, bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        elapsed_before = state["elapsed_s"]
        console.print(f"[green]resuming[/] {run_dir} at epoch {start_epoch + 1}/{config.epochs}")
    stopped = "epochs"
    if start_epoch > 0 and (bad_epochs >= config.patience or start_epoch >= config.epochs):
        stopped = "already finished"

    t_start = time.perf_counter()
    x_val = data.array[np.sort(data.val_idx)] if len(data.val_idx) else None
    val_sorted = np.sort(data.val_idx)
    with make_progress(extra="status") as progress:
        ep_task = progress.add_task("epochs", total=config.epochs, completed=start_epoch, status="")
        for epoch in range(start_epoch, config.epochs):
            if stopped == "already finished":
                break
            torch.manual_seed(config.seed * 1000 + epoch)  # dropout; per epoch so a resume draws the same
            gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            order = np.random.default_rng(config.seed * 1000 + epoch).permutation(data.train_idx)
            model.train()
            t0 = time.perf_counter()
            losses = []
            step_task = progress.add_task(f"epoch {epoch + 1}", total=steps_per_epoch, status="")
            for s in range(steps_per_epoch):
                idx = np.sort(order[s * config.batch_size : (s + 1) * config.batch_size])
                xb = torch.from_numpy(data.array[idx])
                yb = torch.from_numpy(data.labels[idx]).float().to(device)
                if config.augment:
                    xb = augment(xb, gen)
                x = to_input(xb.to(device), prep)
                with autocast(precision, device):
                    logits = model(x)
                loss = _bce(logits, yb, config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                if s % 10 == 0 or s == steps_per_epoch - 1:
                    progress.update(step_task, completed=s + 1, status=f"loss {np.mean(losses[-50:]):.4f}")
            train_s = time.perf_counter() - t0
            progress.remove_task(step_task)
            row = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean(losses)),
                "train_images_per_s": steps_per_epoch * config.batch_size / train_s,
                "epoch_s": train_s,
            }
            if x_val is not None:
                val_logits = predict_logits(model, x_val, prep=prep, precision=precision, device=device)
                yv = data.labels[val_sorted]
                pv = sigmoid(val_logits)
                vm = M.binary_metrics(yv, pv, 0.5)
                row.update(
                    val_loss=float(_bce(torch.from_numpy(val_logits), torch.from_numpy(yv).float(), 0.0)),
                    val_roc_auc=vm["roc_auc"],
                    val_accuracy=vm["accuracy"],
                    val_sensitivity=vm["sensitivity"],
                    val_specificity=vm["specificity"],
                )
                score = vm["roc_auc"] - 1e-3 * row["val_loss"]  # AUC first; val loss breaks near-ties
            else:
                score = -row["train_loss"]
            row["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
            history.append(row)
            improved = score > best_score
            if improved:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                save_weights(model, run_dir / "best.safetensors")
            else:
                bad_epochs += 1
            save_weights(model, run_dir / "last.safetensors")
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "elapsed_s": row["elapsed_s"],
            }
            atomic_write(state_path, lambda tmp, st=state: torch.save(st, tmp))
            # metrics.jsonl is rewritten from the checkpointed history, so it never runs ahead of state.pt.
            atomic_write_text(run_dir / "metrics.jsonl", "".join(_jsonl(r) for r in history))
            status = f"loss {row['train_loss']:.4f}"
            if "val_roc_auc" in row:
                status += f"  val AUC {row['val_roc_auc']:.4f}  acc {row['val_accuracy']:.4f}"
            progress.update(ep_task, completed=epoch + 1, status=status + ("  *" if improved else ""))
            if bad_epochs >= config.patience:
                stopped = f"early stop (no better val AUC for {config.patience} epochs)"
                break
            if config.time_budget_s and row["elapsed_s"] >= config.time_budget_s:
                stopped = f"time budget {config.time_budget_s:.0f} s reached"
                break
    console.print(f"training stopped: {stopped}; best epoch {best_epoch + 1}")
    finalize(
        run_dir=run_dir,
        config=config,
        data=data,
        prep=prep,
        precision=precision,
        history=history,
        best_epoch=best_epoch,
        stopped=stopped,
    )
    return run_dir


def _jsonl(row: dict) -> str:
    import json

    from malaria_cells.io import _clean

    return json.dumps(_clean(row)) + "\n"


def finalize(
    *,
    run_dir: Path,
    config: TrainConfig,
    data: Prepared,
    prep: Preprocessing,
    precision: str,
    history: list[dict],
    best_epoch: int,
    stopped: str,
) -> dict:
    """Choose the decision threshold on validation with the best weights and write ``metadata.json``.

    Args:
        run_dir: the run folder.
        config: the resolved config.
        data: the prepared data.
        prep: the model's preprocessing.
        precision: "bf16" or "fp32" (what training used).
        history: per-epoch rows.
        best_epoch: zero-based index of the best epoch.
        stopped: why training ended.

    Returns:
        The metadata.
    """
    model = build_model(config.model)
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    val_sorted = np.sort(data.val_idx)
    threshold, val_metrics = 0.5, {}
    if len(val_sorted):
        pv = sigmoid(predict_logits(model, data.array[val_sorted], prep=prep, precision=precision))
        yv = data.labels[val_sorted]
        threshold = M.choose_threshold(yv, pv, method=config.threshold_method)
        val_metrics = M.binary_metrics(yv, pv, threshold)
    n_params = count_parameters(model)
    ips = [r["train_images_per_s"] for r in history]
    meta = {
        "format": "malaria-cells-run/1",
        "model": config.model,
        "strategy": config.strategy,
        "weights": config.weights,
        "timm_arch": get_spec(config.model).timm_arch,
        "preprocessing": prep.to_dict(),
        "class_names": list(CLASSES),
        "positive_class": CLASSES[POSITIVE],
        "positive_index": POSITIVE,
        "output": "one logit; sigmoid(logit) = P(Parasitized)",
        "threshold": float(threshold),
        "threshold_method": config.threshold_method,
        "split_kind": data.split.kind,
        "data_root": data.scan.root,
        "data_manifest_sha256": data.scan.manifest_hash,
        "split_counts": describe(data.split, data.images),
        "val_metrics_at_threshold": val_metrics,
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history),
        "stopped": stopped,
        "train_time_s": history[-1]["elapsed_s"] if history else 0.0,
        "train_images_per_s_median": float(np.median(ips)) if ips else None,
        "precision": precision,
        "parameters": n_params,
        "weights_mb": round((run_dir / "best.safetensors").stat().st_size / 1e6, 3),
        "packages": package_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(run_dir / "metadata.json", meta)
    return meta


def _print_split(data: Prepared) -> None:
    from rich.table import Table

    t = Table(
        title=f"split ({data.split.kind}{' - LEAKY, for the audit only' if data.split.kind != 'patient' else ''})"
    )
    rows = describe(data.split, data.images)
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    console.print(t)


def read_history(run_dir: Path) -> list[dict]:
    """The per-epoch rows of a run's ``metrics.jsonl``."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
