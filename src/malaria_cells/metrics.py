"""Evaluation metrics for the Parasitized-vs-Uninfected cell classifier.

The positive class is always Parasitized = 1 and the negative class Uninfected = 0, so "sensitivity" is the
fraction of parasitized cells that are flagged and "specificity" the fraction of uninfected cells left alone.

This module depends on numpy only (scikit-learn is used by the tests as an independent reference); it must
never import torch, so that evaluation and reporting run on machines without a deep-learning stack.

Every metric is computed by one weighted routine (``_weighted_metrics``): a plain evaluation is the special case
where every cell has weight 1, and a patient-level bootstrap resample is the case where every cell carries the
number of times its patient was drawn. Sharing the routine guarantees that bootstrap replicates and point
estimates are computed identically, and lets 1000 resamples run as a few matrix operations instead of a loop.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

POSITIVE_LABEL = 1  # Parasitized
NEGATIVE_LABEL = 0  # Uninfected
N_CALIBRATION_BINS = 15

#: Metrics that get a bootstrap confidence interval, in reporting order.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "mcc",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)
#: Cell counts reported alongside the metrics; they describe the data and need no interval.
COUNT_NAMES: tuple[str, ...] = ("n", "n_pos", "n_neg")

# Upper bound on the elements of one (resamples x cells) weight block, ~32 MB as float64; keeps memory flat
# when the bootstrap is run on the full 27k-cell dataset instead of a ~3k-cell test split.
_MAX_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------------


def _validate(y_true: ArrayLike, prob: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return labels and probabilities as 1-D float arrays, rejecting malformed input."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and prob must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"y_true and prob differ in length: {y.shape[0]} vs {p.shape[0]}")
    y = y.astype(np.float64)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must contain only 0 (Uninfected) and 1 (Parasitized)")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("prob must be finite probabilities of Parasitized in [0, 1]")
    return y, p


def _encode_groups(groups: ArrayLike | Sequence[Hashable], n: int) -> tuple[NDArray[np.intp], list[Any]]:
    """Map patient ids to integer codes; returns (codes per cell, id per code in order of first appearance)."""
    # Plain Python values so that ids come back as "C10" / 3 rather than numpy scalars, and so that mixed-type
    # ids (which np.unique cannot sort) still work.
    values = [g.item() if isinstance(g, np.generic) else g for g in np.asarray(groups, dtype=object).ravel()]
    if len(values) != n:
        raise ValueError(f"groups has {len(values)} entries but there are {n} cells")
    lookup: dict[Any, int] = {}
    codes = np.fromiter((lookup.setdefault(v, len(lookup)) for v in values), dtype=np.intp, count=n)
    return codes, list(lookup)


def _natural_key(value: Any) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers numerically, so patient C2 sorts before C10."""
    # re.split with a capture group alternates text/number/text..., so every position has a consistent type.
    parts = re.split(r"(\d+)", str(value))
    return tuple(int(part) if i % 2 else part.lower() for i, part in enumerate(parts)) + (str(value),)


def _div(num: ArrayLike, den: ArrayLike) -> NDArray[np.float64]:
    """Elementwise num/den with NaN wherever the denominator is zero (an undefined rate, not an error)."""
    num_arr = np.asarray(num, dtype=np.float64)
    den_arr = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num_arr, den_arr).shape, np.nan)
    np.divide(num_arr, den_arr, out=out, where=den_arr != 0)
    return out


def _bin_index(p: NDArray[np.float64], n_bins: int) -> NDArray[np.intp]:
    """Equal-width calibration bin of each probability; bin i is [i/n, (i+1)/n) and 1.0 joins the last bin."""
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(inner_edges, p, side="right")


# --------------------------------------------------------------------------------------------------------------
# Weighted core shared by point estimates and the bootstrap
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """Per-cell quantities, in ascending-score order, from which every metric follows by weighted sums."""

    y: NDArray[np.float64]  # labels, sorted by score
    linear: NDArray[np.float64]  # (cells, k) columns whose weighted sums give counts and per-bin sums
    starts: NDArray[np.intp]  # index of the first cell of each distinct score (for tie-aware AUC)
    n_bins: int


