"""``reproduce --cv K``: patient-level K-fold cross-validation of the candidate models, as the literature reports it.

Every patient sits in exactly one test fold (:func:`malaria_cells.split.cv_folds`: infected and uninfected-only
patients dealt separately, folds balanced by cells); each fold's validation patients are drawn from its training
folds and choose that fold's threshold. For every row the results hold:

- per-fold metrics at the fold's own threshold and their mean ± SD over folds (and seeds), as NIH reports;
- pooled out-of-fold (OOF) metrics: every cell scored by the one model that never saw its patient, each at its
  fold's threshold, with 95 % CIs from a bootstrap over patients;
- paired differences between rows on the same cells (the same patient draws for both rows);
- the OOF predictions themselves (``oof-seed<S>.csv``), from which ``data audit`` ranks suspect labels and the final
  fit takes its threshold and operating points.

Each fold is one run folder (``<out>/<row>/seed<S>/fold<F>``); an interrupted invocation resumes fold by fold and
reuses finished folds and their saved predictions.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria_cells import metrics as M
from malaria_cells import plots
from malaria_cells.config import TrainConfig
from malaria_cells.ensemble import Probabilities, average, run_probabilities
from malaria_cells.errors import ConfigError, RunError
from malaria_cells.evaluate import format_ci
from malaria_cells.io import atomic_write_json, atomic_write_text
from malaria_cells.reproduce import METRICS, train_or_reuse
from malaria_cells.run import Run
from malaria_cells.train import resolve_model_defaults

log = logging.getLogger(__name__)

# Operating points chosen on the pooled OOF predictions (see adapt.operating_points).
HIGH_SPECIFICITY = 0.995  # screening low-prevalence smears: about 1 false call per 200 uninfected cells
HIGH_SENSITIVITY = 0.95
# Figures of the literature, shown beside (never mixed into) our CV table.
LITERATURE = (
    {
        "name": "Published project (ResNet50V2 fine-tuned), split by image (leaky)",
        "accuracy": 96.23,
        "roc_auc": None,
        "how": "one split by image: cells of a patient on both sides",
    },
    {
        "name": "NIH, Rajaraman et al. 2018 (ResNet-50 features), patient-level 5-fold CV",
        "accuracy": 95.9,
        "roc_auc": 0.991,
        "how": "patient-level 5-fold CV, mean over folds",
    },
)


@dataclass(frozen=True)
class CvRow:
    """One candidate of the cross-validation: a training recipe, or test-time augmentation of another row."""

    key: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of the recipe
    members: tuple[str, ...] = ()  # evaluation-only row: the mean of these rows' fold models (one: itself)
    tta: bool = False  # evaluation-only row: each member over the 8 dihedral views
    init_from: str | None = None  # finetune: the row whose fold run it starts from (same fold, same seed)
    teachers: tuple[str, ...] = ()  # distillation: rows whose fold runs teach this one (same training patients)
    # distillation: each teacher row's runs of this many consecutive training seeds, from the student's own (1-4);
    # the folds and validation patients do not depend on the training seed, so every teacher saw the same patients
    teacher_seeds: int = 1

    @property
    def trained(self) -> bool:
        """Whether the row trains its own fold runs (else it scores other rows' runs)."""
        return not self.members


# The base recipe (custom CNN, 48 px, strong stain jitter, fp32; shipped until the distilled final fit) and what it is
# compared with. fp32 everywhere: bf16 is emulated on some CPUs and changes results slightly; one precision keeps the
# rows comparable. No early stopping (patience = epochs): on 22-patient validation folds the val AUC wanders by
# ±0.003 from epoch to epoch, and patience 5 stopped a fold at epoch 8 with its best at epoch 3, still at a high
# learning rate; the cosine schedule now runs to its end and the best val-AUC epoch is kept.
_CNN = {
    "model": "custom-cnn",
    "strategy": "scratch",
    "epochs": 30,
    "patience": 30,
    "stain_jitter": 1.0,
    "precision": "fp32",
}
CV_ROWS: tuple[CvRow, ...] = (
    CvRow("custom-cnn-48", "Custom CNN, 48 px (base recipe)", {**_CNN, "input_size": 48}),
    CvRow("custom-cnn-48-tta", "Custom CNN, 48 px + 8-view TTA", members=("custom-cnn-48",), tta=True),
    CvRow("custom-cnn-64", "Custom CNN, 64 px", {**_CNN, "input_size": 64}),
    CvRow("custom-cnn-64-tta", "Custom CNN, 64 px + 8-view TTA", members=("custom-cnn-64",), tta=True),
    CvRow(
        "ensemble-48-64-tta",
        "Ensemble: custom CNN 48 + 64 px, 8-view TTA",
        members=("custom-cnn-48", "custom-cnn-64"),
        tta=True,
    ),
    CvRow(
        "custom-cnn-48-distilled",
        "Custom CNN, 48 px, distilled from the 48 + 64 px TTA ensemble",
        {**_CNN, "input_size": 48},
        teachers=("custom-cnn-48", "custom-cnn-64"),
    ),
    CvRow(
        "custom-cnn-48-distilled-tta",
        "Custom CNN, 48 px, distilled + 8-view TTA",
        members=("custom-cnn-48-distilled",),
        tta=True,
    ),
    CvRow(
        "custom-cnn-48-distilled-2seeds",
        "Custom CNN, 48 px, distilled from two seeds each of the 48 and 64 px networks (4 TTA teachers)",
        {**_CNN, "input_size": 48},
        teachers=("custom-cnn-48", "custom-cnn-64"),
        teacher_seeds=2,
    ),
    CvRow(
        "custom-cnn-48-distilled-2seeds-tta",
        "Custom CNN, 48 px, distilled from 4 teachers + 8-view TTA",
        members=("custom-cnn-48-distilled-2seeds",),
        tta=True,
    ),
    CvRow(
        "custom-cnn-slim-48-distilled",
        "Slim custom CNN, 48 px, distilled from the 48 + 64 px TTA ensemble",
        {**_CNN, "model": "custom-cnn-slim", "input_size": 48},
        teachers=("custom-cnn-48", "custom-cnn-64"),
    ),
    CvRow(
        "custom-cnn-slim-48-distilled-tta",
        "Slim custom CNN, 48 px, distilled + 8-view TTA",
        members=("custom-cnn-slim-48-distilled",),
        tta=True,
    ),
    CvRow("custom-cnn-slim-48", "Slim custom CNN, 48 px", {**_CNN, "model": "custom-cnn-slim", "input_size": 48}),
    CvRow("custom-cnn-40", "Custom CNN, 40 px", {**_CNN, "input_size": 40}),
    CvRow(
        "efficientnet-lite0-frozen",
        "EfficientNet-Lite0, frozen ImageNet base",
        {"model": "efficientnet-lite0", "strategy": "frozen", "weights": "imagenet", "precision": "fp32"},
    ),
    CvRow(
        "efficientnet-lite0-finetune",
        "EfficientNet-Lite0, fine-tuned",
        {
            "model": "efficientnet-lite0",
            "strategy": "finetune",
            "weights": "imagenet",
            "epochs": 3,
            "precision": "fp32",
        },
        init_from="efficientnet-lite0-frozen",
    ),
)
# Dependency order is added by rows_by_key; trained rows first in this order, so an interrupted CV has the shipped
# recipe's row complete first. The slim network is not a default: the 48 px network already runs at 10,300 cells/s
# int8 (benchmarks/inference_matrix.py, target 5,000), so its five distilled folds (~40 min on 2 cores) would buy
# speed nobody needs; `--rows custom-cnn-slim-48-distilled-tta` measures it.
DEFAULT_ROWS = (
    "custom-cnn-48-tta",
    "custom-cnn-64-tta",
    "ensemble-48-64-tta",
    "custom-cnn-48-distilled-tta",
)


ROW_BY_KEY = {r.key: r for r in CV_ROWS}


def rows_by_key(keys: list[str] | tuple[str, ...]) -> tuple[CvRow, ...]:
    """The rows named by ``keys``, with the rows they depend on added first.

    Args:
        keys: row keys of :data:`CV_ROWS`.

    Returns:
        The rows in dependency order.

    Raises:
        ConfigError: an unknown key (the message lists the known ones).
    """
    known = ROW_BY_KEY
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ConfigError(f"unknown CV row(s) {unknown}; known: {', '.join(known)}")
    out: list[CvRow] = []

    def add(key: str) -> None:
        row = known[key]
        for dep in (*row.members, row.init_from, *row.teachers):
            if dep:
                add(dep)
        if row not in out:
            out.append(row)

    for k in keys:
        add(k)
    return tuple(out)


def fold_config(
    row: CvRow,
    *,
    folds: int,
    fold: int,
    seed: int,
    split_seed: int,
    runs: dict[str, Path] | None = None,
    teachers: list[Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The resolved training config of one fold of a trained row.

    Args:
        row: a training row (not a TTA row).
        folds: K.
        fold: the test fold.
        seed: the training seed.
        split_seed: the seed of the folds (shared by every seed and row, so rows are compared on the same folds).
        runs: this fold's finished run per row key (for ``init_from``).
        teachers: this fold's finished teacher runs (a distilled row; :func:`teacher_runs` names them).
        overrides: config fields applied last (tests: ``max_images``, ``epochs``).

    Returns:
        The config.
    """
    values: dict[str, Any] = {
        **row.config,
        "cv_folds": folds,
        "cv_fold": fold,
        "seed": seed,
        "split_seed": split_seed,
    }
    if row.init_from:
        values["init_from"] = str((runs or {})[row.init_from])
    if row.teachers:
        if not teachers:
            raise ConfigError(f"{row.key} is distilled: its fold's teacher runs are needed")
        values["distill_from"] = ",".join(str(t) for t in teachers)
    values.update(overrides or {})
    return resolve_model_defaults(TrainConfig(**values))


def teacher_runs(row: CvRow, *, seed: int) -> list[tuple[str, int]]:
    """The (teacher row, training seed) pairs that teach ``row``'s student of seed ``seed``.

    Args:
        row: a distilled row.
        seed: the student's training seed.

    Returns:
        Each teacher row at seeds ``seed`` .. ``seed + teacher_seeds - 1``, row by row.

    Raises:
        ConfigError: a teacher that is not a plain trained row (an evaluation row, or one fine-tuned from another).
    """
    for t in row.teachers:
        teacher = ROW_BY_KEY.get(t)
        if teacher is None or not teacher.trained or teacher.init_from:
            raise ConfigError(f"{row.key}: teacher {t!r} must be a row trained from scratch")
    return [(t, seed + j) for t in row.teachers for j in range(row.teacher_seeds)]


@dataclass
class FoldPredictions:
    """P(Parasitized) of one fold's model on its validation and test cells, and the threshold chosen on val."""

    fold: int
    seed: int
    threshold: float
    keys: list[str]
    patients: list[str]
    y: np.ndarray
    prob: np.ndarray
    best_epoch: int | None = None
    train_time_s: float | None = None


def _predictions_path(out_dir: Path, row: CvRow, seed: int, fold: int) -> Path:
    return out_dir / row.key / f"seed{seed}" / f"fold{fold}-predictions.json"


def fold_predictions(
    *,
    run_dirs: list[Path],
    tta: bool,
    data_dir: Path,
    path: Path,
    fold: int,
    seed: int,
    threshold_method: str,
    memo: dict[tuple[str, str, bool], Probabilities] | None = None,
) -> FoldPredictions:
    """Score finished fold runs (their mean) on their val and test patients, reusing a saved result.

    Args:
        run_dirs: the fold's run folder(s): one for a trained row, its members' for an evaluation-only row.
        tta: each run over the 8 dihedral views.
        data_dir: the images.
        path: where the predictions are saved (reused while newer than the run's weights).
        fold: the test fold.
        seed: the training seed.
        threshold_method: how the fold's threshold is chosen on its validation patients.
        memo: one run's probabilities per (run, split, TTA), kept across rows: an ensemble row then reuses its
            members' (the TTA rows have just scored them) instead of scoring them again.

    Returns:
        The fold's test predictions and val-chosen threshold.
    """
    runs = [Run.open(r) for r in run_dirs]
    newest = max(r.weights_path("best").stat().st_mtime for r in runs)
    if path.exists() and path.stat().st_mtime >= newest:
        d = json.loads(path.read_text(encoding="utf-8"))  # our own cache file, not a run folder's
        return FoldPredictions(
            fold=d["fold"],
            seed=d["seed"],
            threshold=d["threshold"],
            keys=d["keys"],
            patients=d["patients"],
            y=np.array(d["y"], dtype=np.int64),
            prob=np.array(d["prob"], dtype=np.float64),
            best_epoch=d.get("best_epoch"),
            train_time_s=d.get("train_time_s"),
        )
    memo = {} if memo is None else memo

    def scored(run_dir: Path, split: str) -> Probabilities:
        key = (str(run_dir), split, tta)
        if key not in memo:
            memo[key] = run_probabilities(run_dir=run_dir, data_dir=data_dir, split=split, tta=tta)
        return memo[key]

    val = average([scored(r, "val") for r in run_dirs])
    test = average([scored(r, "test") for r in run_dirs])
    threshold = float(M.choose_threshold(val.y, val.prob, method=threshold_method))
    fp = FoldPredictions(
        fold=fold,
        seed=seed,
        threshold=threshold,
        keys=list(test.keys),
        patients=[str(g) for g in test.groups],
        y=np.asarray(test.y, dtype=np.int64),
        prob=np.asarray(test.prob, dtype=np.float64),
        best_epoch=runs[0].meta.best_epoch if len(runs) == 1 else None,
        train_time_s=sum(r.meta.train_time_s or 0.0 for r in runs),
    )
    atomic_write_json(
        path,
        {
            "fold": fold,
            "seed": seed,
            "threshold": threshold,
            "keys": fp.keys,
            "patients": fp.patients,
            "y": fp.y.tolist(),
            "prob": [round(float(p), 7) for p in fp.prob],
            "best_epoch": fp.best_epoch,
            "train_time_s": fp.train_time_s,
        },
    )
    return fp


@dataclass
class Oof:
    """Out-of-fold predictions of one row and seed, every cell once."""

    keys: list[str]
    patients: np.ndarray
    y: np.ndarray
    prob: np.ndarray  # raw P(Parasitized) of the fold model that never saw the patient
    threshold: np.ndarray  # that fold's threshold, per cell
    fold: np.ndarray

    @property
    def decision_prob(self) -> np.ndarray:
        """P re-centred per fold so that 0.5 is each fold's threshold (monotone within a fold): thresholded metrics
        of the pooled predictions, each cell at its own fold's threshold."""
        eps = 1e-7
        p = np.clip(self.prob, eps, 1 - eps)
        t = np.clip(self.threshold, eps, 1 - eps)
        z = np.log(p / (1 - p)) - np.log(t / (1 - t))
        return 1.0 / (1.0 + np.exp(-z))

    def sorted_by_key(self) -> Oof:
        """The same predictions ordered by cell key (rows and seeds then align cell by cell)."""
        order = np.argsort(np.array(self.keys))
        return Oof(
            keys=[self.keys[i] for i in order],
            patients=self.patients[order],
            y=self.y[order],
            prob=self.prob[order],
            threshold=self.threshold[order],
            fold=self.fold[order],
        )


def pool(folds: list[FoldPredictions]) -> Oof:
    """Concatenate the folds' test predictions into out-of-fold predictions (sorted by cell key).

    Raises:
        ValueError: a cell scored in two folds (the folds were not a partition).
    """
    keys = [k for f in folds for k in f.keys]
    if len(set(keys)) != len(keys):
        raise ValueError("a cell was scored in two folds: the folds do not partition the patients")
    return Oof(
        keys=keys,
        patients=np.array([p for f in folds for p in f.patients]),
        y=np.concatenate([f.y for f in folds]),
        prob=np.concatenate([f.prob for f in folds]),
        threshold=np.concatenate([np.full(len(f.y), f.threshold) for f in folds]),
        fold=np.concatenate([np.full(len(f.y), f.fold) for f in folds]),
    ).sorted_by_key()


def pooled_metrics(oof: Oof, *, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Pooled OOF metrics with patient-bootstrap CIs: thresholded metrics at each cell's fold threshold, ROC-AUC (and
    the calibration figures) on the raw probabilities; both bootstraps draw the same patients.

    Args:
        oof: the out-of-fold predictions.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        Metric -> {"value", "low", "high"}, as :func:`malaria_cells.metrics.bootstrap_ci`.
    """
    thresholded = M.bootstrap_ci(oof.y, oof.decision_prob, oof.patients, 0.5, n_boot=n_boot, seed=seed)
    raw = M.bootstrap_ci(oof.y, oof.prob, oof.patients, 0.5, n_boot=n_boot, seed=seed)
    for name in ("roc_auc", "pr_auc", "brier", "ece"):
        if name in raw:
            thresholded[name] = raw[name]
    return thresholded


def paired(a: Oof, b: Oof, *, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Paired patient-bootstrap differences A − B on the cells both scored (thresholded metrics at each row's fold
    thresholds; ROC-AUC on raw probabilities).

    Args:
        a: row A's OOF predictions.
        b: row B's OOF predictions (same cells).
        n_boot: resamples.
        seed: bootstrap seed (the same patient draws for A and B).

    Returns:
        Metric -> {"value": A − B, "low", "high"}.

    Raises:
        ValueError: the rows scored different cells.
    """
    if a.keys != b.keys:
        raise ValueError("paired differences need both rows scored on the same cells (same folds)")
    diff = M.paired_difference_ci(a.y, a.decision_prob, b.decision_prob, a.patients, n_boot=n_boot, seed=seed)
    raw = M.paired_difference_ci(a.y, a.prob, b.prob, a.patients, n_boot=n_boot, seed=seed)
    diff["roc_auc"] = raw["roc_auc"]
    return diff


def _summary(values: list[float]) -> dict[str, float | None]:
    clean = [v for v in values if v == v]
    return {
        "mean": statistics.fmean(clean) if clean else None,
        "sd": statistics.stdev(clean) if len(clean) > 1 else None,
        "n": len(clean),
    }


def cross_validate(
    *,
    data_dir: Path,
    out_dir: Path,
    folds: int = 5,
    rows: tuple[CvRow, ...] | None = None,
    seeds: tuple[int, ...] = (0,),
    split_seed: int = 0,
    n_boot: int = 1000,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict:
    """Train every row on every fold (and seed), score out of fold, and write ``cv.json``, ``cv.md`` and ``cv.png``.

    Args:
        data_dir: folder or zip archive of cell images.
        out_dir: output folder (fold runs inside; finished folds are reused, interrupted ones resumed).
        folds: K.
        rows: the candidates (default :data:`DEFAULT_ROWS`).
        seeds: training seeds; every seed uses the same folds.
        split_seed: seed of the folds.
        n_boot: patient-bootstrap resamples.
        overrides: config fields applied to every trained row (tests: ``max_images``, ``epochs``).
        command: the command line, written into the results.

    Returns:
        The results dict (also ``cv.json``).
    """
    rows = rows_by_key(DEFAULT_ROWS) if rows is None else rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    oofs: dict[tuple[str, int], Oof] = {}
    results_rows: list[dict] = []
    out: dict = {}
    memo: dict[tuple[str, str, bool], Probabilities] = {}  # scored runs, shared by the rows of this invocation
    per_fold: dict[str, list[dict]] = {r.key: [] for r in rows}
    fold_info: dict[str, list[FoldPredictions]] = {r.key: [] for r in rows}
    n_runs = len(seeds) * folds * sum(1 for r in rows if r.trained)
    done = 0
    # Row by row (rows come in dependency order), so an interrupted CV leaves whole rows finished.
    for row in rows:
        for seed in seeds:
            for fold in range(folds):

                def fold_run(key: str, s: int = seed, f: int = fold) -> Path:
                    return out_dir / key / f"seed{s}" / f"fold{f}"

                if row.trained:
                    done += 1
                    log.info("CV %s: seed %d, fold %d/%d (run %d/%d)", row.key, seed, fold + 1, folds, done, n_runs)
                    deps = {k: fold_run(k) for k in (row.init_from,) if k}
                    teachers = []
                    for t, s in teacher_runs(row, seed=seed):
                        if s != seed:
                            # A teacher seed this invocation's seeds may not cover: trained (or reused) here, on
                            # the same folds, as its own row would be. (Its own seed's run came first: rows are in
                            # dependency order.)
                            teacher = ROW_BY_KEY[t]
                            cfg_t = fold_config(
                                teacher, folds=folds, fold=fold, seed=s, split_seed=split_seed, overrides=overrides
                            )
                            train_or_reuse(cfg_t, data_dir=data_dir, run_dir=fold_run(t, s), resume=True)
                        teachers.append(fold_run(t, s))
                    config = fold_config(
                        row,
                        folds=folds,
                        fold=fold,
                        seed=seed,
                        split_seed=split_seed,
                        runs=deps,
                        teachers=teachers,
                        overrides=overrides,
                    )
                    train_or_reuse(config, data_dir=data_dir, run_dir=fold_run(row.key), resume=True)
                run_dirs = [fold_run(k) for k in (row.members or (row.key,))]
                fp = fold_predictions(
                    run_dirs=run_dirs,
                    tta=row.tta,
                    data_dir=data_dir,
                    path=_predictions_path(out_dir, row, seed, fold),
                    fold=fold,
                    seed=seed,
                    threshold_method=Run.open(run_dirs[0]).config().threshold_method,
                    memo=memo,
                )
                m = M.binary_metrics(fp.y, fp.prob, fp.threshold)
                per_fold[row.key].append(
                    {
                        "seed": seed,
                        "fold": fold,
                        "threshold": fp.threshold,
                        "n_cells": int(len(fp.y)),
                        "n_patients": len(set(fp.patients)),
                        "best_epoch": fp.best_epoch,
                        "train_time_s": fp.train_time_s,
                        **{k: m[k] for k in METRICS},
                    }
                )
                fold_info[row.key].append(fp)
        for seed in seeds:
            oof = pool([fp for fp in fold_info[row.key] if fp.seed == seed])
            oofs[(row.key, seed)] = oof
            _write_oof(out_dir / row.key / f"oof-seed{seed}.csv", oof)
        first = oofs[(row.key, seeds[0])]
        fold_rows = per_fold[row.key]
        results_rows.append(
            {
                "key": row.key,
                "name": row.name,
                "config": row.config,
                "members": list(row.members),
                "tta": row.tta,
                "trained": row.trained,
                "per_fold": fold_rows,
                "mean_sd": {k: _summary([f[k] for f in fold_rows]) for k in METRICS},
                "pooled": pooled_metrics(first, n_boot=n_boot, seed=0),
                "pooled_by_seed": {
                    str(s): {k: v["value"] for k, v in pooled_metrics(oofs[(row.key, s)], n_boot=1, seed=0).items()}
                    for s in seeds
                },
                "operating_points": _operating_points(first),
                "best_epochs": [f["best_epoch"] for f in fold_rows if f["best_epoch"] is not None],
                "train_time_s": sum(f["train_time_s"] or 0.0 for f in fold_rows),
                "n_cells": int(len(first.y)),
                "n_patients": len(set(first.patients.tolist())),
                "oof": [str(out_dir / row.key / f"oof-seed{s}.csv") for s in seeds],
            }
        )
        # Written after every row: an interrupted CV leaves the finished rows' results readable.
        out = _results(
            results_rows,
            oofs,
            complete=len(results_rows) == len(rows),
            meta={
                "command": command or f"malaria-cells reproduce --cv {folds} --data {data_dir} --out {out_dir}",
                "date": dt.date.today().isoformat(),
                "data": str(data_dir),
                "folds": folds,
                "seeds": list(seeds),
                "split_seed": split_seed,
                "n_boot": n_boot,
                "wall_s": time.perf_counter() - t_all,
                "overrides": overrides or {},
                "rows_planned": [r.key for r in rows],
            },
        )
        atomic_write_json(out_dir / "cv.json", out)
        atomic_write_text(out_dir / "cv.md", render_cv(out))
        _plot(out, out_dir / "cv.png")
        log.info("wrote %s (%d of %d rows)", out_dir / "cv.md", len(results_rows), len(rows))
    return out


def _results(results_rows: list[dict], oofs: dict[tuple[str, int], Oof], *, complete: bool, meta: dict) -> dict:
    """The results document of the rows finished so far: paired differences against the first row, the best row."""
    seed0 = meta["seeds"][0]
    reference = results_rows[0]["key"]
    differences = [
        {
            "a": r["key"],
            "b": reference,
            "diff": paired(oofs[(r["key"], seed0)], oofs[(reference, seed0)], n_boot=meta["n_boot"], seed=0),
        }
        for r in results_rows[1:]
    ]
    best = max(results_rows, key=lambda r: r["pooled"]["accuracy"]["value"])
    return {
        **meta,
        "complete": complete,
        "rows": results_rows,
        "paired_differences": differences,
        "reference": reference,
        "best": best["key"],
        "literature": list(LITERATURE),
    }


def _operating_points(oof: Oof) -> dict[str, float]:
    from malaria_cells.adapt import operating_points  # the one definition of the named points

    return operating_points(oof.y, oof.prob, specificity=HIGH_SPECIFICITY, sensitivity=HIGH_SENSITIVITY)


def _write_oof(path: Path, oof: Oof) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "patient", "label", "fold", "threshold", "prob_parasitized"])
    for k, g, y, f, t, p in zip(oof.keys, oof.patients, oof.y, oof.fold, oof.threshold, oof.prob, strict=True):
        w.writerow([k, g, int(y), int(f), f"{t:.6f}", f"{p:.7f}"])
    atomic_write_text(path, buf.getvalue())


def read_oof(path: Path) -> Oof:
    """Read ``oof-seed<S>.csv`` (written by :func:`cross_validate`).

    Args:
        path: the file.

    Returns:
        The out-of-fold predictions.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return Oof(
        keys=[r["key"] for r in rows],
        patients=np.array([r["patient"] for r in rows]),
        y=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        prob=np.array([float(r["prob_parasitized"]) for r in rows]),
        threshold=np.array([float(r["threshold"]) for r in rows]),
        fold=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
    )


def read_results(out_dir: Path) -> dict:
    """The ``cv.json`` of a finished cross-validation.

    Raises:
        RunError: no ``cv.json`` in ``out_dir`` (code ``cv_results_missing``).
    """
    path = Path(out_dir) / "cv.json"
    if not path.exists():
        raise RunError(
            f"{path}: no cross-validation results; run `malaria-cells reproduce --cv 5` first",
            code="cv_results_missing",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(d: dict) -> str:
    """A bootstrap result in percent: ``value (low–high)``, two decimals."""
    return format_ci({k: None if d.get(k) is None else 100 * d[k] for k in ("value", "low", "high")}, 2)


def _msd(s: dict, pct: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    f, digits = (100, 2) if pct else (1, 4)
    sd = f" ± {f * s['sd']:.{digits}f}" if s["sd"] is not None else ""
    return f"{f * s['mean']:.{digits}f}{sd}"


def render_cv(out: dict) -> str:
    """The cross-validation tables as Markdown."""
    first = out["rows"][0]
    lines = [
        f"# Patient-level {out['folds']}-fold cross-validation",
        "",
        f"- Command: `{out['command']}`",
        *(
            []
            if out.get("complete", True)
            else [
                f"- **Incomplete: {len(out['rows'])} of {len(out['rows_planned'])} rows finished** (the same command "
                "resumes where it stopped; finished folds are reused)."
            ]
        ),
        f"- Date {out['date']}; data `{out['data']}`; {first['n_cells']:,} cells of {first['n_patients']} patients, "
        f"each patient in exactly one test fold (stratified: infected and uninfected-only patients dealt "
        f"separately; fold seed {out['split_seed']}); training seeds {', '.join(map(str, out['seeds']))}; each "
        "fold's threshold chosen on validation patients drawn from its training folds.",
        "- Pooled: every cell scored by the fold model that never saw its patient, at that fold's threshold; 95 % "
        f"CIs from {out['n_boot']:,} bootstrap resamples of patients. Mean ± SD: over "
        f"{len(out['seeds']) * out['folds']} fold runs (folds × seeds), as NIH reports.",
        "",
        "## Pooled out-of-fold metrics (%; ROC-AUC)",
        "",
        "| Model | Accuracy | Sensitivity | Specificity | ROC-AUC | MCC |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        p = r["pooled"]
        lines.append(
            f"| {r['name']} | {_pct(p['accuracy'])} | {_pct(p['sensitivity'])} | {_pct(p['specificity'])} | "
            f"{format_ci(p['roc_auc'], 4)} | {format_ci(p['mcc'], 3)} |"
        )
    lines += [
        "",
        "## Per fold: mean ± SD",
        "",
        "| Model | Accuracy | Sensitivity | Specificity | ROC-AUC | Fold accuracies | Best epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        s = r["mean_sd"]
        accs = ", ".join(f"{100 * f['accuracy']:.1f}" for f in r["per_fold"])
        epochs = ", ".join(map(str, r["best_epochs"])) if r["trained"] else "(its members')"
        lines.append(
            f"| {r['name']} | {_msd(s['accuracy'])} | {_msd(s['sensitivity'])} | {_msd(s['specificity'])} | "
            f"{_msd(s['roc_auc'], pct=False)} | {accs} | {epochs} |"
        )
    if len(out["seeds"]) > 1:
        lines += ["", "Pooled accuracy by training seed (the spread of one run): "]
        for r in out["rows"]:
            by = ", ".join(f"seed {s}: {100 * v['accuracy']:.2f}" for s, v in r["pooled_by_seed"].items())
            lines.append(f"- {r['name']}: {by}")
    if out["paired_differences"]:
        ref = next(r["name"] for r in out["rows"] if r["key"] == out["reference"])
        lines += [
            "",
            f"## Paired differences against {ref} (points; ROC-AUC × 100)",
            "",
            "Same cells, same patient draws for both rows: an interval that excludes 0 is a real difference on "
            "patients like these.",
            "",
            "| Model − reference | Accuracy | Sensitivity | Specificity | ROC-AUC × 100 |",
            "|---|---|---|---|---|",
        ]
        names = {r["key"]: r["name"] for r in out["rows"]}
        for d in out["paired_differences"]:
            x = d["diff"]
            cells = [
                f"{100 * x[k]['value']:+.2f} ({100 * x[k]['low']:+.2f} to {100 * x[k]['high']:+.2f})"
                for k in ("accuracy", "sensitivity", "specificity", "roc_auc")
            ]
            lines.append(f"| {names[d['a']]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Beside the literature (not comparable row by row)",
        "",
        "| Source | Accuracy % | ROC-AUC | How measured |",
        "|---|---|---|---|",
    ]
    for lit in out["literature"]:
        auc = f"{lit['roc_auc']:.3f}" if lit["roc_auc"] else "—"
        lines.append(f"| {lit['name']} | {lit['accuracy']:.2f} | {auc} | {lit['how']} |")
    best = next(r for r in out["rows"] if r["key"] == out["best"])
    ops = best["operating_points"]
    lines += [
        "",
        f"Operating points of the best row ({best['name']}) on its pooled OOF predictions: balanced "
        f"{ops['balanced']:.3f}, high specificity ({HIGH_SPECIFICITY:.1%}) {ops['high_specificity']:.3f}, high "
        f"sensitivity ({HIGH_SENSITIVITY:.0%}) {ops['high_sensitivity']:.3f}.",
        "",
        "![cross-validation](cv.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(out: dict, path: Path) -> None:
    bars = [
        {
            "name": r["name"],
            "value": r["pooled"]["accuracy"]["value"],
            "low": r["pooled"]["accuracy"]["low"],
            "high": r["pooled"]["accuracy"]["high"],
            "published": None,
        }
        for r in out["rows"]
    ]
    plots.plot_comparison(bars, path, metric="accuracy")


def final_fit(
    *,
    cv_dir: Path,
    data_dir: Path,
    run_dir: Path,
    row_key: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Train a row's recipe on every patient (no validation, no test) with the epochs, threshold and operating
    points its cross-validation chose, and say so in the run's metadata.

    The epochs are the median best epoch over the folds; the threshold is the balanced (Youden) point of the pooled
    out-of-fold predictions, and the operating points come from them too (thousands of patients' cells instead of
    one validation split's). When a TTA row of the same recipe was cross-validated, its threshold is stored as
    ``tta_threshold`` for ``predict --tta``. The run has no test patients: its figures are the CV estimate.

    Args:
        cv_dir: a finished cross-validation's output folder.
        data_dir: the images (the same as the CV's).
        run_dir: the new run folder.
        row_key: the recipe (default: the CV's best row; a TTA row means its base recipe plus its TTA threshold).
        seed: training seed.
        overrides: config fields applied last (tests).

    Returns:
        ``run_dir``.

    Raises:
        ConfigError: the row was not cross-validated.
    """

    out = read_results(cv_dir)
    by_key = {r["key"]: r for r in out["rows"]}
    trained = [r for r in out["rows"] if r.get("trained", True)]
    key = row_key or max(trained, key=lambda r: r["pooled"]["accuracy"]["value"])["key"]
    if key not in by_key:
        raise ConfigError(f"row {key!r} is not in {cv_dir}/cv.json (rows: {', '.join(by_key)})")
    chosen = by_key[key]
    if len(chosen.get("members") or ()) > 1:
        raise ConfigError(
            f"{key} is an ensemble of several models, not one recipe; fit a trained row (a distilled one)"
        )
    base = by_key[chosen["members"][0]] if chosen.get("members") else chosen
    tta = chosen if chosen.get("tta") else None
    tta = tta or next((r for r in out["rows"] if r.get("tta") and r.get("members") == [base["key"]]), None)
    epochs = max(1, round(statistics.median(base["best_epochs"])))
    row = next(r for r in CV_ROWS if r.key == base["key"])
    values = {**row.config, "seed": seed, "val_fraction": 0.0, "test_fraction": 0.0, "epochs": epochs}
    values["patience"] = max(epochs, 1)  # no validation: train the chosen number of epochs, no early stop
    if row.teachers:
        # The teachers' own final fits teach the final student, as each fold's teachers taught that fold's student.
        teachers = [
            final_fit(
                cv_dir=cv_dir,
                data_dir=data_dir,
                run_dir=Path(run_dir).parent / f"{Path(run_dir).name}-teacher-{t}{'' if s == seed else f'-seed{s}'}",
                row_key=t,
                seed=s,
                overrides=overrides,
            )
            for t, s in teacher_runs(row, seed=seed)
        ]
        values["distill_from"] = ",".join(str(t) for t in teachers)
    values.update(overrides or {})
    config = resolve_model_defaults(TrainConfig(**values))
    train_or_reuse(config, data_dir=data_dir, run_dir=Path(run_dir), resume=True)
    run = Run.open(run_dir)
    meta = run.meta.to_dict()
    ops = base["operating_points"]
    meta["threshold"] = ops["balanced"]
    meta["threshold_method"] = "youden on pooled out-of-fold predictions of the cross-validation"
    meta["operating_points"] = ops
    meta["operating_points_chosen_on"] = (
        f"pooled out-of-fold predictions of {out['folds']}-fold patient-level CV ({base['n_cells']:,} cells, "
        f"{base['n_patients']} patients; row {base['key']}); high specificity {HIGH_SPECIFICITY}, high sensitivity "
        f"{HIGH_SENSITIVITY}"
    )
    if tta is not None:
        meta["tta_threshold"] = tta["operating_points"]["balanced"]
        meta["tta_operating_points"] = tta["operating_points"]
    meta["final_fit"] = True
    meta["cv_estimate"] = {
        "note": "final fit: no test patients; estimate from cross-validation",
        "command": out["command"],
        "folds": out["folds"],
        "row": base["key"],
        "epochs_from_cv": f"median best epoch over folds: {epochs}",
        "pooled": {k: base["pooled"][k] for k in METRICS},
        "tta_pooled": {k: tta["pooled"][k] for k in METRICS} if tta is not None else None,
        "mean_sd": base["mean_sd"],
    }
    run.save_meta(meta)
    log.info("final fit %s: %d epochs, threshold %.3f from CV", run_dir, epochs, ops["balanced"])
    return Path(run_dir)
