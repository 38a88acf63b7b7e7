"""emfet 2.0.0 (PyPI, MIT) beside our models: same training patients, same test patients, same metrics, same clock.

emfet is the packaged alternative a user finds today: five handcrafted features per cell
(``emfet.features.extract_features_from_array`` with the default ``FeatureConfig``: resize to 128x128, Gray World
colour normalisation, adaptive Gaussian threshold on the green channel, morphological opening; features = number of
dark spots, largest and total spot area, HSV saturation of the largest spot, grey-level spread of the cell) and a
classical classifier from ``emfet.evaluate.MODEL_SPECS``. Its recommended pipeline, as its own code states it, is
reproduced here with its own objects, not re-implemented:

- model: the one emfet ships (``best_model_model_card.json``: ``RandomForest``), i.e. ``Pipeline([StandardScaler,
  MODEL_SPECS[model][0]])`` with the search space ``MODEL_SPECS[model][1]``;
- tuning: ``skopt.BayesSearchCV`` exactly as inside ``emfet.evaluate.nested_patient_cv`` (its defaults, or the
  model card's ``fit_config`` where it has one: 15 iterations, 5 points per round, scoring ``accuracy``,
  random_state 42), with ``StratifiedGroupKFold(3, shuffle=True, random_state=42)`` over the training cells grouped
  by OUR patient ids (emfet's loader needs NIH's mapping CSVs and drops the 50 uninfected-only patients without
  them), then refit on all training cells (how emfet made its shipped model). The one deviation: the classifier's
  own ``random_state`` (left unset by emfet, so every fit differs) is fixed to ``--seed`` for a repeatable run;
- decision: emfet classifies with ``pipeline.predict``, the arg-max of ``predict_proba`` (no tuned threshold), which
  is ``P(Parasitized) >= 0.5``; its labels are inverted (``Parasitized = 0``), mapped here to ours (Parasitized = 1);
- decoding: ``cv2.imread`` (BGR), as ``emfet.features.extract_features`` does (``cv2.imdecode`` for zip members).

Data: our ``split.csv``. emfet is fitted on the train patients only and scored on the test patients; the validation
patients are not used (emfet has no threshold or early stopping to choose; our models used them for both). emfet's
bundled ``best_model.pkl`` is never scored: it was fitted on all 200 patients, our test patients included.

Metrics: ``malaria_cells.metrics.bootstrap_ci`` (patient bootstrap, 1000 resamples, seed 0, 95 % percentile: as
``malaria-cells evaluate``), for emfet and for the shipped model (``models/default.onnx``, scored here on the same
test files with its stored threshold). A run folder given with ``--runs`` contributes its ``eval-test/metrics.json``.

Speed: end to end, file on disk -> decode -> features/letterbox -> P(Parasitized), on ``--speed-files`` test files
(evenly spread), batches of ``--batch-size``, ``--threads`` threads for every model (OpenCV, the random forest,
onnxruntime, torch), in interleaved rounds (each model once per round, so load changes hit all alike) after a
warm-up batch; the median over ``--repeat`` rounds is reported. Ratios are ours / emfet.

Features are cached in ``$MALARIA_CELLS_CACHE`` (default ``~/.cache/malaria-cells``) as ``.npz``, keyed by emfet's
version, the feature config, OpenCV's version, the data root and the file list.

Run: .venv/bin/python benchmarks/emfet_compare.py [--data ../shared/nih-cell-images]
     [--split runs/custom-cnn-48/split.csv] [--runs runs/custom-cnn-48 ...] [--threads 1] [--jobs -1]
     [--decode-processes 0] [--workers N] [--speed-files 500] [--repeat 5] [--max-images N]
     [--out benchmarks/results/emfet.json]
Writes benchmarks/results/emfet.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import emfet
import numpy as np
from emfet.data import DEFAULT_LABEL_MAP as EMFET_LABEL_MAP
from emfet.data import POSITIVE_CLASS as EMFET_POSITIVE
from emfet.evaluate import MODEL_SPECS, assert_no_group_leakage, nested_patient_cv
from emfet.features import FEATURE_NAMES, FeatureConfig, extract_features_from_array
from harness import command_line, interleaved_rates, save_result, spread
from harness import machine_info as harness_machine_info
from rich.console import Console
from rich.table import Table

from malaria_cells import metrics as M
from malaria_cells.cache import default_cache_dir
from malaria_cells.data import CLASSES, ZIP_SEP, CellImage, patient_sort_key, read_bytes, resolve_data_dir, scan
from malaria_cells.errors import RunError
from malaria_cells.io import atomic_write
from malaria_cells.progress import parallel_map, task
from malaria_cells.run import Run
from malaria_cells.split import load_split
from malaria_cells.terminal import cli_session
from malaria_cells.terminal import console as progress_console

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "emfet",
    "malaria-cells",
    "scikit-learn",
    "scikit-optimize",
    "opencv-python",
    "numpy",
    "onnxruntime",
    "torch",
)
REPORTED = ("accuracy", "sensitivity", "specificity", "roc_auc", "mcc")
N_BOOT, BOOT_SEED = 1000, 0  # as `malaria-cells evaluate`
EMFET_CARD = Path(emfet.__file__).resolve().parent / "best_model_model_card.json"
console = Console() if sys.stdout.isatty() else Console(width=200)


# --------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """The machine block of the JSON (see :func:`harness.machine_info`), with OpenCV's version."""
    return harness_machine_info(PACKAGES, {"opencv (cv2)": cv2.__version__})