def _prepare(y: NDArray[np.float64], p: NDArray[np.float64], threshold: float, n_bins: int) -> _Prepared:
    """Precompute the weight-independent parts of every metric once, outside the bootstrap loop."""
    pred = (p >= threshold).astype(np.float64)
    onehot = np.zeros((p.size, n_bins))
    onehot[np.arange(p.size), _bin_index(p, n_bins)] = 1.0
    linear = np.column_stack(
        [
            np.ones_like(y),  # n
            y,  # n_pos
            y * pred,  # tp
            (1 - y) * pred,  # fp
            (1 - y) * (1 - pred),  # tn
            y * (1 - pred),  # fn
            (p - y) ** 2,  # Brier numerator
            onehot * y[:, None],  # parasitized cells per bin
            onehot * p[:, None],  # summed predicted probability per bin
        ]
    )
    order = np.argsort(p, kind="stable")
    p_sorted = p[order]
    starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]]) if p.size else np.zeros(0, np.intp)
    return _Prepared(y=y[order], linear=linear[order], starts=starts, n_bins=n_bins)


def _weighted_metrics(prep: _Prepared, weights: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """Compute every metric for each row of `weights` (shape (rows, cells), cells in ascending-score order).

    Args:
        prep: Output of `_prepare`.
        weights: Non-negative cell weights; row r describes one (re)sampled dataset.

    Returns:
        Metric name -> array of shape (rows,).
    """
    rows = weights.shape[0]
    if prep.y.size == 0:
        out = {name: np.full(rows, np.nan) for name in METRIC_NAMES}
        out.update({name: np.zeros(rows) for name in COUNT_NAMES})
        return out

    sums = weights @ prep.linear
    n, n_pos, tp, fp, tn, fn, sq_err = sums[:, :7].T
    b = prep.n_bins
    bin_y, bin_p = sums[:, 7 : 7 + b], sums[:, 7 + b :]  # per calibration bin: sum of labels, sum of probs
    n_neg = n - n_pos

    # MCC is 0 (not NaN) when any marginal is empty, e.g. every cell predicted Uninfected; this follows
    # sklearn.metrics.matthews_corrcoef so that numbers stay comparable with published results.
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(mcc_den > 0, (tp * tn - fp * fn) / np.where(mcc_den > 0, mcc_den, 1.0), 0.0)

    # Weighted positives/negatives per distinct score: ties must be grouped so that a tied
    # (parasitized, uninfected) pair counts 1/2 in the AUC, exactly as in the Mann-Whitney statistic.
    pos_w = weights * prep.y
    pos_u = np.add.reduceat(pos_w, prep.starts, axis=1)
    neg_u = np.add.reduceat(weights - pos_w, prep.starts, axis=1)

    # ROC AUC = P(score of a random parasitized cell > score of a random uninfected cell), ties counting 1/2.
    neg_below = np.cumsum(neg_u, axis=1) - neg_u
    roc_auc = _div(np.sum(pos_u * (neg_below + 0.5 * neg_u), axis=1), n_pos * n_neg)

    # Average precision = sum over descending thresholds of (recall increase) x precision, as in sklearn's
    # average_precision_score; a zero-weight threshold adds zero recall, so its precision never matters.
    tp_cum = np.cumsum(pos_u[:, ::-1], axis=1)
    flagged = tp_cum + np.cumsum(neg_u[:, ::-1], axis=1)
    precision = np.divide(tp_cum, flagged, out=np.zeros_like(tp_cum), where=flagged > 0)
    pr_auc = _div(np.sum(pos_u[:, ::-1] * precision, axis=1), n_pos)

    out = {
        "accuracy": _div(tp + tn, n),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        # F1 is undefined (NaN) only when there are no parasitized cells and none were predicted.
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "mcc": mcc,
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "brier": _div(sq_err, n),
        # ECE = sum_b (n_b / n) * |observed fraction_b - mean prob_b| = sum_b |sum y_b - sum p_b| / n.
        "ece": _div(np.sum(np.abs(bin_y - bin_p), axis=1), n),
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
    return out


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, int]:
    """Count the confusion-matrix cells with Parasitized = 1 as the positive class.

    Args:
        y_true: True labels, 0 (Uninfected) or 1 (Parasitized).
        y_pred: Predicted labels, 0 or 1.

    Returns:
        {"tp", "fp", "tn", "fn"} as ints.
    """
    y, pred = _validate(y_true, y_pred)
    if not np.all((pred == 0) | (pred == 1)):
        raise ValueError("y_pred must contain only 0 and 1; threshold probabilities first")
    y_b, pred_b = y == 1, pred == 1
    return {
        "tp": int(np.sum(y_b & pred_b)),
        "fp": int(np.sum(~y_b & pred_b)),
        "tn": int(np.sum(~y_b & ~pred_b)),
        "fn": int(np.sum(y_b & ~pred_b)),
    }


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Compute threshold, ranking and calibration metrics for Parasitized (1) vs Uninfected (0).

    A cell is predicted Parasitized when ``prob >= threshold``. Undefined values are NaN, never an exception:
    sensitivity/NPV/ROC AUC/PR AUC without parasitized cells, specificity/ROC AUC without uninfected cells,
    PPV when nothing is flagged, F1 with neither true nor predicted positives. PR AUC (average precision)
    stays defined when every cell is parasitized. MCC with a zero denominator is 0.0 (sklearn convention).
    ECE uses 15 equal-width bins, each weighted by its share of cells, comparing the observed parasitized
    fraction with the mean predicted probability in the bin.

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probability of Parasitized for each cell.
        threshold: Decision threshold on `prob`.

    Returns:
        accuracy, sensitivity, specificity, ppv, npv, f1, mcc, roc_auc, pr_auc, brier, ece as floats, and the
        cell counts n, n_pos, n_neg as ints.
    """
    y, p = _validate(y_true, prob)
    values = _weighted_metrics(_prepare(y, p, threshold, N_CALIBRATION_BINS), np.ones((1, y.size)))
    result: dict[str, float] = {name: float(values[name][0]) for name in METRIC_NAMES}
    result.update({name: round(float(values[name][0])) for name in COUNT_NAMES})
    return result


def bootstrap_samples(
    y_true: ArrayLike,
    prob: ArrayLike,
    groups: ArrayLike | Sequence[Hashable],
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, NDArray[np.float64]]:
    """Draw patient-level bootstrap replicates of every metric of `binary_metrics`.

    Each replicate draws as many patients as there are, with replacement, and every drawn patient brings all
    of their cells each time they are drawn: cells of one patient are correlated, so resampling cells would
    understate the uncertainty of a new patient population.

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probability of Parasitized for each cell.
        groups: Patient id of each cell.
        threshold: Decision threshold on `prob`.
        n_boot: Number of resamples.
        seed: Seed of the numpy Generator; identical seeds give identical replicates.

    Returns:
        Metric name (including n, n_pos, n_neg) -> array of `n_boot` replicate values (NaN where undefined).
    """
    y, p = _validate(y_true, prob)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    codes, ids = _encode_groups(groups, y.size)
    n_groups = len(ids)
    prep = _prepare(y, p, threshold, N_CALIBRATION_BINS)
    codes_sorted = codes[np.argsort(p, kind="stable")]  # same cell order as `prep`

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups)) if n_groups else np.zeros((n_boot, 0), np.intp)
    # times_drawn[r, g]: how often patient g appears in resample r; every cell of g inherits that weight.
    offsets = np.arange(n_boot)[:, None] * n_groups
    times_drawn = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)

    block = max(1, _MAX_BLOCK_ELEMENTS // max(1, y.size))
    parts = [
        _weighted_metrics(prep, times_drawn[start : start + block][:, codes_sorted].astype(np.float64))
        for start in range(0, n_boot, block)
    ]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def bootstrap_ci(
    y_true: ArrayLike,
    prob: ArrayLike,
    groups: ArrayLike | Sequence[Hashable],
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap confidence intervals that resample patients, not cells.

    Resamples whose metric is undefined (NaN, e.g. no parasitized cells drawn) are ignored; if every
    resample is undefined the bounds are NaN.

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probability of Parasitized for each cell.
        groups: Patient id of each cell.
        threshold: Decision threshold on `prob`.
        n_boot: Number of resamples.
        seed: Seed for reproducible intervals.
        alpha: Two-sided miss rate; 0.05 gives a 95% interval.

    Returns:
        Metric name -> {"value", "low", "high"} where value is the full-data estimate of `binary_metrics`;
        the counts n, n_pos, n_neg get {"value"} only.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    point = binary_metrics(y_true, prob, threshold)
    samples = bootstrap_samples(y_true, prob, groups, threshold, n_boot=n_boot, seed=seed)
    result = _intervals(point, samples, alpha)
    for name in COUNT_NAMES:
        result[name] = {"value": point[name]}
    return result


def _intervals(
    point: dict[str, float], samples: dict[str, NDArray[np.float64]], alpha: float
) -> dict[str, dict[str, float]]:
    """{"value", "low", "high"} per metric of METRIC_NAMES: percentile interval of the replicates, NaNs ignored."""
    result: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        # An all-NaN metric (e.g. sensitivity on a split without parasitized cells) is reported, not warned.
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in METRIC_NAMES:
            low, high = np.nanpercentile(samples[name], [100 * alpha / 2, 100 * (1 - alpha / 2)])
            result[name] = {"value": point[name], "low": float(low), "high": float(high)}
    return result


def paired_difference_ci(
    y_true: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    groups: ArrayLike | Sequence[Hashable],
    threshold_a: float = 0.5,
    threshold_b: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Confidence intervals for metric(A) - metric(B) of two models scored on the same cells.

    Both models are resampled with the same patients in every replicate (paired), so what the patients have in
    common cancels: the interval of the difference is much narrower than the two separate intervals suggest.
    An interval that excludes 0 says the models differ on patients like these; one that holds 0 says they
    cannot be told apart with this many patients.

    Args:
        y_true: True labels, 0 or 1.
        prob_a: P(Parasitized) of model A for each cell.
        prob_b: P(Parasitized) of model B for the same cells.
        groups: Patient id of each cell.
        threshold_a: Decision threshold of A.
        threshold_b: Decision threshold of B.
        n_boot: Number of resamples.
        seed: Seed of the patient draws (shared by A and B).
        alpha: Two-sided miss rate; 0.05 gives a 95% interval.

    Returns:
        Metric name -> {"value": A - B on all cells, "low", "high"}.
    """
    a = bootstrap_samples(y_true, prob_a, groups, threshold_a, n_boot=n_boot, seed=seed)
    b = bootstrap_samples(y_true, prob_b, groups, threshold_b, n_boot=n_boot, seed=seed)
    point_a, point_b = binary_metrics(y_true, prob_a, threshold_a), binary_metrics(y_true, prob_b, threshold_b)
    point = {name: point_a[name] - point_b[name] for name in METRIC_NAMES}
    return _intervals(point, {name: a[name] - b[name] for name in METRIC_NAMES}, alpha)


def choose_threshold(y_true: ArrayLike, prob: ArrayLike, method: str = "youden") -> float:
    """Choose the decision threshold on validation data.

    Candidate thresholds are 0.5 and the midpoints of the gaps between consecutive distinct probabilities
    (plus one below the lowest and one above the highest), which covers every distinct decision rule; a
    midpoint sits as far as possible from the validation scores on both sides. Among equally good candidates
    the one closest to 0.5 wins (the lower one if two are equally close), so 0.5 is kept whenever it is optimal.

    Args:
        y_true: Validation labels, 0 or 1.
        prob: Validation probabilities of Parasitized.
        method: "youden" maximizes sensitivity + specificity - 1 (needs both classes); "accuracy" maximizes
            accuracy.

    Returns:
        Threshold t; predict Parasitized when ``prob >= t``. It can exceed 1.0 when predicting no cell as
        Parasitized is optimal and some probability equals 1.0.
    """
    if method not in ("youden", "accuracy"):
        raise ValueError(f"method must be 'youden' or 'accuracy', got {method!r}")
    y, p = _validate(y_true, prob)
    if y.size == 0:
        raise ValueError("cannot choose a threshold without validation cells")
    n_pos = float(y.sum())
    n_neg = y.size - n_pos
    if method == "youden" and (n_pos == 0 or n_neg == 0):
        raise ValueError("Youden's J needs both Parasitized and Uninfected validation cells")

    scores = np.unique(p)
    above_all = (scores[-1] + 1.0) / 2 if scores[-1] < 1.0 else np.nextafter(1.0, 2.0)
    candidates = np.unique(np.r_[0.5, scores[0] / 2, (scores[:-1] + scores[1:]) / 2, above_all])

    order = np.argsort(p, kind="stable")
    p_sorted = p[order]
    pos_below = np.r_[0.0, np.cumsum(y[order])]  # parasitized cells among the k lowest scores
    n_below = np.searchsorted(p_sorted, candidates, side="left")  # cells predicted Uninfected at each t
    fn = pos_below[n_below]
    tn = n_below - fn
    tp = n_pos - fn
    if method == "youden":
        score = tp / n_pos + tn / n_neg - 1.0
    else:
        score = (tp + tn) / y.size
    # Tolerance so that candidates equal up to float rounding count as ties.
    best = candidates[score >= score.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])


