"""Evaluation figures (ROC, PR, confusion matrix, reliability, training curves, model comparison) as PNG files.

Figures are drawn on explicit ``Figure`` objects attached to the Agg canvas instead of through pyplot: that needs
no display, never switches the global backend under other code, and leaves no open figures behind in
long-running evaluation processes. Every file is written to a temporary name and moved into place with
``os.replace``, so a crash mid-save never leaves a truncated PNG where a report expects a finished one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from numpy.typing import ArrayLike

from malaria_cells.metrics import binary_metrics, expected_calibration_error, reliability_curve

CLASS_NAMES = ("Uninfected", "Parasitized")  # index = label; Parasitized (1) is the positive class
DPI = 120
_MODEL_COLOR = "#1f77b4"
_REFERENCE_COLOR = "#7f7f7f"


@contextmanager
def _figure(path: str | os.PathLike[str], figsize: tuple[float, float]) -> Iterator[Figure]:
    """Yield a fresh figure and save it atomically as PNG at `path` when the block exits without error."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    yield fig
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _note(ax: Axes, text: str) -> None:
    """Write a centred message on an axis whose data cannot be drawn, instead of failing the whole report."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=_REFERENCE_COLOR)


def _as_arrays(y_true: ArrayLike, prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as ints and probabilities as floats, refusing input a curve would silently misdraw.

    Raises:
        ValueError: lengths differ, a label is not 0 or 1, or a probability is NaN, infinite or outside [0, 1].
    """
    y, p = np.asarray(y_true, dtype=float).ravel(), np.asarray(prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but prob {p.size} probabilities")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0 (Uninfected) or 1 (Parasitized) only")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("prob must hold finite probabilities of Parasitized in [0, 1] (found NaN, inf or outside)")
    return y.astype(int), p


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="stable")
    p_desc, y_desc = p[order], y[order]
    last_of_score = np.r_[p_desc[1:] != p_desc[:-1], True]  # tied scores move together
    tps = np.cumsum(y_desc)[last_of_score]
    fps = np.cumsum(1 - y_desc)[last_of_score]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def plot_roc(y_true: ArrayLike, prob: ArrayLike, path: str | os.PathLike[str], title: str = "ROC curve") -> Path:
    """Plot the ROC curve (sensitivity vs 1 - specificity) with its AUC.

    Args:
        y_true: True labels, 0 (Uninfected) or 1 (Parasitized).
        prob: Predicted probabilities of Parasitized.
        path: Destination PNG.
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ValueError: labels other than 0/1, probabilities that are NaN or outside [0, 1], or lengths that differ
            (nothing is written).
    """
    y, p = _as_arrays(y_true, prob)
    with _figure(path, (5.5, 5.0)) as fig:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], linestyle="--", color=_REFERENCE_COLOR, linewidth=1, label="Chance")
        if y.size and 0 < y.sum() < y.size:
            fpr, tpr = _roc_points(y, p)
            auc = binary_metrics(y, p)["roc_auc"]
            ax.plot(fpr, tpr, color=_MODEL_COLOR, linewidth=2, label=f"Model (AUC = {auc:.3f})")
        else:
            _note(ax, "ROC undefined: both classes are needed")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 - specificity (false-positive rate)")
        ax.set_ylabel("Sensitivity (true-positive rate)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    return Path(path)


def plot_pr(
    y_true: ArrayLike, prob: ArrayLike, path: str | os.PathLike[str], title: str = "Precision-recall curve"
) -> Path:
    """Plot PPV against sensitivity with the average precision, Parasitized being the positive class.

    Args:
        y_true: True labels, 0 (Uninfected) or 1 (Parasitized).
        prob: Predicted probabilities of Parasitized.
        path: Destination PNG.
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ValueError: labels other than 0/1, probabilities that are NaN or outside [0, 1], or lengths that differ
            (nothing is written).
    """
    y, p = _as_arrays(y_true, prob)
    with _figure(path, (5.5, 5.0)) as fig:
        ax = fig.subplots()
        if y.size and y.sum() > 0:
            order = np.argsort(-p, kind="stable")
            p_desc, y_desc = p[order], y[order]
            last_of_score = np.r_[p_desc[1:] != p_desc[:-1], True]
            tps = np.cumsum(y_desc)[last_of_score]
            flagged = np.arange(1, y.size + 1)[last_of_score]
            sensitivity, ppv = np.r_[0.0, tps / tps[-1]], np.r_[1.0, tps / flagged]
            ap = binary_metrics(y, p)["pr_auc"]
            ax.step(sensitivity, ppv, where="pre", color=_MODEL_COLOR, linewidth=2, label=f"Model (AP = {ap:.3f})")
            # A classifier without skill has PPV equal to the prevalence at every sensitivity.
            prevalence = y.mean()
            ax.axhline(
                prevalence, linestyle="--", color=_REFERENCE_COLOR, linewidth=1, label=f"Prevalence = {prevalence:.2f}"
            )
            ax.legend(loc="lower left")
        else:
            _note(ax, "PR curve undefined: no Parasitized cells")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("Sensitivity (recall of Parasitized)")
        ax.set_ylabel("PPV (precision of Parasitized)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return Path(path)


def plot_confusion(cm: Mapping[str, int], path: str | os.PathLike[str], title: str = "Confusion matrix") -> Path:
    """Plot a 2x2 confusion matrix, rows = true class, with counts and row percentages.

    Row percentages are what a clinician reads: the Parasitized row shows sensitivity and the missed fraction,
    the Uninfected row specificity and the false-alarm fraction.

    Args:
        cm: {"tp", "fp", "tn", "fn"} counts, as returned by `metrics.confusion`.
        path: Destination PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=float)
    row_totals = counts.sum(axis=1, keepdims=True)
    row_frac = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    with _figure(path, (5.5, 4.8)) as fig:
        ax = fig.subplots()
        image = ax.imshow(row_frac, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(2):
            for j in range(2):
                pct = f"{100 * row_frac[i, j]:.1f}%" if row_totals[i, 0] > 0 else "n/a"
                # White text on dark cells keeps the numbers legible whatever the fraction.
                color = "white" if row_frac[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(counts[i, j]):,}\n{pct}", ha="center", va="center", color=color, fontsize=12)
        ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
        ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="Fraction of true class")
    return Path(path)


def plot_reliability(
    y_true: ArrayLike, prob: ArrayLike, path: str | os.PathLike[str], title: str = "Reliability diagram"
) -> Path:
    """Plot observed Parasitized fraction per probability bin against perfect calibration, with bin counts.

    Args:
        y_true: True labels, 0 (Uninfected) or 1 (Parasitized).
        prob: Predicted probabilities of Parasitized.
        path: Destination PNG.
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ValueError: labels other than 0/1, probabilities that are NaN or outside [0, 1], or lengths that differ
            (nothing is written).
    """
    y, p = _as_arrays(y_true, prob)
    centers, observed, counts = reliability_curve(y, p)
    width = 1.0 / len(centers)
    with _figure(path, (5.5, 6.0)) as fig:
        ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        ax.plot([0, 1], [0, 1], linestyle="--", color=_REFERENCE_COLOR, linewidth=1, label="Perfect calibration")
        filled = counts > 0
        ax.bar(
            centers[filled],
            observed[filled],
            width=width * 0.9,
            color=_MODEL_COLOR,
            alpha=0.8,
            edgecolor="black",
            linewidth=0.5,
            label="Observed",
        )
        if y.size:
            ece = binary_metrics(y, p)["ece"]
            ax.set_title(f"{title}\nECE = {ece:.3f} ({len(centers)} bins)")
        else:
            ax.set_title(title)
            _note(ax, "No cells")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Observed fraction Parasitized")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        # Log scale because confident models put most cells in the two extreme bins.
        ax_hist.bar(centers, counts, width=width * 0.9, color=_REFERENCE_COLOR)
        _cell_count_axis(ax_hist, log=bool(counts.any()))
    return Path(path)


def plot_reliability_comparison(
    y_true: ArrayLike,
    probs: Mapping[str, ArrayLike],
    path: str | os.PathLike[str],
    title: str = "Reliability before and after calibration",
) -> Path:
    """Reliability curves of several probability sets for the same cells (e.g. before and after temperature scaling).

    Each set is drawn as observed Parasitized fraction against mean predicted probability per equal-width bin (the
    bins and the ECE of :func:`malaria_cells.metrics.reliability_curve` / ``expected_calibration_error``), with its
    ECE in the legend; below, the cells per bin of each set (log scale).

    Args:
        y_true: True labels, 0 (Uninfected) or 1 (Parasitized).
        probs: name -> predicted probabilities of Parasitized, each as long as ``y_true``.
        path: Destination PNG.
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no sets, or labels/probabilities a reliability diagram refuses (nothing is written).
    """
    if not probs:
        raise ValueError("probs needs at least one named set of probabilities")
    sets = {name: _as_arrays(y_true, p) for name, p in probs.items()}
    colors = (_MODEL_COLOR, "#d62728", "#2ca02c", "#9467bd")
    with _figure(path, (5.5, 6.0)) as fig:
        ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        ax.plot([0, 1], [0, 1], linestyle="--", color=_REFERENCE_COLOR, linewidth=1, label="Perfect calibration")
        any_counts = False
        for i, (name, (y, p)) in enumerate(sets.items()):
            color = colors[i % len(colors)]
            centers, observed, counts = reliability_curve(y, p)
            n_bins = len(centers)
            # The bins of metrics.reliability_curve: [i/n, (i+1)/n), 1.0 in the last.
            idx = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p, side="right")
            mean_p = np.bincount(idx, weights=p, minlength=n_bins) / np.maximum(counts, 1)
            filled = counts > 0
            label = f"{name} (ECE {expected_calibration_error(y, p):.3f})" if y.size else name
            ax.plot(mean_p[filled], observed[filled], marker="o", markersize=4, linewidth=1.5, color=color, label=label)
            offset = (i - (len(sets) - 1) / 2) * 0.9 / (n_bins * len(sets))
            ax_hist.bar(centers + offset, counts, width=0.9 / (n_bins * len(sets)), color=color, alpha=0.8)
            any_counts |= bool(counts.any())
        if not any_counts:
            _note(ax, "No cells")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)  # room for the markers at 0 and 1, where most cells of a good model are
        ax.set_ylabel("Observed fraction Parasitized")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        _cell_count_axis(ax_hist, log=any_counts)
    return Path(path)


def _cell_count_axis(ax_hist: Any, *, log: bool) -> None:
    """Label a reliability diagram's histogram of cells per bin; log-scaled (plain numbers) when it has cells."""
    if log:
        ax_hist.set_yscale("log")
        ax_hist.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax_hist.yaxis.set_minor_formatter(NullFormatter())
    ax_hist.set_xlabel("Predicted probability of Parasitized")
    ax_hist.set_ylabel("Cells")


def _finite(value: Any) -> bool:
    """True for a real number that is not NaN/inf (jsonl rows may hold None or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot losses and validation metrics per epoch from the rows of a metrics.jsonl file.

    Args:
        history: Per-epoch dicts with any of epoch, train_loss, val_loss, val_roc_auc, val_accuracy; missing
            keys and non-numeric values are skipped, and a missing epoch falls back to the row number.
        path: Destination PNG.

    Returns:
        The written path.
    """
    panels = (
        ("Loss", "Loss", (("train_loss", "Train loss"), ("val_loss", "Validation loss"))),
        (
            "Validation metrics",
            "Score",
            (("val_roc_auc", "Validation ROC AUC"), ("val_accuracy", "Validation accuracy")),
        ),
    )
    with _figure(path, (11.0, 4.5)) as fig:
        axes = fig.subplots(1, 2)
        for ax, (panel_title, ylabel, series) in zip(axes, panels, strict=True):
            drawn = False
            for key, label in series:
                points = [
                    (row["epoch"] if _finite(row.get("epoch")) else i + 1, row[key])
                    for i, row in enumerate(history)
                    if _finite(row.get(key))
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=label)
                    drawn = True
            if drawn:
                ax.legend()
            else:
                _note(ax, "No data recorded")
            ax.set_title(panel_title)
            ax.set_xlabel("Epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fig.suptitle("Training curves")
    return Path(path)


def _fmt_bound(value: float) -> str:
    """Format a CI bound for a label, showing a missing bound as '?'."""
    return f"{value:.3f}" if np.isfinite(value) else "?"


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str = "accuracy") -> Path:
    """Plot one horizontal bar per model with its confidence interval and, if given, the published value.

    Args:
        rows: Dicts with name, value, low, high and optionally published (a number or None).
        path: Destination PNG.
        metric: Name of the compared metric, used for the axis label and title.

    Returns:
        The written path.
    """
    values = np.array([float(row["value"]) for row in rows], dtype=float)
    lows = np.array([float(row["low"]) if _finite(row.get("low")) else np.nan for row in rows], dtype=float)
    highs = np.array([float(row["high"]) if _finite(row.get("high")) else np.nan for row in rows], dtype=float)
    # The numbers go into the tick labels, where they cannot collide with whiskers or published markers.
    names = [
        f"{row['name']}\n{value:.3f} [{_fmt_bound(low)}, {_fmt_bound(high)}]"
        for row, value, low, high in zip(rows, values, lows, highs, strict=True)
    ]
    # An unknown bound draws no whisker on that side rather than a bogus one.
    whisker_lo = np.where(np.isfinite(lows), lows, values)
    whisker_hi = np.where(np.isfinite(highs), highs, values)
    positions = np.arange(len(rows))
    label = metric.replace("_", " ")
    with _figure(path, (7.5, max(2.5, 0.6 * len(rows) + 1.5))) as fig:
        ax = fig.subplots()
        if rows:
            ax.barh(positions, values, height=0.6, color=_MODEL_COLOR, alpha=0.8, label="This work")
            # Whiskers drawn by hand: barh(xerr=...) trips a NumPy deprecation inside matplotlib for a single bar.
            ax.hlines(positions, whisker_lo, whisker_hi, color="black", linewidth=1.2, label="Confidence interval")
            ax.vlines(
                np.r_[whisker_lo, whisker_hi],
                np.r_[positions, positions] - 0.12,
                np.r_[positions, positions] + 0.12,
                color="black",
                linewidth=1.2,
            )
            published = [(i, float(row["published"])) for i, row in enumerate(rows) if _finite(row.get("published"))]
            if published:
                idx, pub = zip(*published, strict=True)
                ax.scatter(pub, idx, marker="D", s=36, color="#d62728", zorder=3, label="Published")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
            finite = np.concatenate([values, lows, highs, [v for _, v in published]])
            finite = finite[np.isfinite(finite)]
            if finite.size:
                # Zoom on the spread between models, which often differ by only a few points; bars then start
                # at the left edge of the axis.
                lo, hi = float(finite.min()), float(finite.max())
                pad = max(0.01, 0.1 * (hi - lo))
                ax.set_xlim(max(0.0, lo - 2 * pad) if lo >= 0 else lo - 2 * pad, hi + pad)
        else:
            _note(ax, "No models to compare")
        ax.set_yticks(positions, labels=names)
        ax.invert_yaxis()  # first row on top, matching table order
        ax.set_xlabel(label.capitalize())
        ax.set_title(f"Model comparison: {label}")
        ax.grid(axis="x", alpha=0.3)
    return Path(path)
