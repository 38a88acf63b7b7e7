"""Temperature scaling: one number T > 0, fitted on validation patients, that makes P(Parasitized) mean what it says.

A network trained with cross-entropy ranks cells well but its probabilities drift from the observed frequencies on
patients it has not seen (usually over-confident). Temperature scaling (Guo et al., ICML 2017) divides the logit by
one number: P(Parasitized) = sigmoid(logit / T); T > 1 softens, T < 1 sharpens. It is monotone, so the ranking
(ROC-AUC) is unchanged, and a threshold moved with :func:`rescale_threshold` makes exactly the same decisions.

T minimises the negative log-likelihood of the validation patients' labels: a 1-D golden-section search on log T
in [-3, 3] (T from 0.05 to 20), no scipy. The NLL is convex in 1/T, hence unimodal in log T, so the search finds
the minimum. The backends apply the stored T (:mod:`malaria_cells.backends`); ``malaria-cells operating-points RUN``
(:func:`malaria_cells.adapt.store_operating_points`) fits it and stores it with thresholds chosen on its scale.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria_cells import metrics as M
from malaria_cells.backends import OnnxBackend, TorchBackend, probability_from_logit
from malaria_cells.errors import ConfigError

log = logging.getLogger(__name__)

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]: far outside what a trained classifier needs either way
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _checked(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if z.shape != y.shape:
        raise ValueError(f"logits and labels differ in length: {z.size} vs {y.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (Uninfected) or 1 (Parasitized)")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z, y.astype(np.float64)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (binary cross-entropy, nats per cell) of sigmoid(logit / T).

    Args:
        logits: raw log-odds of Parasitized (N,).
        labels: 0 (Uninfected) or 1 (Parasitized) (N,).
        temperature: T > 0.

    Returns:
        The mean NLL (NaN for no cells).
    """
    z, y = _checked(logits, labels)
    if not z.size:
        return math.nan
    s = z / temperature
    # -log sigmoid(s) = softplus(-s), -log(1 - sigmoid(s)) = softplus(s); logaddexp never overflows.
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it did to the NLL of the cells it was fitted on."""

    temperature: float
    nll_before: float  # T = 1
    nll_after: float
    cells: int
    at_bound: bool  # the minimum sits at an end of the search interval (degenerate data: e.g. separable)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = LOG_T_BOUNDS, tol: float = 1e-7
) -> TemperatureFit:
    """The temperature that minimises the NLL of ``labels`` under sigmoid(logit / T).

    Args:
        logits: raw (uncalibrated) log-odds of Parasitized of the validation cells (N,).
        labels: their labels, 0 or 1 (N,).
        bounds: the search interval of log T.
        tol: width of log T at which the search stops.

    Returns:
        The fit.

    Raises:
        ConfigError: no cells, or cells of one class only (any T would do: nothing to fit).
        ValueError: malformed input.
    """
    z, y = _checked(logits, labels)
    if not 0 < y.sum() < y.size:
        raise ConfigError(
            f"a temperature needs validation cells of both classes ({int(y.sum())} Parasitized of {y.size})"
        )
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds must be increasing, not {bounds}")

    def f(u: float) -> float:
        return nll(z, y, math.exp(u))

    # Golden-section search: keeps two interior points and drops the side of the worse one each step.
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    u = (a + b) / 2
    # The interval's ends are never evaluated by the search: compare them, so a minimum at a bound is returned as is.
    best = min((f(u), u), (f(lo), lo), (f(hi), hi))
    u = best[1]
    at_bound = min(u - lo, hi - u) < 1e-3
    if at_bound:
        log.warning("temperature fit at the end of its range (T = %.3g): the validation cells may be separable", u)
    return TemperatureFit(
        temperature=math.exp(u), nll_before=nll(z, y), nll_after=best[0], cells=int(y.size), at_bound=at_bound
    )


def rescale_threshold(threshold: float, *, from_temperature: float, to_temperature: float) -> float:
    """A threshold on P(Parasitized) moved from one temperature's scale to another's, making the same decisions.

    p' = sigmoid(logit(p) * T_from / T_to): the logit it stands for is unchanged. 0 and 1 stay 0 and 1.

    Args:
        threshold: on the probabilities of ``from_temperature``.
        from_temperature: the temperature those probabilities had (1.0: raw).
        to_temperature: the temperature of the new scale.

    Returns:
        The threshold on the new scale.
    """
    p = float(threshold)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], not {threshold}")
    if p in (0.0, 1.0):
        return p
    z = (math.log(p) - math.log1p(-p)) * from_temperature / to_temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def calibration_scores(labels: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """ECE (15 equal-width bins), Brier score, NLL and ROC-AUC of the probabilities a backend gives at ``temperature``.

    Args:
        labels: 0 or 1 (N,).
        logits: raw log-odds (N,).
        temperature: T > 0.

    Returns:
        {"ece", "brier", "nll", "roc_auc", "cells"}.
    """
    z, y = _checked(logits, labels)
    p = probability_from_logit(z, temperature).astype(np.float64)
    m = M.binary_metrics(y, p)
    return {
        "ece": M.expected_calibration_error(y, p),
        "brier": m["brier"],
        "nll": nll(z, y, temperature),
        "roc_auc": m["roc_auc"],
        "cells": int(y.size),
    }


@dataclass
class SplitLogits:
    """Raw logits of the decodable cells of one split, with their labels and patients."""

    logits: np.ndarray  # float64 (N,)
    labels: np.ndarray  # int64 (N,)
    patients: np.ndarray  # (N,) patient id of each cell
    split: str


def split_logits(
    backend: OnnxBackend | TorchBackend,
    *,
    run_dir: Path,
    data_dir: Path,
    split: str,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> SplitLogits:
    """A backend's raw logits (no temperature) for the cells of one split of a run.

    Args:
        backend: the model (its ``logits`` method is called).
        run_dir: the run whose ``split.csv`` says which patients are in ``split``.
        data_dir: folder or zip archive with the images.
        split: "train", "val", "test" or "all".
        batch_size: images per model call.
        cache_dir: decoded-image cache folder.

    Returns:
        The logits, labels and patients.

    Raises:
        RunError: the run has no usable ``split.csv``.
    """
    from malaria_cells.cache import build_or_load
    from malaria_cells.data import scan
    from malaria_cells.evaluate import select_images
    from malaria_cells.progress import task

    found = scan(data_dir)
    images, _ = select_images(run_dir=Path(run_dir), images=found.images, split=split)
    cache = build_or_load(images=images, size=backend.prep.input_size, root=found.root, cache_dir=cache_dir)
    keep = np.flatnonzero(cache.ok)
    out = np.empty(len(keep), dtype=np.float64)
    with task(f"logits of {len(keep):,} {split} cells", total=len(keep), transient=True) as t:
        for a in range(0, len(keep), batch_size):
            xb = np.ascontiguousarray(cache.array[keep[a : a + batch_size]])
            out[a : a + len(xb)] = backend.logits(xb)
            t.advance(len(xb))
    return SplitLogits(
        logits=out,
        labels=np.array([images[i].label for i in keep], dtype=np.int64),
        patients=np.array([images[i].patient for i in keep]),
        split=split,
    )
