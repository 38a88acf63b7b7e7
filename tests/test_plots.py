"""Tests for malaria_cells.plots: every function writes a real PNG of the figure's size, atomically, also on
degenerate input; the picture depends on the data (same data, same pixels; other data, other pixels); NaN is refused
where it would misdraw a curve and skipped where the docstring says so."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

# Figure size in inches per kind of plot (what plots.py asks matplotlib for); the PNG is cropped to its content
# ("tight"), so its size in pixels is near, not at, inches x DPI.
FIGSIZE = {
    "roc": (5.5, 5.0),
    "pr": (5.5, 5.0),
    "confusion": (5.5, 4.8),
    "reliability": (5.5, 6.0),
    "training": (11.0, 4.5),
    "comparison": (7.5, 2.5),  # at least; grows with the number of rows
}

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
    (
        "reliability_before_after",
        lambda p: plots.plot_reliability_comparison(Y, {"before": PROB, "after": np.sqrt(PROB)}, p, "Rel"),
    ),
    ("reliability_before_after_empty", lambda p: plots.plot_reliability_comparison([], {"before": []}, p)),
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def draw(tmp_path: Path, make: Callable[[Path], Path], name: str = "figure") -> np.ndarray:
    target = tmp_path / f"{name}.png"
    make(target)
    return pixels(target)


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
def test_writes_png(tmp_path: Path, name: str, make: Callable[[Path], Path]) -> None:
    target = tmp_path / "sub" / "figure.png"  # parent does not exist yet
    returned = make(target)
    assert Path(returned) == target
    assert list(target.parent.iterdir()) == [target]  # temporary file was moved, not left behind
    width, height = png_size(target)
    inches = FIGSIZE[name.split("_")[0]]
    nominal = (inches[0] * plots.DPI, inches[1] * plots.DPI)
    assert 0.75 * nominal[0] <= width <= 1.35 * nominal[0], (width, nominal)
    assert 0.75 * nominal[1] <= height <= 1.35 * nominal[1], (height, nominal)
    image = pixels(target)
    assert image.shape == (height, width, 3)
    assert (image == 255).all(axis=2).mean() > 0.3  # a white page ...
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # ... with text and lines on it (antialiased)


@pytest.mark.parametrize(("name", "make"), CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_same_data_same_pixels(tmp_path: Path, name: str, make: Callable[[Path], Path]) -> None:
    assert np.array_equal(draw(tmp_path, make, "a"), draw(tmp_path, make, "b"))


RANDOM_PROB = np.random.default_rng(1).random(200)  # a classifier without skill
OTHER_INPUTS: list[tuple[str, Callable[[Path], Path], Callable[[Path], Path]]] = [
    ("roc", lambda p: plots.plot_roc(Y, PROB, p, "ROC"), lambda p: plots.plot_roc(Y, RANDOM_PROB, p, "ROC")),
    ("pr", lambda p: plots.plot_pr(Y, PROB, p, "PR"), lambda p: plots.plot_pr(Y, RANDOM_PROB, p, "PR")),
    (
        "reliability",
        lambda p: plots.plot_reliability(Y, PROB, p, "Rel"),
        lambda p: plots.plot_reliability(Y, RANDOM_PROB, p, "Rel"),
    ),
    (
        "reliability_before_after",
        lambda p: plots.plot_reliability_comparison(Y, {"before": PROB, "after": PROB}, p),
        lambda p: plots.plot_reliability_comparison(Y, {"before": PROB, "after": RANDOM_PROB}, p),
    ),
    (
        "confusion",
        lambda p: plots.plot_confusion({"tp": 40, "fp": 5, "tn": 50, "fn": 5}, p, "CM"),
        lambda p: plots.plot_confusion({"tp": 5, "fp": 50, "tn": 5, "fn": 40}, p, "CM"),
    ),
    (
        "training",
        lambda p: plots.plot_training_curves(HISTORY, p),
        lambda p: plots.plot_training_curves([{**r, "val_loss": 1.0 - r["val_loss"]} for r in HISTORY], p),
    ),
    (
        "comparison",
        lambda p: plots.plot_comparison(COMPARISON, p),
        lambda p: plots.plot_comparison([{**r, "value": r["value"] - 0.01} for r in COMPARISON], p),
    ),
]


@pytest.mark.parametrize(("name", "one", "other"), OTHER_INPUTS, ids=[c[0] for c in OTHER_INPUTS])
def test_other_data_other_pixels(tmp_path: Path, name: str, one: Callable, other: Callable) -> None:
    a, b = draw(tmp_path, one, "one"), draw(tmp_path, other, "other")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_comparison_grows_with_its_rows(tmp_path: Path) -> None:
    rows = [{"name": f"model {i}", "value": 0.9 + i / 100, "low": 0.85, "high": 0.99} for i in range(10)]
    plots.plot_comparison(rows[:2], tmp_path / "two.png")
    plots.plot_comparison(rows, tmp_path / "ten.png")
    (_, h2), (_, h10) = png_size(tmp_path / "two.png"), png_size(tmp_path / "ten.png")
    assert h10 > h2 + 8 * 0.6 * plots.DPI * 0.75  # 0.6 inch per row, less what "tight" crops


@pytest.mark.parametrize("plot", [plots.plot_roc, plots.plot_pr, plots.plot_reliability], ids=["roc", "pr", "rel"])
@pytest.mark.parametrize(
    ("y", "prob"),
    [
        ([0, 1, 1, 0], [0.1, float("nan"), 0.8, 0.3]),
        ([0, 0, 0], [0.1, float("nan"), 0.3]),  # one class: the curve is not even drawn, NaN is still refused
        ([0, 1], [0.2, 1.5]),
        ([0, 1], [0.2, float("inf")]),
        ([0, 2], [0.2, 0.7]),
        ([0, float("nan")], [0.2, 0.7]),
        ([0, 1, 1], [0.2, 0.7]),
    ],
    ids=["nan", "nan-one-class", "above-one", "inf", "label-2", "nan-label", "lengths"],
)
def test_curves_refuse_input_they_would_misdraw(tmp_path: Path, plot: Callable, y: list, prob: list) -> None:
    with pytest.raises(ValueError):
        plot(y, prob, tmp_path / "x.png", "t")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "probs",
    [{}, {"before": [0.2, 0.7], "after": [0.2, float("nan")]}, {"before": [0.2, 1.5]}, {"before": [0.2, 0.5, 0.7]}],
    ids=["no-sets", "nan-in-one-set", "above-one", "lengths"],
)
def test_reliability_comparison_refuses_bad_sets(tmp_path: Path, probs: dict) -> None:
    with pytest.raises(ValueError):
        plots.plot_reliability_comparison([0, 1], probs, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_training_curves_skip_nan_and_none_like_missing_values(tmp_path: Path) -> None:
    # Documented: missing keys and non-numeric values are skipped (a NaN loss is what a diverged epoch logs).
    with_nan = [{**HISTORY[0], "val_loss": float("nan")}, {**HISTORY[1], "val_roc_auc": None}, HISTORY[2]]
    without = [{k: v for k, v in HISTORY[0].items() if k != "val_loss"}, HISTORY[1], HISTORY[2]]
    without[1] = {k: v for k, v in HISTORY[1].items() if k != "val_roc_auc"}
    assert np.array_equal(
        draw(tmp_path, lambda p: plots.plot_training_curves(with_nan, p), "nan"),
        draw(tmp_path, lambda p: plots.plot_training_curves(without, p), "without"),
    )
    nothing = [{"epoch": 1, "val_loss": None, "val_roc_auc": float("nan")}]
    assert np.array_equal(
        draw(tmp_path, lambda p: plots.plot_training_curves(nothing, p), "nothing"),
        draw(tmp_path, lambda p: plots.plot_training_curves([], p), "empty"),
    )


def test_comparison_treats_a_nan_bound_as_unknown(tmp_path: Path) -> None:
    # Documented: an unknown bound draws no whisker on that side (and shows "?" in the label).
    nan = [{"name": "m", "value": 0.9, "low": float("nan"), "high": 0.95}]
    none = [{"name": "m", "value": 0.9, "low": None, "high": 0.95}]
    known = [{"name": "m", "value": 0.9, "low": 0.85, "high": 0.95}]
    a = draw(tmp_path, lambda p: plots.plot_comparison(nan, p), "nan")
    assert np.array_equal(a, draw(tmp_path, lambda p: plots.plot_comparison(none, p), "none"))
    b = draw(tmp_path, lambda p: plots.plot_comparison(known, p), "known")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_overwrites_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "roc.png"
    target.write_bytes(b"stale")
    plots.plot_roc(Y, PROB, target, "ROC")
    assert target.read_bytes().startswith(PNG_SIGNATURE)
    assert pixels(target).shape[:2] == png_size(target)[::-1]


def test_failed_plot_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "cm.png"
    with pytest.raises(KeyError):
        plots.plot_confusion({"tp": 1}, target, "incomplete")
    assert list(tmp_path.iterdir()) == []
