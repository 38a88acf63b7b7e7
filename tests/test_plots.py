"""Tests for malaria_cells.plots: every function writes a real PNG, atomically, also on degenerate input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from malaria_cells import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_RNG = np.random.default_rng(0)
Y = _RNG.integers(0, 2, 200)
PROB = np.clip(0.3 * Y + 0.7 * _RNG.random(200), 0, 1)
HISTORY = [
    {"epoch": 1, "train_loss": 0.6, "val_loss": 0.5, "val_roc_auc": 0.90, "val_accuracy": 0.85},
    {"epoch": 2, "train_loss": 0.4, "val_loss": 0.35, "val_roc_auc": 0.95, "val_accuracy": 0.90},
    {"epoch": 3, "train_loss": 0.3, "val_loss": 0.33, "val_roc_auc": 0.97, "val_accuracy": 0.93},
]
COMPARISON = [
    {"name": "Small CNN", "value": 0.94, "low": 0.92, "high": 0.955},
    {"name": "ResNet-18", "value": 0.965, "low": 0.95, "high": 0.975, "published": 0.97},
    {"name": "EfficientNet", "value": 0.97, "low": 0.96, "high": 0.98, "published": None},
]

# (id, function writing to the given path)
CASES: list[tuple[str, Callable[[Path], Path]]] = [
    ("roc", lambda p: plots.plot_roc(Y, PROB, p, "ROC - test")),
    ("pr", lambda p: plots.plot_pr(Y, PROB, p, "PR - test")),
    ("confusion", lambda p: plots.plot_confusion({"tp": 40, "fp": 5, "tn": 50, "fn": 5}, p, "Confusion - test")),
    ("reliability", lambda p: plots.plot_reliability(Y, PROB, p, "Reliability - test")),
    ("training", lambda p: plots.plot_training_curves(HISTORY, p)),
    ("comparison", lambda p: plots.plot_comparison(COMPARISON, p, metric="accuracy")),
    # Degenerate inputs must still give a figure (with a note) rather than break a whole report.
    ("roc_one_class", lambda p: plots.plot_roc(np.zeros(5), np.linspace(0, 1, 5), p, "ROC")),
    ("pr_no_positives", lambda p: plots.plot_pr(np.zeros(5), np.linspace(0, 1, 5), p, "PR")),
    ("confusion_empty_row", lambda p: plots.plot_confusion({"tp": 0, "fp": 2, "tn": 8, "fn": 0}, p, "CM")),
    ("reliability_extremes", lambda p: plots.plot_reliability([0, 1, 1], [0.0, 1.0, 1.0], p, "Rel")),
    (
        "training_partial",
        lambda p: plots.plot_training_curves([{"epoch": 1, "train_loss": 0.7}, {"train_loss": 0.5}], p),
    ),
    ("training_empty", lambda p: plots.plot_training_curves([], p)),
    (
        "training_nan_none",
        lambda p: plots.plot_training_curves([{"epoch": 1, "val_loss": None, "val_roc_auc": float("nan")}], p),
    ),
    (
        "comparison_missing_ci",
        lambda p: plots.plot_comparison([{"name": "m", "value": 0.9, "low": None, "high": 0.95}], p),
    ),
    ("comparison_empty", lambda p: plots.plot_comparison([], p, metric="roc_auc")),
]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_writes_png(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    target = tmp_path / "sub" / "figure.png"  # parent does not exist yet
    returned = make(target)
    assert Path(returned) == target
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
    assert list(target.parent.iterdir()) == [target]  # temporary file was moved, not left behind


def test_overwrites_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "roc.png"
    target.write_bytes(b"stale")
    plots.plot_roc(Y, PROB, target, "ROC")
    assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_failed_plot_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "cm.png"
    with pytest.raises(KeyError):
        plots.plot_confusion({"tp": 1}, target, "incomplete")
    assert list(tmp_path.iterdir()) == []