# --------------------------------------------------------------------------------------------- data and split


def key_of(rel: str, label: int) -> str:
    """Match split.csv rows with scanned images across layouts (.webp share vs .png archive): label + file stem."""
    return f"{label}/{Path(rel).stem}"


def split_images(data: Path, split_csv: Path) -> tuple[dict[str, list[CellImage]], list[tuple[str, str]]]:
    """The train / val / test images of ``split_csv`` found in ``data``, each list sorted by relative path.

    Labels and patient ids come from our scan (file names), checked against the CSV; the CSV must not leak.

    Returns:
        ({split: images}, problems: (path, reason) for files the scan skipped).
    """
    load_split(split_csv)  # raises LeakageError if a patient crosses splits
    rows: dict[str, dict[str, str]] = {}
    with open(split_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows[key_of(row["rel"], int(row["label"]))] = row
    found = scan(data)
    out: dict[str, list[CellImage]] = {"train": [], "val": [], "test": []}
    for im in found.images:
        row = rows.get(key_of(im.rel, im.label))
        if row is None:
            continue
        if row["patient"] != im.patient:
            raise SystemExit(f"{split_csv}: {row['rel']} is patient {row['patient']} there, {im.patient} by name")
        out[row["split"]].append(im)
    missing = len(rows) - sum(len(v) for v in out.values())
    if missing:
        progress_console.print(f"[yellow]warning:[/] {missing} image(s) of {split_csv} are not in {data}")
    if not out["train"] or not out["test"]:
        raise SystemExit(f"no train or no test images of {split_csv} found in {data}")
    return out, list(found.problems)


# --------------------------------------------------------------------------------------------- emfet features


def emfet_decode(path: str) -> np.ndarray | None:
    """Decode like emfet: ``cv2.imread`` (BGR) for a file, ``cv2.imdecode`` (as emfet's app) for a zip member."""
    if ZIP_SEP in path:
        try:
            buf = np.frombuffer(read_bytes(path), dtype=np.uint8)
        except OSError:
            return None
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return cv2.imread(path)


def _extract_chunk(paths: list[str], config: FeatureConfig) -> tuple[np.ndarray, dict[int, str], int]:
    """emfet's 5 features of each path; NaN row + reason where emfet cannot use the image (top level: picklable)."""
    cv2.setNumThreads(1)  # one image at a time; parallelism comes from the worker processes
    feats = np.full((len(paths), len(FEATURE_NAMES)), np.nan)
    errors: dict[int, str] = {}
    n_warn = 0
    for i, path in enumerate(paths):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                v = extract_features_from_array(emfet_decode(path), config)
            except Exception as e:  # noqa: BLE001 - emfet's loader also excludes files its extractor raises on
                v, errors[i] = None, f"{path}: extractor failed ({e})"
        n_warn += len(caught)  # emfet warns (and keeps the cell un-normalised) on a zero channel mean
        if v is None:
            errors.setdefault(i, f"{path}: emfet could not decode the image")
        else:
            feats[i] = v
    return feats, errors, n_warn


def features_cache_path(images: list[CellImage], root: str, config: FeatureConfig, cache_dir: Path) -> Path:
    """Cache file of emfet features for this exact file list, emfet version, feature config and OpenCV."""
    head = f"emfet {emfet_version()}|{dataclasses.asdict(config)}|cv2 {cv2.__version__}|{os.path.abspath(root)}"
    h = hashlib.sha256(f"{head}|{len(images)}\n".encode())
    for im in images:
        h.update(f"{im.rel}\t{im.size_bytes}\n".encode())
    return cache_dir / f"emfet-features-{h.hexdigest()[:24]}.npz"


def extract_emfet_features(
    images: list[CellImage],
    *,
    root: str,
    config: FeatureConfig | None = None,
    cache_dir: Path | None = None,
    n_workers: int | None = None,
    label: str = "emfet features",
) -> tuple[np.ndarray, dict[int, str], dict[str, Any]]:
    """emfet's feature vectors of ``images`` (N, 5), from the cache or computed in worker processes.

    Returns:
        (features with NaN rows for unusable images, {index: reason}, info: computed/reused, seconds, images/s).
    """
    config = config or FeatureConfig()
    path = features_cache_path(images, root, config, default_cache_dir(cache_dir))
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            feats, bad, reasons = z["features"], z["bad"], z["reasons"]
        errors = {int(i): str(r) for i, r in zip(bad, reasons, strict=True)}
        return feats, errors, {"cache": str(path), "computed": 0, "reused": len(images)}
    t0 = time.perf_counter()
    feats = np.full((len(images), len(FEATURE_NAMES)), np.nan)
    errors: dict[int, str] = {}
    n_warn = 0
    fn = functools.partial(_extract_chunk, config=config)
    for start, (part, errs, warned) in parallel_map(
        fn, [im.path for im in images], description=label, chunk_size=256, n_workers=n_workers
    ):
        feats[start : start + len(part)] = part
        errors.update({start + i: r for i, r in errs.items()})
        n_warn += warned
    seconds = time.perf_counter() - t0
    bad = np.array(sorted(errors), dtype=np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
            np.savez(f, features=feats, bad=bad, reasons=np.array([errors[i] for i in bad], dtype=str))

    atomic_write(path, write)
    info = {
        "cache": str(path),
        "computed": len(images),
        "reused": 0,
        "seconds": seconds,
        "images_per_s": len(images) / seconds if seconds > 0 else None,
        "workers": n_workers or os.cpu_count(),
        "zero_channel_mean_warnings": n_warn,
    }
    return feats, errors, info


# --------------------------------------------------------------------------------------------- emfet model


def emfet_version() -> str:
    return importlib.metadata.version("emfet")


def emfet_recommended() -> dict[str, Any]:
    """What emfet itself recommends: the model it ships and the search settings of ``nested_patient_cv``.

    The model card of the bundled ``best_model.pkl`` names the model and how it was tuned (``fit_config``); anything
    it does not state comes from ``nested_patient_cv``'s defaults, which is the inner search emfet runs.
    """
    params = inspect.signature(nested_patient_cv).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    card = json.loads(EMFET_CARD.read_text()) if EMFET_CARD.exists() else {}
    fit = card.get("fit_config", {})
    return {
        "model": card.get("model_name", "RandomForest"),
        "source": f"emfet {emfet_version()} best_model_model_card.json (model_name, fit_config) and "
        "emfet.evaluate.nested_patient_cv defaults",
        "n_inner_splits": int(fit.get("n_inner_splits", defaults["n_inner_splits"])),
        "n_bayes_iter": int(fit.get("n_bayes_iter", defaults["n_bayes_iter"])),
        "n_points": int(fit.get("n_points", defaults["n_points"])),
        "random_state": int(fit.get("random_state", defaults["random_state"])),
        "scoring": fit.get("scoring", defaults["scoring"]),
        "card_best_params_all_200_patients": card.get("best_params"),
    }


def to_emfet_labels(y: np.ndarray) -> np.ndarray:
    """Our labels (Parasitized = 1) to emfet's (Parasitized = 0, ``emfet.data.DEFAULT_LABEL_MAP``)."""
    return np.array([EMFET_LABEL_MAP[CLASSES[int(v)]] for v in y], dtype=np.int64)


def fit_emfet(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    model: str,
    n_inner_splits: int,
    n_bayes_iter: int,
    n_points: int,
    random_state: int,
    scoring: str,
    n_jobs: int = -1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Tune and fit emfet's pipeline on training cells exactly as its inner search does, then refit on all of them.

    Args:
        X: emfet feature vectors (N, 5).
        y: OUR labels (Parasitized = 1); converted to emfet's for fitting.
        groups: our patient id of each cell (the CV groups).
        model: a key of ``emfet.evaluate.MODEL_SPECS``.
        n_inner_splits, n_bayes_iter, n_points, random_state, scoring: as ``emfet.evaluate.nested_patient_cv``.
        n_jobs: parallel fits of the search (emfet: -1, all cores).
        seed: the classifier's own random_state, which emfet leaves unset (fixed here so reruns agree).
        progress: called with the number of candidates evaluated so far, after each round of the search.

    Returns:
        (fitted best pipeline, info: best params, inner-CV score, fit seconds, settings).
    """
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from skopt import BayesSearchCV

    estimator, space = MODEL_SPECS[model]
    clf = clone(estimator)
    if "random_state" in clf.get_params() and clf.get_params()["random_state"] is None:
        clf.set_params(random_state=seed)
    n_inner = min(n_inner_splits, len(set(groups.tolist())))
    inner_cv = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=random_state)
    pipeline = Pipeline([("scaler", StandardScaler()), ("classifier", clf)])
    search = BayesSearchCV(
        pipeline,
        space,
        n_iter=n_bayes_iter,
        cv=inner_cv,
        scoring=scoring,
        random_state=random_state,
        n_jobs=n_jobs,
        n_points=n_points,
    )
    t0 = time.perf_counter()

    def callback(res: Any) -> bool:
        if progress:
            progress(len(res.x_iters))
        return False  # True would stop the search

    import joblib

    # Threads, not loky processes: the task pickling of loky fails here on a lock held in the propagated warning
    # filters (PicklingError: cannot pickle '_thread.RLock'); the forest's fitting releases the GIL anyway.
    with joblib.parallel_config(backend="threading"):
        search.fit(X, to_emfet_labels(y), groups=groups, callback=callback)
    fit_s = time.perf_counter() - t0
    best = search.best_estimator_
    info = {
        "model": model,
        "estimator": repr(estimator),
        "search_space": {k: repr(v) for k, v in space.items()},
        "search": "skopt.BayesSearchCV",
        "n_bayes_iter": n_bayes_iter,
        "n_points": n_points,
        "scoring": scoring,
        "random_state": random_state,
        "inner_cv": f"StratifiedGroupKFold(n_splits={n_inner}, shuffle=True, random_state={random_state}) "
        "grouped by our patient ids",
        "classifier_random_state": clf.get_params().get("random_state"),
        "n_jobs": n_jobs,
        "best_params": {k: (v.item() if hasattr(v, "item") else v) for k, v in search.best_params_.items()},
        "inner_cv_best_score": float(search.best_score_),
        "fit_s": fit_s,
    }
    return best, info


def emfet_prob_parasitized(pipeline: Any, X: np.ndarray) -> np.ndarray:
    """P(Parasitized) from emfet's pipeline, whatever the column order of its classes (emfet: Parasitized = 0)."""
    return pipeline.predict_proba(X)[:, list(pipeline.classes_).index(EMFET_POSITIVE)].astype(np.float64)


def emfet_predict_paths(paths: Sequence[str], pipeline: Any, config: FeatureConfig, batch_size: int) -> np.ndarray:
    """End to end for emfet: decode each file, extract its features, P(Parasitized) per batch."""
    out = np.empty(len(paths))
    for a in range(0, len(paths), batch_size):
        feats = np.stack([extract_features_from_array(emfet_decode(p), config) for p in paths[a : a + batch_size]])
        out[a : a + len(feats)] = emfet_prob_parasitized(pipeline, feats)
    return out


# --------------------------------------------------------------------------------------------- our models


def shipped_trained_on_split(clf: Any, split_csv: Path) -> bool | None:
    """Whether the ONNX model was exported from the run that owns ``split_csv`` (None: cannot tell)."""
    created = clf.card.get("source_run_created")
    if not created:
        return None
    try:
        return Run.open(split_csv.parent).meta.created == created
    except RunError:  # the split file is not in a finished run folder
        return None


def run_test_keys(run_dir: Path) -> set[str]:
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as f:
        return {key_of(r["rel"], int(r["label"])) for r in csv.DictReader(f) if r["split"] == "test"}


def run_test_probabilities(run_dir: Path, keys: list[str]) -> np.ndarray | None:
    """A run's P(Parasitized) per test cell from eval-test/predictions.csv, ordered by ``keys`` (None: any missing)."""
    path = run_dir / "eval-test" / "predictions.csv"
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    positive = "Parasitized"
    by_key = {key_of(r["rel"], int(r["true"] == positive)): float(r["prob_parasitized"]) for r in rows}
    if not all(k in by_key for k in keys):
        return None
    return np.array([by_key[k] for k in keys])


def scored(name: str, kind: str, y: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float) -> dict:
    return {
        "name": name,
        "kind": kind,
        "threshold": threshold,
        "metrics_source": "scored here on the test files above",
        "n_cells": int(len(y)),
        "n_patients": len(set(groups.tolist())),
        "metrics": M.bootstrap_ci(y, prob, groups, threshold, n_boot=N_BOOT, seed=BOOT_SEED),
        "confusion": M.confusion(y, (prob >= threshold).astype(int)),
    }


# --------------------------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) and a == a and b == b else None


def print_report(result: dict[str, Any], machine: dict[str, Any]) -> None:
    from malaria_cells.evaluate import format_ci

    t = Table(
        title=f"emfet {result['emfet']['version']} vs ours on {result['test']['n_cells']:,} test cells of "
        f"{result['test']['n_patients']} patients (95% CI: patient bootstrap, {N_BOOT} resamples)"
        + (" [red](SUBSAMPLED: --max-images)[/]" if result["subsampled"] else "")
    )
    t.add_column("model")
    for label in ("accuracy", "sensitivity", "specificity", "ROC AUC", "MCC"):
        t.add_column(label, justify="right")
    t.add_column("cells/s", justify="right")
    t.add_column("acc ×", justify="right")
    t.add_column("AUC ×", justify="right")
    t.add_column("speed ×", justify="right")
    for m in result["models"]:
        r = result["ratios"].get(m["name"], {})
        cells = [format_ci(m["metrics"][k], 3) if m.get("metrics") else "n/a" for k in REPORTED]
        speed = m.get("cells_per_s", {}).get("median")
        t.add_row(
            m["name"] + ("" if m.get("same_test_cells", True) else " [red]*[/]"),
            *cells,
            f"{speed:,.0f}" if speed else "n/a",
            *(f"{r[k]:.3f}" if r.get(k) else "" for k in ("accuracy", "roc_auc")),
            f"{r['cells_per_s']:.1f}" if r.get("cells_per_s") else "",
        )
    console.print(t)
    sp = result["speed"]
    console.print(
        f"speed: {sp['files']} test files end to end (file -> P(Parasitized)), batch {sp['batch_size']}, "
        f"{sp['threads']} thread(s) per model, median of {sp['repeat']} interleaved rounds; "
        f"{machine['cpus_usable']} usable core(s), load average at start {machine['load_average_start'][0]:.2f}"
    )
    if any(not m.get("same_test_cells", True) for m in result["models"]):
        console.print("[red]*[/] metrics not on the same test cells as emfet's (see the JSON)")
    for goal, ok in result["goals"].items():
        console.print(f"{'[green]met[/]' if ok else '[red]NOT met[/]'}  {goal}")


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="images (default: as malaria-cells: $MALARIA_CELLS_DATA, share)")
    ap.add_argument("--split", default="runs/custom-cnn-48/split.csv", help="our by-patient split.csv")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders to add (metrics from eval-test/metrics.json)")
    ap.add_argument("--shipped-model", default=None, help="ONNX file (default: what Classifier.load() loads)")
    ap.add_argument("--threads", type=int, default=1, help="threads per model in the speed test (all models alike)")
    ap.add_argument(
        "--decode-processes",
        type=int,
        default=0,
        help="our models: processes decoding files ahead of the model (malaria-cells predict's large-input mode); "
        "emfet has no such mode, so N > 0 gives ours N more cores than emfet",
    )
    ap.add_argument("--jobs", type=int, default=-1, help="parallel fits in emfet's search (emfet: -1 = all cores)")
    ap.add_argument("--workers", type=int, default=None, help="feature-extraction processes (default: all cores)")
    ap.add_argument("--speed-files", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="the classifier's own random_state (emfet leaves it unset)")
    ap.add_argument("--max-images", type=int, default=None, help="quick try: at most this many train+test images")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/emfet.json")
    return ap.parse_args()


def compare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the comparison measures: (results, machine block)."""

    from malaria_cells.predict import Classifier

    t_start = time.perf_counter()
    machine = machine_info()
    cv2.setNumThreads(args.threads)
    data = resolve_data_dir(args.data)
    split_csv = Path(args.split)
    splits, problems = split_images(data, split_csv)
    full_train, full_test = splits["train"], splits["test"]
    train, test = full_train, full_test
    if args.max_images:
        n_train = max(1, round(args.max_images * len(full_train) / (len(full_train) + len(full_test))))
        train, test = spread(full_train, n_train), spread(full_test, max(1, args.max_images - n_train))
    root = str(data)

    # ---- emfet: features, fit on our train patients, score on our test patients
    rec = emfet_recommended()
    config = FeatureConfig()
    X_tr, err_tr, info_tr = extract_emfet_features(
        train,
        root=root,
        config=config,
        cache_dir=args.cache_dir,
        n_workers=args.workers,
        label="emfet features (train)",
    )
    X_te, err_te, info_te = extract_emfet_features(
        test, root=root, config=config, cache_dir=args.cache_dir, n_workers=args.workers, label="emfet features (test)"
    )
    keep_tr = [i for i in range(len(train)) if i not in err_tr]
    keep_te = [i for i in range(len(test)) if i not in err_te]
    if err_te:
        progress_console.print(f"[yellow]warning:[/] emfet cannot use {len(err_te)} test image(s); they are dropped")
    train_k, test_k = [train[i] for i in keep_tr], [test[i] for i in keep_te]
    y_tr = np.array([im.label for im in train_k])
    g_tr = np.array([im.patient for im in train_k])
    y_te = np.array([im.label for im in test_k])
    g_te = np.array([im.patient for im in test_k])
    assert_no_group_leakage(g_tr, g_te)  # emfet's own guard: no patient in both
    with task(f"emfet {rec['model']} search ({len(y_tr):,} cells)", total=rec["n_bayes_iter"]) as search:
        pipeline, fit_info = fit_emfet(
            X_tr[keep_tr],
            y_tr,
            g_tr,
            model=rec["model"],
            n_inner_splits=rec["n_inner_splits"],
            n_bayes_iter=rec["n_bayes_iter"],
            n_points=rec["n_points"],
            random_state=rec["random_state"],
            scoring=rec["scoring"],
            n_jobs=args.jobs,
            seed=args.seed,
            progress=lambda done: search.update(completed=done),
        )
    clf_step = pipeline.named_steps["classifier"]
    if "n_jobs" in clf_step.get_params():
        clf_step.set_params(n_jobs=args.threads)  # inference threads, as for every other model
    p_emfet = emfet_prob_parasitized(pipeline, X_te[keep_te])
    emfet_says = pipeline.predict(X_te[keep_te]) == EMFET_POSITIVE
    agree = float(np.mean(emfet_says == (p_emfet >= 0.5)))
    emfet_name = f"emfet {emfet_version()} {rec['model']}"
    models = [scored(emfet_name, "emfet", y_te, p_emfet, g_te, 0.5)]
    cell_probs: dict[str, tuple[np.ndarray, float]] = {}  # name -> (P(Parasitized) per test_k cell, threshold)
    models[0]["description"] = "emfet's recommended pipeline, tuned and fitted on our train patients only"

    # ---- the shipped model, scored on the same files
    test_paths = [im.path for im in test_k]
    shipped = Classifier.load(args.shipped_model, threads=args.threads, decode_processes=args.decode_processes)
    with task(f"shipped model on {len(test_paths):,} test cells", total=len(test_paths), transient=True) as t:
        preds = shipped.predict(test_paths, batch_size=args.batch_size, progress=t.advance)
    bad = [p.source for p in preds if not p.ok]
    if bad:
        raise SystemExit(f"the shipped model cannot read {len(bad)} test file(s), e.g. {bad[0]}")
    p_shipped = np.array([p.probability for p in preds])
    shipped_name = f"shipped {Path(shipped.source).name}"
    entry = scored(shipped_name, "shipped", y_te, p_shipped, g_te, shipped.threshold)
    cell_probs[shipped_name] = (p_shipped, shipped.threshold)
    entry["source"] = shipped.source
    entry["description"] = f"{shipped.card.get('model')}, {shipped.card.get('quantization', {}).get('precision', '')}"
    entry["trained_on_this_split"] = shipped_trained_on_split(shipped, split_csv)
    if entry["trained_on_this_split"] is False:
        progress_console.print(
            "[red]warning:[/] the shipped model was not exported from the run that owns this split.csv; its test "
            "patients may have been its training patients"
        )
    models.append(entry)

    # ---- run folders: their own test evaluation, and the same end-to-end speed test
    test_keys = {key_of(im.rel, im.label) for im in full_test}
    run_clfs: dict[str, Any] = {}
    for run in args.runs:
        run_dir = Path(run)
        entry = {"name": str(run_dir), "kind": "run", "metrics_source": str(run_dir / "eval-test" / "metrics.json")}
        mpath = run_dir / "eval-test" / "metrics.json"
        if mpath.exists():
            # `malaria-cells evaluate`'s report; malaria_cells.run.Run has no reader for it (yet).
            ev = json.loads(mpath.read_text())
            same = (
                run_test_keys(run_dir) == test_keys
                and ev["n_cells"] == len(full_test) == len(test_k)  # not subsampled, nothing dropped by emfet
            )
            entry.update(
                model=ev.get("model"),
                threshold=ev.get("threshold"),
                n_cells=ev.get("n_cells"),
                n_patients=ev.get("n_patients"),
                metrics=ev["metrics"],
                bootstrap=ev.get("bootstrap"),
                same_test_cells=same,
            )
            if same:
                probs = run_test_probabilities(run_dir, [key_of(im.rel, im.label) for im in test_k])
                if probs is not None:
                    cell_probs[entry["name"]] = (probs, float(ev["threshold"]))
        else:
            progress_console.print(f"[yellow]warning:[/] {mpath} is missing: run `malaria-cells evaluate {run}` first")
        run_clfs[entry["name"]] = Classifier.load(run_dir, threads=args.threads, decode_processes=args.decode_processes)
        models.append(entry)

    # ---- speed, end to end, interleaved
    speed_paths = spread(test_paths, args.speed_files)
    warm = speed_paths[: args.batch_size]
    fns: dict[str, Callable[[], Any]] = {
        emfet_name: lambda paths=speed_paths: emfet_predict_paths(paths, pipeline, config, args.batch_size),
        shipped_name: lambda paths=speed_paths: shipped.predict(paths, batch_size=args.batch_size),
    }
    for name, clf in run_clfs.items():
        fns[name] = lambda paths=speed_paths, clf=clf: clf.predict(paths, batch_size=args.batch_size)
    emfet_predict_paths(warm, pipeline, config, args.batch_size)
    for clf in (shipped, *run_clfs.values()):
        clf.predict(warm, batch_size=args.batch_size)
    with task(f"timing {len(fns)} models x {args.repeat} rounds", total=len(fns) * args.repeat, transient=True) as t:
        rates = interleaved_rates(fns, len(speed_paths), args.repeat, on_call=t.advance)
    for m in models:
        m["cells_per_s"] = rates[m["name"]]

    # ---- ratios and goals
    base = models[0]
    ratios: dict[str, dict[str, float | None]] = {}
    for m in models[1:]:
        if not m.get("metrics"):
            ratios[m["name"]] = {"cells_per_s": ratio(m["cells_per_s"]["median"], base["cells_per_s"]["median"])}
            continue
        ratios[m["name"]] = {
            "accuracy": ratio(m["metrics"]["accuracy"]["value"], base["metrics"]["accuracy"]["value"]),
            "roc_auc": ratio(m["metrics"]["roc_auc"]["value"], base["metrics"]["roc_auc"]["value"]),
            "mcc": ratio(m["metrics"]["mcc"]["value"], base["metrics"]["mcc"]["value"]),
            "cells_per_s": ratio(m["cells_per_s"]["median"], base["cells_per_s"]["median"]),
            "accuracy_ci_above_emfet": m["metrics"]["accuracy"]["low"] > base["metrics"]["accuracy"]["high"],
            "roc_auc_ci_above_emfet": m["metrics"]["roc_auc"]["low"] > base["metrics"]["roc_auc"]["high"],
        }
        if m["name"] in cell_probs:
            prob, thr = cell_probs[m["name"]]
            diff = M.paired_difference_ci(y_te, prob, p_emfet, g_te, thr, 0.5, n_boot=N_BOOT, seed=BOOT_SEED)
            ratios[m["name"]]["difference_vs_emfet"] = {k: diff[k] for k in ("accuracy", "roc_auc", "mcc")}
    ours = [m for m in models[1:] if m.get("metrics")]
    goals = {
        "every one of our models beats emfet on accuracy": bool(ours)
        and all((ratios[m["name"]]["accuracy"] or 0) > 1 for m in ours),
        "every one of our models beats emfet on ROC AUC": bool(ours)
        and all((ratios[m["name"]]["roc_auc"] or 0) > 1 for m in ours),
        "the shipped model is >= 4x emfet's end-to-end speed": (ratios[shipped_name]["cells_per_s"] or 0) >= 4,
    }

    n_val = len(splits["val"])
    result = {
        "data": str(data),
        "split_file": str(split_csv),
        "split_sha256": hashlib.sha256(split_csv.read_bytes()).hexdigest(),
        "subsampled": bool(args.max_images),
        "train": {
            "n_cells": len(train_k),
            "n_patients": len(set(g_tr.tolist())),
            "n_cells_in_split": len(full_train),
            "used_for": "emfet: features, BayesSearchCV with patient-grouped CV, refit",
        },
        "val": {"n_cells_in_split": n_val, "used_for": "nothing by emfet (no threshold or early stopping to pick)"},
        "test": {
            "n_cells": len(test_k),
            "n_patients": len(set(g_te.tolist())),
            "n_cells_in_split": len(full_test),
            "patients": sorted(set(g_te.tolist()), key=patient_sort_key),
        },
        "emfet": {
            "version": emfet_version(),
            "recommended": rec,
            "feature_config": dataclasses.asdict(config),
            "feature_names": list(FEATURE_NAMES),
            "decoder": "cv2.imread (BGR), as emfet.features.extract_features; cv2.imdecode for zip members",
            "labels": "emfet Parasitized = 0, mapped to ours (Parasitized = 1); P(Parasitized) from predict_proba",
            "decision": "pipeline.predict (arg-max of predict_proba) = P(Parasitized) >= 0.5; no tuned threshold",
            "predict_agrees_with_threshold_0_5": agree,
            "fit": fit_info,
            "feature_extraction": {"train": info_tr, "test": info_te},
            "excluded": {"train": sorted(err_tr.values()), "test": sorted(err_te.values())},
            "bundled_model": "emfet's best_model.pkl is not scored: it was fitted on all 200 NIH patients, "
            "our test patients included",
        },
        "bootstrap": {"unit": "patient", "resamples": N_BOOT, "seed": BOOT_SEED, "interval": "95% percentile"},
        "speed": {
            "files": len(speed_paths),
            "repeat": args.repeat,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "decode_processes": args.decode_processes,
            "what": "end to end per batch: read file, decode, features (emfet) or letterbox (ours), P(Parasitized); "
            "one warm-up batch per model; interleaved rounds; cells/s median (and best) over rounds",
        },
        "models": models,
        "ratios": ratios,
        "ratios_are": "ours / emfet (point estimates; speed: medians); difference_vs_emfet: ours - emfet with a paired "
        "patient bootstrap (same resamples for both), as fractions",
        "goals": goals,
        "goals_cover": [m["name"] for m in ours],
        "runs_without_metrics": [m["name"] for m in models[1:] if not m.get("metrics")],
        "scan_problems": [list(p) for p in problems],
    }
    result["wall_s"] = time.perf_counter() - t_start
    return result, machine


def main() -> None:
    args = parse_args()
    with cli_session():  # the library's progress (feature extraction, prediction) as rich bars on stderr
        result, machine = compare(args)
    save_result(
        args.out, name="emfet_compare", command=command_line(), params=vars(args), results=result, machine=machine
    )
    print_report(result, machine)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
