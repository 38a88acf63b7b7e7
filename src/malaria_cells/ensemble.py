"""Combining predictions at test time: dihedral test-time augmentation (TTA) and ensembles of finished runs.

A red blood cell has no up or down, so the 8 rotations/reflections of a cell image are equally valid views;
averaging P(Parasitized) over them smooths out orientation-specific mistakes. An ensemble averages the
probabilities of several runs trained on the same split. Both are scored like a single run: the threshold is
chosen on the validation patients (never on test), then the test patients give the metrics with
patient-bootstrap CIs. They are evaluation-time combinations of existing runs; ``predict``/``export`` serve one
run at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_cells import metrics as M
from malaria_cells.augment import MAX_VIEWS, dihedral_view
from malaria_cells.data import parse_patient_id
from malaria_cells.evaluate import image_key, predict_split
from malaria_cells.io import atomic_write_text
from malaria_cells.models import set_threads
from malaria_cells.run import Run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probabilities:
    """P(Parasitized) of one run (or combination) for the cells of one split, keyed by image."""

    keys: list[str]  # :func:`malaria_cells.evaluate.image_key` of each cell
    y: np.ndarray  # labels, 1 = Parasitized
    groups: np.ndarray  # patient ids
    prob: np.ndarray
    cells_per_s: float  # inference speed, all views included


def tta_views() -> list[Callable[[np.ndarray], np.ndarray]]:
    """The test-time augmentation views: the 8 numbered dihedral views of :mod:`malaria_cells.augment`.

    Returns:
        ``MAX_VIEWS`` functions of a uint8 (N, S, S, 3) batch; view ``k`` is ``augment.DIHEDRAL[k]``, the transform
        the feature stores number ``k`` too.
    """
    return [functools.partial(dihedral_view, number=v) for v in range(MAX_VIEWS)]


def run_probabilities(
    *, run_dir: Path, data_dir: Path, split: str, tta: bool = False, batch_size: int = 256
) -> Probabilities:
    """P(Parasitized) of a run's best weights on one of its splits, optionally averaged over the 8 views.

    Args:
        run_dir: a finished run.
        data_dir: the images.
        split: "val" or "test".
        tta: average over the 8 dihedral views (:func:`tta_views`).
        batch_size: images per forward pass.

    Returns:
        The probabilities, in the data source's order.
    """
    views = tta_views() if tta else []
    pred = predict_split(run_dir=Path(run_dir), data_dir=data_dir, split=split, views=views, batch_size=batch_size)
    return Probabilities(
        keys=[image_key(im) for im in pred.images],
        y=np.array([im.label for im in pred.images], dtype=np.int64),
        groups=np.array([im.patient for im in pred.images]),
        prob=pred.prob,
        cells_per_s=pred.cells_per_s if pred.cells_per_s is not None else float("nan"),
    )


def average(parts: list[Probabilities]) -> Probabilities:
    """The mean probability of several runs on the cells they all scored (aligned by image key).

    Args:
        parts: one per run, same split.

    Returns:
        The ensemble's probabilities; ``cells_per_s`` is the harmonic combination (every model runs per cell).
    """
    common = set(parts[0].keys)
    for p in parts[1:]:
        common &= set(p.keys)
    order = [k for k in parts[0].keys if k in common]
    probs = []
    for p in parts:
        index = {k: i for i, k in enumerate(p.keys)}
        probs.append(p.prob[[index[k] for k in order]])
    first = {k: i for i, k in enumerate(parts[0].keys)}
    rows = [first[k] for k in order]
    return Probabilities(
        keys=order,
        y=parts[0].y[rows],
        groups=parts[0].groups[rows],
        prob=np.mean(probs, axis=0),
        cells_per_s=1.0 / sum(1.0 / p.cells_per_s for p in parts),
    )


def evaluate_combination(
    *,
    run_dirs: list[Path],
    data_dir: Path,
    tta: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    out_csv: Path | None = None,
) -> dict:
    """Score the mean of several runs (or one run with TTA): threshold on val, metrics with CIs on test.

    Args:
        run_dirs: finished runs trained on the same patient split.
        data_dir: the images.
        tta: average each run over the 8 dihedral views.
        n_boot: patient-bootstrap resamples.
        seed: bootstrap seed.
        threads: torch threads (default: the cores this process may use).
        out_csv: where to write the per-cell test probabilities (optional).

    Returns:
        ``{"runs", "tta", "threshold", "threshold_method", "metrics", "n_cells", "n_patients",
        "inference_cells_per_s"}``; metrics as :func:`malaria_cells.metrics.bootstrap_ci`.

    Raises:
        ValueError: the runs were not trained on the same split.
        RunError: a run folder is unfinished or broken.
    """
    set_threads(threads)
    runs = [Run.open(r) for r in run_dirs]
    splits = {_split_signature(run) for run in runs}
    if len(splits) != 1:
        raise ValueError("an ensemble needs runs trained on the same patient split; these differ")
    method = runs[0].config().threshold_method
    log.info("combining %s%s", ", ".join(run.path.name for run in runs), " with 8-view TTA" if tta else "")
    val = average([run_probabilities(run_dir=r, data_dir=data_dir, split="val", tta=tta) for r in run_dirs])
    test = average([run_probabilities(run_dir=r, data_dir=data_dir, split="test", tta=tta) for r in run_dirs])
    threshold = M.choose_threshold(val.y, val.prob, method=method)
    ci = M.bootstrap_ci(test.y, test.prob, test.groups, threshold, n_boot=n_boot, seed=seed)
    if out_csv is not None:
        lines = ["key,patient,label,prob_parasitized"] + [
            f"{k},{g},{y},{p:.6f}" for k, g, y, p in zip(test.keys, test.groups, test.y, test.prob, strict=True)
        ]
        atomic_write_text(out_csv, "\n".join(lines) + "\n")
    return {
        "runs": [str(r) for r in run_dirs],
        "tta": tta,
        "threshold": threshold,
        "threshold_method": method,
        "metrics": ci,
        "n_cells": int(len(test.y)),
        "n_patients": int(len(set(test.groups.tolist()))),
        "inference_cells_per_s": test.cells_per_s,
    }


def _split_signature(run: Run) -> frozenset[tuple[str | None, str]]:
    """(patient, split) pairs of a run's split: equal for runs trained on the same patient split."""
    return frozenset((parse_patient_id(rel), which) for rel, which in run.split().assignment.items())