def _by_class(y_true: ArrayLike, prob: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Sorted probabilities of the Parasitized and of the Uninfected cells (both classes must be present)."""
    y, p = _validate(y_true, prob)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if not len(pos) or not len(neg):
        raise ValueError("needs both Parasitized and Uninfected cells")
    return pos, neg


def _check_rate(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], not {value}")


def threshold_for_specificity(neg: NDArray[np.float64], specificity: float) -> float:
    """The lowest threshold at which at least ``specificity`` of the negatives fall below it (Parasitized: p >= t).

    Args:
        neg: P(Parasitized) of the Uninfected cells, sorted ascending, at least one.
        specificity: The least specificity, in (0, 1].

    Returns:
        The threshold (just above the k-th lowest negative; above 1.0 when that negative is 1.0).
    """
    _check_rate("specificity", specificity)
    k = int(np.ceil(specificity * len(neg) - 1e-9))  # negatives that must fall below; 1e-9: float products like 0.9*10
    return float(np.nextafter(neg[k - 1], np.inf))


def threshold_for_sensitivity(pos: NDArray[np.float64], sensitivity: float) -> float:
    """The highest threshold at which at least ``sensitivity`` of the positives reach it (Parasitized: p >= t).

    Args:
        pos: P(Parasitized) of the Parasitized cells, sorted ascending, at least one.
        sensitivity: The least sensitivity, in (0, 1].

    Returns:
        The threshold: the k-th lowest positive, keeping the n - k above it.
    """
    _check_rate("sensitivity", sensitivity)
    return float(pos[int(np.floor((1.0 - sensitivity) * len(pos) + 1e-9))])


def specificity_at_sensitivity(y_true: ArrayLike, prob: ArrayLike, sensitivity: float) -> float:
    """The ROC curve read off at a sensitivity: the best specificity of any threshold reaching it.

    The threshold is chosen on the same cells it is scored on: a property of the ranking, not of an operating point
    chosen beforehand.

    Args:
        y_true: Labels, 0 or 1 (both present).
        prob: Probabilities of Parasitized.
        sensitivity: The least sensitivity, in (0, 1].

    Returns:
        Specificity at the highest threshold whose sensitivity is at least ``sensitivity``.

    Raises:
        ValueError: one class only, or ``sensitivity`` outside (0, 1].
    """
    pos, neg = _by_class(y_true, prob)
    return float((neg < threshold_for_sensitivity(pos, sensitivity)).mean())


def sensitivity_at_specificity(y_true: ArrayLike, prob: ArrayLike, specificity: float) -> float:
    """The ROC curve read off at a specificity: the best sensitivity of any threshold reaching it.

    Args:
        y_true: Labels, 0 or 1 (both present).
        prob: Probabilities of Parasitized.
        specificity: The least specificity, in (0, 1].

    Returns:
        Sensitivity at the lowest threshold whose specificity is at least ``specificity``.

    Raises:
        ValueError: one class only, or ``specificity`` outside (0, 1].
    """
    pos, neg = _by_class(y_true, prob)
    return float((pos >= threshold_for_specificity(neg, specificity)).mean())


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, n_bins: int = N_CALIBRATION_BINS) -> float:
    """Expected calibration error: the cell-weighted mean gap between observed and predicted Parasitized per bin.

    ECE = sum_b (n_b / n) * |observed fraction_b - mean prob_b| over ``n_bins`` equal-width bins of [0, 1] (bin i is
    [i/n_bins, (i+1)/n_bins), 1.0 in the last); the value :func:`binary_metrics` reports as ``ece``.

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probabilities of Parasitized.
        n_bins: Number of bins (15 by default, as everywhere in this package).

    Returns:
        The ECE in [0, 1]; NaN for no cells.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _validate(y_true, prob)
    if not y.size:
        return float("nan")
    idx = _bin_index(p, n_bins)
    gap = np.bincount(idx, weights=y, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins)
    return float(np.sum(np.abs(gap)) / y.size)


def reliability_curve(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = N_CALIBRATION_BINS
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Observed parasitized fraction per equal-width probability bin (the bins used by ECE).

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probabilities of Parasitized.
        n_bins: Number of equal-width bins on [0, 1]; bin i is [i/n_bins, (i+1)/n_bins), 1.0 in the last.

    Returns:
        (bin_centers, observed_frac, counts), each of length n_bins; observed_frac is NaN for empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _validate(y_true, prob)
    idx = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    observed = _div(np.bincount(idx, weights=y, minlength=n_bins), counts)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return (edges[:-1] + edges[1:]) / 2, observed, counts


def per_patient_table(
    y_true: ArrayLike,
    prob: ArrayLike,
    groups: ArrayLike | Sequence[Hashable],
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Summarize predictions per patient, to spot patients on whom the model fails.

    Args:
        y_true: True labels, 0 or 1.
        prob: Predicted probabilities of Parasitized.
        groups: Patient id of each cell.
        threshold: Decision threshold on `prob`.

    Returns:
        One dict per patient, in natural id order (C2 before C10), with keys patient, cells,
        true_infected_frac, pred_infected_frac, mean_prob and errors (misclassified cells).
    """
    y, p = _validate(y_true, prob)
    codes, ids = _encode_groups(groups, y.size)
    k = len(ids)
    pred = (p >= threshold).astype(np.float64)
    cells = np.bincount(codes, minlength=k)
    true_frac = np.bincount(codes, weights=y, minlength=k) / np.maximum(cells, 1)
    pred_frac = np.bincount(codes, weights=pred, minlength=k) / np.maximum(cells, 1)
    mean_prob = np.bincount(codes, weights=p, minlength=k) / np.maximum(cells, 1)
    errors = np.bincount(codes, weights=(pred != y).astype(np.float64), minlength=k)
    rows = [
        {
            "patient": ids[i],
            "cells": int(cells[i]),
            "true_infected_frac": float(true_frac[i]),
            "pred_infected_frac": float(pred_frac[i]),
            "mean_prob": float(mean_prob[i]),
            "errors": round(float(errors[i])),
        }
        for i in range(k)
    ]
    return sorted(rows, key=lambda row: _natural_key(row["patient"]))


@dataclass(frozen=True)
class Proportion:
    """A pooled proportion over clusters (fields of a slide) with a 95 % interval that accounts for clustering."""

    count: int  # positives (infected cells)
    total: int  # all (counted cells)
    estimate: float  # count / total (0-1); NaN when total is 0
    low: float
    high: float
    design_effect: float  # variance over the binomial variance (1 = fields no more alike than random cells)
    clusters: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return {
            "count": self.count,
            "total": self.total,
            "estimate": self.estimate,
            "ci_low": self.low,
            "ci_high": self.high,
            "design_effect": self.design_effect,
            "clusters": self.clusters,
        }


def clustered_proportion(counts: ArrayLike, totals: ArrayLike, *, level: float = 0.95) -> Proportion:
    """Pooled proportion of positives over clusters, with a Clopper-Pearson interval on the effective sample size.

    Parasitemia is counted over the fields (photos) of a slide, and fields differ more than random cells would (a
    clump of infected cells sits in one field): the interval must widen with the between-field variation. The ratio
    estimator's variance over clusters, ``n/(n-1) * sum((y_i - p m_i)^2) / (sum m_i)^2``, divided by the binomial
    variance ``p(1-p)/sum m_i`` is the design effect ``d`` (at least 1); the exact binomial (Clopper-Pearson) interval
    is then taken for ``p * N/d`` positives out of ``N/d`` cells (Korn & Graubard, 1998). It stays valid at 0
    positives (upper bound from the effective size) and reduces to the exact binomial interval for one field.

    Args:
        counts: positives per cluster.
        totals: items per cluster (same length).
        level: confidence level.

    Returns:
        The estimate and its interval (0-1).

    Raises:
        ValueError: mismatched lengths, negative counts or counts above totals.
    """
    from scipy.stats import beta

    y = np.asarray(counts, np.float64).ravel()
    m = np.asarray(totals, np.float64).ravel()
    if y.shape != m.shape or (y < 0).any() or (y > m).any():
        raise ValueError("counts and totals must have the same length, with 0 <= count <= total")
    n_total, n_pos, k = float(m.sum()), float(y.sum()), len(m)
    if n_total == 0:
        return Proportion(0, 0, float("nan"), float("nan"), float("nan"), float("nan"), k)
    p = n_pos / n_total
    deff = 1.0
    binomial_var = p * (1 - p) / n_total
    if k > 1 and binomial_var > 0:
        cluster_var = k / (k - 1) * float(((y - p * m) ** 2).sum()) / n_total**2
        deff = max(1.0, cluster_var / binomial_var)
    n_eff = n_total / deff
    x_eff = p * n_eff
    alpha = 1 - level
    low = 0.0 if x_eff <= 0 else float(beta.ppf(alpha / 2, x_eff, n_eff - x_eff + 1))
    high = 1.0 if x_eff >= n_eff else float(beta.ppf(1 - alpha / 2, x_eff + 1, n_eff - x_eff))
    return Proportion(int(round(n_pos)), int(round(n_total)), p, low, high, deff, k)


PREVALENCES = (0.01, 0.05, 0.5)  # shares of infected cells at which PPV and NPV are reported besides the data's own


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> dict[str, float]:
    """PPV and NPV at a given prevalence (Bayes' rule), from a test's sensitivity and specificity.

    A test set's own PPV reflects its own share of infected cells (~50 % in the NIH set); at the 1-5 % of a real
    smear the same sensitivity and specificity give a far lower PPV.

    Args:
        sensitivity: P(called infected | infected).
        specificity: P(called uninfected | uninfected).
        prevalence: share of infected cells (0-1).

    Returns:
        {"ppv": ..., "npv": ...}; NaN where undefined.
    """
    tp, fn = sensitivity * prevalence, (1 - sensitivity) * prevalence
    tn, fp = specificity * (1 - prevalence), (1 - specificity) * (1 - prevalence)
    return {
        "ppv": tp / (tp + fp) if tp + fp > 0 else float("nan"),
        "npv": tn / (tn + fn) if tn + fn > 0 else float("nan"),
    }
