"""``data audit``: rank suspect labels from out-of-fold predictions (confident learning) and estimate the noise rate.

Method (Northcutt et al., "Confident learning", JAIR 2021, binary case): the per-class confidence threshold is the
mean predicted probability of that class over the cells labelled with it (``t1`` = mean P(Parasitized) of cells
labelled Parasitized, ``t0`` = mean P(Uninfected) of cells labelled Uninfected). A cell labelled Parasitized whose
P(Uninfected) reaches ``t0`` (or labelled Uninfected whose P(Parasitized) reaches ``t1``) is *confidently* of the
other class: it enters the off-diagonal of the confident joint. The joint is calibrated so each row sums to its
label's count; its off-diagonal share is the estimated noise rate. Suspects are ranked by how sure the model is of
the other class. The predictions must be out of fold (every cell scored by a model that never saw its patient),
else the model has memorised the very labels it is asked to doubt.

The audit only *ranks*: a suspect is a cell for a person to look at (the contact sheets), not a wrong label.
Training may leave suspects out (``train --exclude-suspects suspects.csv``); cross-validation is always scored on the
original labels.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_cells.cv import Oof, read_oof
from malaria_cells.data import CLASSES, scan
from malaria_cells.evaluate import image_key
from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text
from malaria_cells.overlay import contact_sheet
from malaria_cells.preprocess import letterbox, load_image

log = logging.getLogger(__name__)

SHEET_CELLS = 64  # suspects per contact sheet: 8 x 8 tiles, what a person reviews in one sitting
SHEET_PX = 96


@dataclass
class AuditResult:
    """What the audit found and wrote."""

    n_cells: int
    n_suspects: int
    noise_rate: float
    out_dir: Path


def confident_joint(y: np.ndarray, p: np.ndarray) -> dict:
    """The binary confident joint, calibrated, and the per-class thresholds.

    Args:
        y: given labels (1 = Parasitized).
        p: out-of-fold P(Parasitized).

    Returns:
        ``{"t": [t0, t1], "joint": 2x2 counts (given x confident), "calibrated": 2x2, "noise_rate",
        "noise_rate_by_label": [P(wrong | given Uninfected), P(wrong | given Parasitized)], "suspect": bool mask,
        "score": confidence in the other class}``.
    """
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    probs = np.stack([1 - p, p], axis=1)
    t = np.array([probs[y == k, k].mean() if (y == k).any() else 1.0 for k in (0, 1)])
    above = probs >= t  # confidently of class k
    confident = np.where(above.any(axis=1), np.argmax(np.where(above, probs, -1.0), axis=1), -1)
    joint = np.zeros((2, 2), dtype=np.int64)
    for given in (0, 1):
        for k in (0, 1):
            joint[given, k] = int(((y == given) & (confident == k)).sum())
    counts = np.bincount(y, minlength=2).astype(np.float64)
    row = joint.sum(axis=1, keepdims=True).astype(np.float64)
    calibrated = np.divide(joint * counts[:, None], row, out=np.zeros((2, 2)), where=row > 0)
    noise = float((calibrated[0, 1] + calibrated[1, 0]) / max(1.0, counts.sum()))
    by_label = [float(calibrated[k, 1 - k] / counts[k]) if counts[k] else float("nan") for k in (0, 1)]
    suspect = (confident >= 0) & (confident != y)
    return {
        "t": t.tolist(),
        "joint": joint.tolist(),
        "calibrated": calibrated.round(2).tolist(),
        "noise_rate": noise,
        "noise_rate_by_label": by_label,
        "suspect": suspect,
        "score": probs[np.arange(len(y)), 1 - y],
    }


def mean_oof(paths: list[Path]) -> Oof:
    """Average the out-of-fold probabilities of several seeds (or rows) cell by cell.

    Args:
        paths: ``oof-seed<S>.csv`` files of one cross-validation (same cells).

    Returns:
        The averaged predictions (thresholds and folds from the first file).

    Raises:
        ValueError: the files hold different cells.
    """
    oofs = [read_oof(p) for p in paths]
    for o in oofs[1:]:
        if o.keys != oofs[0].keys:
            raise ValueError("the out-of-fold files hold different cells; average files of one cross-validation")
    first = oofs[0]
    return Oof(
        first.keys, first.patients, first.y, np.mean([o.prob for o in oofs], axis=0), first.threshold, first.fold
    )


def audit_labels(
    *, oof_paths: list[Path], data_dir: Path, out_dir: Path, sheet_cells: int = SHEET_CELLS
) -> AuditResult:
    """Rank suspect labels, estimate the noise rate, and write ``suspects.csv``, ``audit.json``, ``audit.md`` and a
    contact sheet per given label.

    Args:
        oof_paths: out-of-fold prediction files of ``reproduce --cv`` (several: averaged).
        data_dir: the images the CV scored (for the contact sheets).
        out_dir: where to write.
        sheet_cells: suspects per contact sheet.

    Returns:
        The counts and the estimated noise rate.
    """
    oof = mean_oof([Path(p) for p in oof_paths])
    cj = confident_joint(oof.y, oof.prob)
    suspect, score = cj.pop("suspect"), cj.pop("score")
    order = [i for i in np.argsort(-score, kind="stable") if suspect[i]]
    found = scan(data_dir)
    by_key = {image_key(im): im for im in found.images}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "rel", "patient", "label", "prob_parasitized", "confidence_other_class", "fold"])
    for rank, i in enumerate(order, 1):
        im = by_key.get(oof.keys[i])
        rel = im.rel if im is not None else oof.keys[i]
        w.writerow(
            [rank, rel, oof.patients[i], CLASSES[oof.y[i]], f"{oof.prob[i]:.4f}", f"{score[i]:.4f}", oof.fold[i]]
        )
    atomic_write_text(out_dir / "suspects.csv", buf.getvalue())

    per_patient = Counter(str(oof.patients[i]) for i in order)
    sheets = {}
    for label in (1, 0):
        picked = [i for i in order if oof.y[i] == label][:sheet_cells]
        crops, captions = [], []
        for i in picked:
            im = by_key.get(oof.keys[i])
            if im is None:
                continue
            crops.append(letterbox(load_image(im.path), SHEET_PX))
            captions.append(f"{oof.patients[i]} P={oof.prob[i]:.2f}")
        name = f"suspects-labelled-{CLASSES[label].lower()}.png"
        title = (
            f"Labelled {CLASSES[label]}, model confident of {CLASSES[1 - label]} (out of fold): "
            f"top {len(crops)} of {sum(1 for i in order if oof.y[i] == label)}"
        )
        sheet = contact_sheet(crops, captions, title=title, tile=SHEET_PX)
        atomic_write(out_dir / name, lambda tmp, s=sheet: s.save(tmp, format="PNG"))
        sheets[CLASSES[label]] = name
    n_errors = int(((oof.decision_prob >= 0.5).astype(int) != oof.y).sum())
    result = {
        "method": "confident learning (Northcutt et al. 2021), binary; per-class thresholds = mean self-confidence",
        "oof": [str(p) for p in oof_paths],
        "n_cells": int(len(oof.y)),
        "n_patients": len(set(oof.patients.tolist())),
        "n_suspects": len(order),
        "suspects_by_given_label": {CLASSES[k]: int(sum(1 for i in order if oof.y[i] == k)) for k in (0, 1)},
        "oof_errors_at_fold_thresholds": n_errors,
        "top_patients": per_patient.most_common(10),
        "sheets": sheets,
        **cj,
    }
    atomic_write_json(out_dir / "audit.json", result)
    atomic_write_text(out_dir / "audit.md", render_audit(result))
    log.info(
        "audit: %d suspects of %d cells; estimated noise rate %.2f %%", len(order), len(oof.y), 100 * cj["noise_rate"]
    )
    return AuditResult(len(oof.y), len(order), cj["noise_rate"], out_dir)


def render_audit(r: dict) -> str:
    """The audit as Markdown."""
    by = r["suspects_by_given_label"]
    nl = r["noise_rate_by_label"]
    top = ", ".join(f"{p} ({n})" for p, n in r["top_patients"])
    return "\n".join(
        [
            "# Label-noise audit",
            "",
            f"- Method: {r['method']}; out-of-fold predictions of {r['n_cells']:,} cells, {r['n_patients']} patients.",
            f"- Thresholds: t(Uninfected) {r['t'][0]:.3f}, t(Parasitized) {r['t'][1]:.3f}.",
            f"- Suspects: {r['n_suspects']:,} ({by['Parasitized']} labelled Parasitized, {by['Uninfected']} labelled "
            f"Uninfected); out-of-fold errors at the folds' thresholds: {r['oof_errors_at_fold_thresholds']:,}.",
            "- Estimated noise rate (calibrated confident joint, off-diagonal share): "
            f"**{100 * r['noise_rate']:.2f} %** "
            f"of cells ({100 * nl[1]:.2f} % of cells labelled Parasitized, {100 * nl[0]:.2f} % of those labelled "
            "Uninfected). An estimate from one model family's view, not a count of wrong labels: a person decides.",
            f"- Patients with the most suspects: {top}.",
            "",
            "| given \\ confident | Uninfected | Parasitized |",
            "|---|---:|---:|",
            f"| Uninfected | {r['joint'][0][0]:,} | {r['joint'][0][1]:,} |",
            f"| Parasitized | {r['joint'][1][0]:,} | {r['joint'][1][1]:,} |",
            "",
            *(f"![{k}]({v})" for k, v in r["sheets"].items()),
            "",
        ]
    )
