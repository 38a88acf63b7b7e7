"""Evaluation of a model on held-out patients: clinical metrics with patient-bootstrap CIs, tables and plots.

The model is a run folder (its ``split.csv`` says which patients it saw, so its own test split can be scored) or
an exported ``.onnx`` file (no split inside: it scores ``--split all`` of a folder of other patients' cells). Both
run through :mod:`malaria_cells.backends`, the code ``predict`` uses.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malaria_cells import metrics as M
from malaria_cells.backends import Backend, load_backend, probabilities
from malaria_cells.cache import ImageCache, build_or_load
from malaria_cells.data import CLASSES, CellImage, DataError, PatientIds, Scan, scan, skipped_summary
from malaria_cells.errors import ModelError, RunError, train_extra_error
from malaria_cells.io import atomic_write_json, atomic_write_text
from malaria_cells.progress import task
from malaria_cells.run import Run
from malaria_cells.split import LEAKY

log = logging.getLogger(__name__)

# Below this many patients a bootstrap over patients has too few units to draw from: its intervals are unreliable.
MIN_PATIENTS_FOR_CI = 10
# What a user can do when the file names carry no NIH patient id (the CLI's evaluate flags).
PATIENT_HINT = (
    "pass --patients FILE (a CSV with columns file,patient) or --patient-regex REGEX (its first group is the "
    "patient id), or --no-patient-ids to make every file its own group"
)

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


def select_images(
    *, run_dir: Path | None, images: list[CellImage], split: str
) -> tuple[list[CellImage], list[str] | None]:
    """Pick the images to evaluate and list any patients that the run trained or validated on.

    Args:
        run_dir: the run (its ``split.csv`` says which patients it saw); None for a model without one (an ONNX
            file), which can only score ``all``.
        images: all images of the data source.
        split: "train", "val", "test" (the run's own split) or "all" (every image of the source).

    Returns:
        (images, overlapping patient ids — non-empty only for ``all`` on data that shares patients; None when
        they cannot be known: ``all`` with no ``split.csv``).

    Raises:
        RunError: a run split asked for without (or with a broken) ``split.csv``.
        ValueError: an unknown split, or none of the split's images in ``images``.
    """
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, not {split!r}")
    run = Run(run_dir) if run_dir is not None else None
    if run is None or (split == "all" and not run.split_path.exists()):
        if split != "all":
            raise ModelError(
                "a model without its run folder carries no split, so its test patients are unknown; evaluate it "
                "with --split all on cells of patients it never saw, or pass its run folder",
                code="model_has_no_split",
            )
        return images, None
    run.split()  # one-line RunError for a missing or broken file; LeakageError if its by-patient split leaks
    by_key: dict[str, tuple[str, str]] = {}
    try:
        with open(run.split_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                by_key[f"{row['label']}/{Path(row['rel']).stem}"] = (row["split"], row["patient"])
    except (OSError, KeyError, UnicodeDecodeError) as e:
        raise RunError(f"{run.split_path}: unreadable split ({e!r})", code="run_split_invalid") from None
    if split == "all":
        seen = {p for s, p in by_key.values() if s in ("train", "val")}
        overlap = sorted({im.patient for im in images} & seen)
        return images, overlap
    chosen = [im for im in images if by_key.get(image_key(im), ("", ""))[0] == split]
    if not chosen:
        raise ValueError(f"none of the run's {split} images were found in this data source")
    return chosen, []


@dataclass(frozen=True)
class SplitPredictions:
    """A model's P(Parasitized) for the decodable cells of one split."""

    meta: dict  # the model's metadata (a run's metadata.json, or an ONNX file's metadata)
    images: list[CellImage]  # the cells scored, in the data source's order
    prob: np.ndarray  # P(Parasitized), averaged over the views
    overlap: list[str] | None  # patients of the data that were in the run's train/val split; None: unknown
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used
    cells_per_s: float | None  # inference speed, every view included
    backend: str = "torch"  # "torch" (run folder) or "onnx"
    patients: PatientIds = field(default_factory=PatientIds.nih)  # where the patient ids came from
    n_files: int = 0  # files found in the data source (images and skipped ones)


def is_run_folder(model: str | Path) -> bool:
    """Whether ``model`` is a run folder (else an exported ONNX file).

    Args:
        model: a run folder or an ``.onnx`` file.

    Returns:
        True for a folder.
    """
    return Path(model).is_dir()


def default_out_dir(model: str | Path, split: str) -> Path:
    """Where an evaluation is written by default: ``RUN/eval-<split>``, or ``MODEL-eval-<split>`` beside an ONNX file.

    Args:
        model: a run folder or an ``.onnx`` file.
        split: the split evaluated.

    Returns:
        The folder.
    """
    model = Path(model)
    if is_run_folder(model):
        return model / f"eval-{split}"
    return model.with_name(f"{model.stem}-eval-{split}")


def load_model(model: str | Path, *, threads: int | None = None) -> Backend:
    """Load the model to evaluate: a run folder's best weights (torch) or an exported ONNX file.

    A run is scored at ``precision="auto"`` (bf16 where native), as training scored its validation split when it
    chose the threshold; ``predict`` uses fp32.

    Args:
        model: a run folder or an ``.onnx`` file.
        threads: intra-op threads (default: the runtime's choice).

    Returns:
        The backend.

    Raises:
        ModelError: missing or unusable (the message names the file).
    """
    return load_backend(Path(model), threads=threads, precision="auto")


def predict_split(
    *,
    model: str | Path | Backend | None = None,
    data_dir: Path,
    split: str,
    views: Sequence[Callable[[np.ndarray], np.ndarray]] = (),
    batch_size: int = 256,
    cache_dir: str | None = None,
    threads: int | None = None,
    run_dir: Path | None = None,
    patients: PatientIds | None = None,
) -> SplitPredictions:
    """Run a model on the cells of one split (from the decoded-image cache).

    Args:
        model: a run folder, an ``.onnx`` file, or a loaded backend (then ``run_dir`` says where its split is).
        data_dir: folder or zip archive with the images.
        split: as for :func:`evaluate_run` (an ONNX file: "all" only).
        views: transforms of the uint8 (N, S, S, 3) batch whose probabilities are averaged (test-time
            augmentation, with either backend); none = the cells as they are.
        batch_size: images per model call.
        cache_dir: decoded-image cache folder.
        threads: intra-op threads when ``model`` is a path.
        run_dir: the run folder: the old name of ``model``, or the split's folder for a loaded backend.
        patients: where patient ids come from (default: NIH file names); files without one are skipped.

    Returns:
        The predictions.

    Raises:
        ModelError: the model cannot be loaded, or a run split asked of a model without one.
        RunError: a run split asked for without (or with a broken) ``split.csv``.
        DataError: every file was skipped or none could be decoded (the message says why).
    """
    if model is None:
        if run_dir is None:
            raise TypeError("predict_split needs model (or run_dir)")
        model = run_dir
    if isinstance(model, (str, Path)):
        split_dir = Path(model) if is_run_folder(model) else None
        backend = load_model(model, threads=threads)
    else:
        split_dir, backend = (Path(run_dir) if run_dir is not None else None), model
    prep, meta = backend.prep, backend.meta
    rule = patients or PatientIds.nih()
    found = scan(data_dir, patients=rule)
    found.require_images(hint=PATIENT_HINT)
    images, overlap = select_images(run_dir=split_dir, images=found.images, split=split)
    cache = build_or_load(images=images, size=prep.input_size, root=found.root, cache_dir=cache_dir)
    keep = np.flatnonzero(cache.ok)
    if not len(keep):
        first = next(iter(cache.errors.values()), "")
        raise DataError(f"none of the {len(images):,} images could be decoded ({first})", code="no_usable_images")
    cells = cache.array[keep] if len(keep) < len(cache.ok) else cache.array  # the memmap itself when it can
    transforms = list(views) or [None]
    prob = np.zeros(len(keep))
    t0 = time.perf_counter()
    label = f"{meta.get('model', 'model')}: {len(keep):,} {split} cells" + (
        f", {len(transforms)} views" if views else ""
    )
    with task(label, total=len(keep) * len(transforms), transient=True) as progress:
        for fn in transforms:
            x = cells if fn is None else np.ascontiguousarray(fn(np.asarray(cells)))
            prob += probabilities(backend, x, batch_size=batch_size, progress=progress.advance)
    seconds = time.perf_counter() - t0
    return SplitPredictions(
        meta=meta,
        images=[images[i] for i in keep],
        prob=prob / len(transforms),
        overlap=overlap,
        skipped=_skipped(cache, found),
        cells_per_s=len(keep) / seconds if seconds > 0 and len(keep) else None,
        backend=backend.name,
        patients=rule,
        n_files=len(found.images) + len(found.problems),
    )


def evaluate_run(
    *,
    model: str | Path | None = None,
    data_dir: Path,
    split: str = "test",
    out_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    threads: int | None = None,
    cache_dir: str | None = None,
    run_dir: Path | None = None,
    patients: PatientIds | None = None,
) -> dict:
    """Evaluate a model with its stored threshold and write metrics, report and plots.

    Args:
        model: a finished run folder (its best weights) or an exported ``.onnx`` file.
        data_dir: folder or zip archive with the images.
        split: "test" (default), "val", "train", or "all" (every image of ``data_dir``: other patients' data;
            the only choice for an ONNX file, which carries no split).
        out_dir: where to write (default :func:`default_out_dir`).
        n_boot: patient-bootstrap resamples for the 95 % CIs (>= 1000 for reported numbers).
        seed: bootstrap seed.
        batch_size: images per model call.
        threads: intra-op threads (default: all cores).
        cache_dir: decoded-image cache folder.
        run_dir: the old name of ``model``.
        patients: where patient ids come from (default: NIH file names; see :class:`~malaria_cells.data.PatientIds`).

    Returns:
        The ``metrics.json`` content. Its ``warnings`` (also logged) name skipped files, too few patients for the
        CIs, no patient ids, and patients the run saw in training.

    Raises:
        ModelError: the model cannot be loaded, or a run split asked of an ONNX file.
        RunError: a run split asked for without (or with a broken) ``split.csv``.
        ExtraMissingError: matplotlib (the ``train`` extra, for the plots) is not installed; checked first.
    """
    try:
        # Imported here, before any work: predict's table renderer imports this module on an inference-only install.
        from malaria_cells import plots
    except ModuleNotFoundError as e:
        raise train_extra_error(e, "evaluate (its plots)") or e from None
    if model is None:
        if run_dir is None:
            raise TypeError("evaluate_run needs model (or run_dir)")
        model = run_dir
    model = Path(model)
    out_dir = Path(out_dir) if out_dir else default_out_dir(model, split)
    pred = predict_split(
        model=model,
        data_dir=data_dir,
        split=split,
        batch_size=batch_size,
        cache_dir=cache_dir,
        threads=threads,
        patients=patients,
    )
    meta, images, prob, overlap = pred.meta, pred.images, pred.prob, pred.overlap
    threshold = float(meta["threshold"])
    y = np.array([im.label for im in images], dtype=np.int64)
    groups = np.array([im.patient for im in images])
    warnings = evaluation_warnings(pred, model=model, n_patients=len(set(groups.tolist())))
    for w in warnings:
        log.warning("%s", w)

    point = M.binary_metrics(y, prob, threshold)
    ci = M.bootstrap_ci(y, prob, groups, threshold, n_boot=n_boot, seed=seed)
    cm = M.confusion(y, (prob >= threshold).astype(int))
    # Without patient ids every file is a "patient": a table of single cells says nothing per patient.
    per_patient = M.per_patient_table(y, prob, groups, threshold) if pred.patients.kind != "none" else []
    split_kind = meta.get("split_kind") or "patient"
    result = {
        "run": str(model),
        "backend": pred.backend,
        "model": meta["model"],
        "strategy": meta.get("strategy"),
        "split": split,
        "split_kind": split_kind,
        "leaky": split_kind == LEAKY,
        "overlapping_patients": overlap or [],
        "overlap_checked": overlap is not None,
        "data": str(data_dir),
        "threshold": threshold,
        "positive_class": CLASSES[1],
        "n_cells": int(len(y)),
        "n_patients": int(len(set(groups.tolist()))),
        "patient_ids": pred.patients.describe(),
        "patient_ids_kind": pred.patients.kind,
        "warnings": warnings,
        "skipped": [{"path": p, "reason": r} for p, r in pred.skipped],
        "metrics": {k: ci[k] for k in ci},
        "point": point,
        "confusion": cm,
        "at_prevalence": {
            f"{q:g}": M.predictive_values(ci["sensitivity"]["value"], ci["specificity"]["value"], q)
            for q in M.PREVALENCES
        },
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
    history = Run(model).history() if is_run_folder(model) else []
    if history:
        plots.plot_training_curves(history, out_dir / "training_curves.png")
    atomic_write_text(out_dir / "report.md", render_report(result, meta, has_curves=bool(history)))
    m = result["metrics"]
    log.info(
        "%s on %s: accuracy %s, sensitivity %s, specificity %s -> %s",
        meta["model"],
        split,
        format_ci(m["accuracy"]),
        format_ci(m["sensitivity"]),
        format_ci(m["specificity"]),
        out_dir / "report.md",
    )
    return result


def evaluation_warnings(pred: SplitPredictions, *, model: Path, n_patients: int) -> list[str]:
    """What a reader of an evaluation must know before trusting its intervals (the CLI prints them).

    Args:
        pred: the predictions (skipped files, patient-id rule, overlap with the run's training patients).
        model: the model evaluated (named in the message about a missing split).
        n_patients: patients among the scored cells.

    Returns:
        One sentence per problem, in order: skipped files, no patient ids or too few patients, training patients.
    """
    out = []
    skipped = skipped_summary(pred.skipped, total=pred.n_files)
    if skipped:
        out.append(skipped)
    if pred.patients.kind == "none":
        out.append(
            "no patient ids: every file is its own group, so the 95 % CIs ignore patient clustering (cells of one "
            "patient are alike, so the intervals are too narrow); pass patient ids for honest intervals"
        )
    elif n_patients < MIN_PATIENTS_FOR_CI:
        out.append(
            f"only {n_patients} patient(s): a bootstrap over fewer than {MIN_PATIENTS_FOR_CI} patients gives "
            "unreliable 95 % CIs"
        )
    overlap = pred.overlap
    if overlap:
        more = "..." if len(overlap) > 8 else ""
        out.append(
            f"{len(overlap)} patient(s) of this data were in the run's train/val split ({', '.join(overlap[:8])}"
            f"{more}); these numbers are optimistic"
        )
    elif overlap is None:
        out.append(
            f"{model} came without its run's split.csv, so whether these patients were seen in training could not "
            "be checked; the numbers hold only for patients it never saw"
        )
    return out


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


def read_metrics(path: str | Path) -> dict:
    """Read the ``metrics.json`` an evaluation wrote (this module owns its format).

    Args:
        path: the file.

    Returns:
        Its content.

    Raises:
        RunError: missing, unreadable, or not an evaluation (no ``metrics``).
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} not found; run `malaria-cells evaluate` first", code="evaluation_missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable evaluation ({e})", code="evaluation_invalid") from None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise RunError(f"{path}: not an evaluation's metrics.json (no metrics)", code="evaluation_invalid")
    return result


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
    what = meta["model"] + (f" ({meta['strategy']})" if meta.get("strategy") else "")
    if result.get("backend") == "onnx":
        what += ", exported ONNX"
    lines = [f"# Evaluation: {what} on the {result['split']} split", ""]
    if result["leaky"]:
        lines += [
            "> **LEAKY SPLIT (by image)** — cells of one patient are in train and test. These numbers are",
            "> inflated and exist only for the leakage audit.",
            "",
        ]
    for w in result.get("warnings", []):  # skipped files, patient ids, patients the run saw in training
        lines += [f"> **Warning:** {w}", ""]
    per_file = result.get("patient_ids_kind") == "none"
    lines += [
        f"- Run: `{result['run']}`; data: `{result['data']}`",
        f"- Patient ids: {result.get('patient_ids', 'NIH file names')}",
        f"- {result['n_cells']:,} cells from {result['n_patients']} {'files' if per_file else 'patients'}; "
        "positive class: "
        f"**{result['positive_class']}**; decision threshold {result['threshold']:.4f} "
        f"(chosen on validation patients by {meta.get('threshold_method', 'youden')})",
        f"- 95 % confidence intervals: percentile bootstrap over **patients** ({result['bootstrap']['resamples']} "
        "resamples), so they reflect patient-to-patient variation.",
        "",
        "| Metric | Value (95 % CI) |",
        "|---|---|",
    ]
    lines += [f"| {label} | {format_ci(m[key])} |" for key, label in REPORT_METRICS]
    if result.get("at_prevalence"):
        lines += [
            "",
            "PPV and NPV at other shares of infected cells (the same sensitivity and specificity; real smears are at",
            "1-5 % or less, where most positive calls are false unless specificity is very high):",
            "",
            "| share of infected cells | PPV | NPV |",
            "|---|---|---|",
        ]
        lines += [f"| {float(q):.0%} | {v['ppv']:.3f} | {v['npv']:.4f} |" for q, v in result["at_prevalence"].items()]
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
    if not result["per_patient"]:
        lines += ["## Per patient", "", "No patient ids: no per-patient table.", ""]
    else:
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
