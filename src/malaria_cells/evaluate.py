"""Evaluation of a run on held-out patients: clinical metrics with patient-bootstrap CIs, tables and plots."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_cells import metrics as M
from malaria_cells import plots
from malaria_cells.cache import ImageCache, build_or_load
from malaria_cells.data import CLASSES, CellImage, Scan, scan
from malaria_cells.io import atomic_write_json, atomic_write_text
from malaria_cells.models import default_device, predict_logits, set_threads, sigmoid
from malaria_cells.preprocess import Preprocessing
from malaria_cells.progress import console, make_progress
from malaria_cells.split import LEAKY, load_split
from malaria_cells.train import load_run_model, read_history

REPORT_METRICS = (
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity (recall of Parasitized)"),
    ("specificity", "Specificity"),
    ("ppv", "PPV (precision)"),
    ("npv", "NPV"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("roc_auc", "ROC-AUC"),
    ("pr_auc", "PR-AUC (average precision)"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "Expected calibration error (lower is better)"),
)


def image_key(im: CellImage) -> str:
    """Match images across layouts (share .webp vs archive .png, nested folders): label + file stem."""
    return f"{im.label}/{Path(im.rel).stem}"


def select_images(*, run_dir: Path, images: list[CellImage], split: str) -> tuple[list[CellImage], list[str]]:
    """Pick the images to evaluate and list any patients that the run trained or validated on.

    Args:
        run_dir: the run (its ``split.csv`` says which patients it saw).
        images: all images of the data source.
        split: "train", "val", "test" (the run's own split) or "all" (every image of the source).

    Returns:
        (images, overlapping patient ids — non-empty only for ``all`` on data that shares patients).
    """
    load_split(run_dir / "split.csv")  # raises LeakageError if the file's by-patient split leaks
    by_key: dict[str, tuple[str, str]] = {}
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_key[f"{row['label']}/{Path(row['rel']).stem}"] = (row["split"], row["patient"])
    if split == "all":
        seen = {p for s, p in by_key.values() if s in ("train", "val")}
        overlap = sorted({im.patient for im in images} & seen)
        return images, overlap
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val, test or all, not {split!r}")
    chosen = [im for im in images if by_key.get(image_key(im), ("", ""))[0] == split]
    if not chosen:
        raise ValueError(f"none of the run's {split} images were found in this data source")
    return chosen, []


@dataclass(frozen=True)
class SplitPredictions:
    """A run's P(Parasitized) for the decodable cells of one split."""

    meta: dict  # the run's metadata.json
    images: list[CellImage]  # the cells scored, in the data source's order
    prob: np.ndarray  # P(Parasitized), averaged over the views
    overlap: list[str]  # patients of the data that were in the run's train/val split (see select_images)
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used
    cells_per_s: float | None  # inference speed, every view included


def predict_split(
    *,
    run_dir: Path,
    data_dir: Path,
    split: str,
    views: Sequence[Callable[[np.ndarray], np.ndarray]] = (),
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> SplitPredictions:
    """Run a run's best weights on the cells of one split (from the decoded-image cache).

    Args:
        run_dir: a finished run folder.
        data_dir: folder or zip archive with the images.
        split: as for :func:`evaluate_run`.
        views: transforms of the uint8 (N, S, S, 3) batch whose probabilities are averaged (test-time
            augmentation); none = the cells as they are.
        batch_size: images per forward pass.
        cache_dir: decoded-image cache folder.

    Returns:
        The predictions.
    """
    model, meta = load_run_model(Path(run_dir), device=default_device())
    prep = Preprocessing.from_dict(meta["preprocessing"])
    found = scan(data_dir)
    images, overlap = select_images(run_dir=Path(run_dir), images=found.images, split=split)
    cache = build_or_load(images=images, size=prep.input_size, root=found.root, cache_dir=cache_dir)
    keep = np.flatnonzero(cache.ok)
    cells = cache.array[keep] if len(keep) < len(cache.ok) else cache.array  # the memmap itself when it can
    transforms = list(views) or [None]
    prob = np.zeros(len(keep))
    t0 = time.perf_counter()
    with make_progress(transient=True) as progress:
        label = f"{meta['model']}: {len(keep):,} {split} cells" + (f", {len(transforms)} views" if views else "")
        task = progress.add_task(label, total=len(keep) * len(transforms))
        for fn in transforms:
            x = cells if fn is None else np.ascontiguousarray(fn(np.asarray(cells)))
            logits = predict_logits(
                model, x, prep=prep, batch_size=batch_size, progress=lambda n: progress.advance(task, n)
            )
            prob += sigmoid(logits)
    seconds = time.perf_counter() - t0
    return SplitPredictions(
        meta=meta,
        images=[images[i] for i in keep],
        prob=prob / len(transforms),
        overlap=overlap,
        skipped=_skipped(cache, found),
        cells_per_s=len(keep) / seconds if seconds > 0 and len(keep) else None,
    )


def evaluate_run(
    *,
    run_dir: Path,
    data_dir: Path,
    split: str = "test",
    out_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    threads: int | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Evaluate a run's best weights with its stored threshold and write metrics, report and plots.

    Args:
        run_dir: a finished run folder.
        data_dir: folder or zip archive with the images.
        split: "test" (default), "val", "train", or "all" (every image of ``data_dir``: other patients' data).
        out_dir: where to write (default ``RUN/eval-<split>``).
        n_boot: patient-bootstrap resamples for the 95 % CIs (>= 1000 for reported numbers).
        seed: bootstrap seed.
        batch_size: images per forward pass.
        threads: torch threads (default: all cores).
        cache_dir: decoded-image cache folder.

    Returns:
        The ``metrics.json`` content.
    """
    set_threads(threads)
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / f"eval-{split}"
    pred = predict_split(run_dir=run_dir, data_dir=data_dir, split=split, batch_size=batch_size, cache_dir=cache_dir)
    meta, images, prob, overlap = pred.meta, pred.images, pred.prob, pred.overlap
    threshold = float(meta["threshold"])
    if overlap:
        console.print(
            f"[bold red]warning:[/] {len(overlap)} patient(s) of this data were in the run's train/val split "
            f"({', '.join(overlap[:8])}{'...' if len(overlap) > 8 else ''}); these numbers are optimistic"
        )
    y = np.array([im.label for im in images], dtype=np.int64)
    groups = np.array([im.patient for im in images])

    point = M.binary_metrics(y, prob, threshold)
    ci = M.bootstrap_ci(y, prob, groups, threshold, n_boot=n_boot, seed=seed)
    cm = M.confusion(y, (prob >= threshold).astype(int))
    per_patient = M.per_patient_table(y, prob, groups, threshold)
    split_kind = meta.get("split_kind", "patient")
    result = {
        "run": str(run_dir),
        "model": meta["model"],
        "strategy": meta.get("strategy"),
        "split": split,
        "split_kind": split_kind,
        "leaky": split_kind == LEAKY,
        "overlapping_patients": overlap,
        "data": str(data_dir),
        "threshold": threshold,
        "positive_class": CLASSES[1],
        "n_cells": int(len(y)),
        "n_patients": int(len(set(groups.tolist()))),
        "skipped": [{"path": p, "reason": r} for p, r in pred.skipped],
        "metrics": {k: ci[k] for k in ci},
        "point": point,
        "confusion": cm,
        "bootstrap": {"unit": "patient", "resamples": n_boot, "seed": seed, "interval": "95% percentile"},
        "inference_cells_per_s": pred.cells_per_s,
        "per_patient": per_patient,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", result)
    atomic_write_text(out_dir / "predictions.csv", _predictions_csv(images, prob, threshold))
    title = f"{meta['model']} — {split} ({result['n_patients']} patients, {len(y):,} cells)"
    plots.plot_roc(y, prob, out_dir / "roc.png", title=f"ROC: {title}")
    plots.plot_pr(y, prob, out_dir / "pr.png", title=f"PR: {title}")
    plots.plot_confusion(cm, out_dir / "confusion.png", title=f"Confusion at threshold {threshold:.3f}")
    plots.plot_reliability(y, prob, out_dir / "reliability.png", title=f"Reliability: {title}")
    history = read_history(run_dir)
    if history:
        plots.plot_training_curves(history, out_dir / "training_curves.png")
    atomic_write_text(out_dir / "report.md", render_report(result, meta, has_curves=bool(history)))
    print_summary(result)
    return result


def _skipped(cache: ImageCache, found: Scan) -> list[tuple[str, str]]:
    # A cache error message starts with the image's path; keep it whole as the reason.
    return [(r.split(": ", 1)[0], r) for _, r in sorted(cache.errors.items())] + list(found.problems)


def _predictions_csv(images: list[CellImage], prob: np.ndarray, threshold: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rel", "patient", "true", "prob_parasitized", "predicted"])
    for im, p in zip(images, prob, strict=True):
        w.writerow([im.rel, im.patient, CLASSES[im.label], f"{p:.6f}", CLASSES[int(p >= threshold)]])
    return buf.getvalue()


def format_ci(d: dict, digits: int = 4) -> str:
    """``value (low–high)`` of a bootstrap result; ``n/a`` when undefined, the value alone without bounds."""
    v, lo, hi = d.get("value"), d.get("low"), d.get("high")
    if v is None or v != v:
        return "n/a"
    if lo is None or lo != lo:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def render_report(result: dict, meta: dict, *, has_curves: bool) -> str:
    """Markdown report of one evaluation.

    Args:
        result: the ``metrics.json`` content.
        meta: the run's metadata.
        has_curves: whether ``training_curves.png`` was written.

    Returns:
        Markdown text.
    """
    m = result["metrics"]
    lines = [
        f"# Evaluation: {meta['model']} ({meta.get('strategy')}) on the {result['split']} split",
        "",
    ]
    if result["leaky"]:
        lines += [
            "> **LEAKY SPLIT (by image)** — cells of one patient are in train and test. These numbers are",
            "> inflated and exist only for the leakage audit.",
            "",
        ]
    if result["overlapping_patients"]:
        lines += [
            f"> **Warning:** {len(result['overlapping_patients'])} patients of this data were seen in "
            "training or validation; the numbers are optimistic.",
            "",
        ]
    lines += [
        f"- Run: `{result['run']}`; data: `{result['data']}`",
        f"- {result['n_cells']:,} cells from {result['n_patients']} patients; positive class: "
        f"**{result['positive_class']}**; decision threshold {result['threshold']:.4f} "
        f"(chosen on validation patients by {meta.get('threshold_method', 'youden')})",
        f"- 95 % confidence intervals: percentile bootstrap over **patients** ({result['bootstrap']['resamples']} "
        "resamples), so they reflect patient-to-patient variation.",
        "",
        "| Metric | Value (95 % CI) |",
        "|---|---|",
    ]
    lines += [f"| {label} | {format_ci(m[key])} |" for key, label in REPORT_METRICS]
    cm = result["confusion"]
    lines += [
        "",
        "## Confusion matrix",
        "",
        "| true \\ predicted | Uninfected | Parasitized |",
        "|---|---|---|",
        f"| Uninfected | {cm['tn']} (TN) | {cm['fp']} (FP) |",
        f"| Parasitized | {cm['fn']} (FN) | {cm['tp']} (TP) |",
        "",
        "![ROC](roc.png) ![PR](pr.png)",
        "",
        "![Confusion](confusion.png) ![Reliability](reliability.png)",
        "",
    ]
    if has_curves:
        lines += ["![Training curves](training_curves.png)", ""]
    lines += [
        "## Per patient",
        "",
        "| Patient | Cells | True infected fraction | Predicted infected fraction | Errors |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['patient']} | {r['cells']} | {r['true_infected_frac']:.3f} | {r['pred_infected_frac']:.3f} "
        f"| {r['errors']} |"
        for r in result["per_patient"]
    ]
    lines += ["", "Research and education use only; not for diagnosis.", ""]
    return "\n".join(lines)


def print_summary(result: dict) -> None:
    """Print the metrics table to the console."""
    from rich.table import Table

    leaky = " [red](LEAKY by-image split)[/]" if result["leaky"] else ""
    t = Table(
        title=f"{result['model']} on {result['split']}: {result['n_cells']:,} cells, "
        f"{result['n_patients']} patients{leaky}"
    )
    t.add_column("metric")
    t.add_column("value (95% CI, patient bootstrap)", justify="right")
    for key, label in REPORT_METRICS:
        t.add_row(label, format_ci(result["metrics"][key]))
    console.print(t)


def load_metrics(path: Path) -> dict:
    """Read a ``metrics.json``."""
    return json.loads(Path(path).read_text())
