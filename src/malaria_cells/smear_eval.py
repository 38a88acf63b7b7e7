"""Scoring the smear pipeline against annotated field photos: detection, classification of the found cells, counts
and parasitemia, each with intervals that resample photos (cells of one photo are alike).

Detection: a found cell matches an annotated box when their IoU is at least 0.5 (also reported at 0.3: the boxes are
drawn by hand and often offset by a few px), one-to-one, maximising total IoU. Precision is also given for cells
not cut by the border ("inner"), since annotators rarely boxed those, and "where cells are boxed": annotators also
skipped whole cells in crowded fields, so an inner detection that overlaps no annotated box (IoU < 0.1) cannot be
judged and is left out, as is one the pipeline itself labels "Other" (not a red cell) unless it matched a box.
Classification: the matched cells, with the
annotated type as truth ("difficult" left out). Parasitemia per photo: called infected / counted cells (not cut by
the border) against annotated infected / annotated cells not cut by the border.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria_cells import metrics as M
from malaria_cells import progress
from malaria_cells.boxes import BOXED_IOU, FieldBoxes, load_annotations, match, where_boxed
from malaria_cells.detect import on_border
from malaria_cells.smear import FieldResult, SmearAnalyzer

log = logging.getLogger(__name__)


@dataclass
class PhotoScore:
    """One photo's detection and count figures."""

    image: str
    truth: int  # annotated boxes
    truth_counted: int  # annotated boxes not cut by the border
    found: int
    found_inner: int
    matched50: int
    matched50_inner: int
    matched30: int
    found_boxed: int  # inner detections where cells are boxed (see the module's docstring); its matched ones are
    # exactly the inner matched ones (matched50_inner)
    counted: int  # pipeline's counted cells
    infected: int  # pipeline's infected calls among counted
    truth_infected: int  # annotated infected among truth_counted
    missed: list[tuple[float, float, float, float]] = field(default_factory=list)
    false: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def parasitemia(self) -> float:
        """Called parasitemia, %."""
        return 100 * self.infected / self.counted if self.counted else float("nan")

    @property
    def true_parasitemia(self) -> float:
        """Annotated parasitemia, %."""
        return 100 * self.truth_infected / self.truth_counted if self.truth_counted else float("nan")


def score_photo(result: FieldResult, truth: FieldBoxes) -> tuple[PhotoScore, np.ndarray, np.ndarray, np.ndarray]:
    """Match one photo's cells to its annotated boxes.

    Args:
        result: the pipeline's result for the photo.
        truth: its annotated boxes.

    Returns:
        (scores, truth labels of the matched classified cells, their probabilities, their on_border flags).
    """
    cells = result.cells
    pred = np.array([[c.x, c.y, c.w, c.h] for c in cells], np.float64).reshape(-1, 4)
    inner = np.array([not c.on_border for c in cells], bool)
    tb = truth.boxes.astype(np.float64)
    t_border = on_border(tb, width=result.width, height=result.height)
    r5, c5 = match(pred, tb, iou=0.5)
    r3, _ = match(pred, tb, iou=0.3)
    matched = np.zeros(len(pred), bool)
    matched[r5] = True
    other = np.array([c.label == "Other" for c in cells], bool)
    boxed = inner & (matched | (where_boxed(pred, tb) & ~other))
    unmatched_t = np.setdiff1d(np.arange(len(tb)), c5)
    unmatched_p = np.setdiff1d(np.arange(len(pred)), r5)
    counted_truth = ~t_border & (truth.labels >= 0)
    ps = PhotoScore(
        image=result.image,
        truth=len(tb),
        truth_counted=int((~t_border).sum()),
        found=len(pred),
        found_inner=int(inner.sum()),
        matched50=len(r5),
        matched50_inner=int(inner[r5].sum()),
        matched30=len(r3),
        found_boxed=int(boxed.sum()),
        counted=result.n_cells,
        infected=result.n_infected,
        truth_infected=int((counted_truth & (truth.labels == 1)).sum()),
        missed=[tuple(map(float, tb[i])) for i in unmatched_t],
        false=[tuple(map(float, pred[i])) for i in unmatched_p if inner[i]],
    )
    probs = np.array([cells[i].prob_parasitized for i in r5], np.float64)
    labels = truth.labels[c5]
    keep = (labels >= 0) & ~np.isnan(probs)
    return ps, labels[keep], probs[keep], ~inner[r5][keep]


def evaluate_smear(
    *,
    photos_dir: Path,
    annotations: Path,
    analyzer: SmearAnalyzer,
    out: Path | None = None,
    given_boxes: bool = False,
    names: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the pipeline on annotated photos and score it.

    Args:
        photos_dir: the photos.
        annotations: their boxes (IML JSON or COCO).
        analyzer: the loaded pipeline.
        out: where to write ``metrics.json``, ``report.md`` and overlays of misses and false alarms (the 12 photos
            with the most errors); ``None`` writes nothing.
        given_boxes: classify the annotated boxes instead of detecting (classification judged alone).
        names: only these photo names (a split of your own).
        n_boot: bootstrap resamples of photos.
        seed: bootstrap seed.

    Returns:
        The metrics (JSON-ready).
    """
    truth = load_annotations(annotations)
    names = sorted(n for n in (names or truth) if (Path(photos_dir) / n).is_file() and n in truth)
    scores: list[PhotoScore] = []
    y_all, p_all, g_all = [], [], []
    kept: dict[str, tuple[FieldResult, PhotoScore]] = {}
    with progress.task(f"scoring {len(names)} photos", total=len(names)) as t:
        for name in names:
            result = analyzer.analyze(Path(photos_dir) / name, name=name, boxes=truth[name] if given_boxes else None)
            if result.error:
                log.warning("%s", result.error)
                t.advance()
                continue
            ps, y, p, _ = score_photo(result, truth[name])
            scores.append(ps)
            y_all.append(y)
            p_all.append(p)
            g_all.append(np.full(len(y), len(scores) - 1))
            if out is not None:
                kept[name] = (FieldResult(name, result.width, result.height, result.cells), ps)
                worst = sorted(kept.items(), key=lambda kv: -(len(kv[1][1].missed) + len(kv[1][1].false)))[:12]
                kept = dict(worst)
            t.advance()
    y = np.concatenate(y_all) if y_all else np.zeros(0)
    p = np.concatenate(p_all) if p_all else np.zeros(0)
    g = np.concatenate(g_all) if g_all else np.zeros(0)
    result = _metrics(scores, y, p, g, threshold=analyzer.threshold, n_boot=n_boot, seed=seed)
    result["mode"] = "given boxes (classification only)" if given_boxes else "detected"
    result["model"] = {
        "classifier": analyzer.classifier.source,
        "threshold": analyzer.threshold,
        "detector": None if given_boxes else str(analyzer.detector.path),
        "stain_normalize": analyzer.stain_normalize,
    }
    result["photos"] = [s.image for s in scores]
    if out is not None:
        _write(Path(out), result, kept, Path(photos_dir))
    return result


def _metrics(
    scores: list[PhotoScore], y: np.ndarray, p: np.ndarray, g: np.ndarray, *, threshold: float, n_boot: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    k = len(scores)
    numeric = ("truth", "truth_counted", "found", "found_inner", "matched50", "matched50_inner", "matched30",
               "found_boxed", "counted", "infected", "truth_infected")  # fmt: skip
    arr = {f: np.array([getattr(s, f) for s in scores], np.float64) for f in numeric}

    def ratio(num: str, den: str) -> dict[str, float]:
        n, d = arr[num], arr[den]
        value = n.sum() / d.sum() if d.sum() else float("nan")
        if k < 2:
            return {"value": value, "low": float("nan"), "high": float("nan")}
        draws = rng.integers(0, k, size=(n_boot, k))
        reps = n[draws].sum(1) / np.maximum(d[draws].sum(1), 1e-12)
        lo, hi = np.percentile(reps, [2.5, 97.5])
        return {"value": float(value), "low": float(lo), "high": float(hi)}

    pred_pct = np.array([s.parasitemia for s in scores])
    true_pct = np.array([s.true_parasitemia for s in scores])
    ok = ~np.isnan(pred_pct) & ~np.isnan(true_pct)
    err = pred_pct[ok] - true_pct[ok]
    count_err = arr["counted"] - arr["truth_counted"]
    detection = {
        "recall_iou50": ratio("matched50", "truth"),
        "precision_iou50": ratio("matched50", "found"),
        "precision_iou50_inner": ratio("matched50_inner", "found_inner"),
        "precision_iou50_boxed": ratio("matched50_inner", "found_boxed"),
        "recall_iou30": ratio("matched30", "truth"),
        "precision_iou30": ratio("matched30", "found"),
        "count_error_mean": float(count_err.mean()) if k else float("nan"),
        "count_abs_error_mean": float(np.abs(count_err).mean()) if k else float("nan"),
        "count_abs_error_pct_mean": float(np.mean(np.abs(count_err) / np.maximum(arr["truth_counted"], 1)) * 100)
        if k
        else float("nan"),
    }
    classification: dict[str, Any] = {"cells": int(len(y)), "infected": int(y.sum()) if len(y) else 0}
    if len(y) and 0 < y.sum() < len(y):
        ci = M.bootstrap_ci(y, p, g, threshold=threshold, n_boot=n_boot, seed=seed)
        for name in ("sensitivity", "specificity", "roc_auc", "ppv", "npv", "accuracy"):
            classification[name] = ci[name]
        sens, spec = ci["sensitivity"]["value"], ci["specificity"]["value"]
        ppv = {f"{q:g}": M.predictive_values(sens, spec, q)["ppv"] for q in (*M.PREVALENCES, float(y.mean()))}
        classification["ppv_at_prevalence"] = {q: None if np.isnan(v) else v for q, v in ppv.items()}
    parasitemia = {
        "true_pooled_pct": ratio("truth_infected", "truth_counted"),
        "called_pooled_pct": ratio("infected", "counted"),
        "photo_abs_error_mean_points": float(np.abs(err).mean()) if len(err) else float("nan"),
        "photo_error_mean_points": float(err.mean()) if len(err) else float("nan"),
    }
    for key in ("true_pooled_pct", "called_pooled_pct"):
        parasitemia[key] = {kk: 100 * v for kk, v in parasitemia[key].items()}
    if k >= 2 and len(err):
        draws = rng.integers(0, k, size=(n_boot, k))
        t_in, t_c, c_in, c_c = (
            arr[f][draws].sum(1) for f in ("truth_infected", "truth_counted", "infected", "counted")
        )
        diff = 100 * (c_in / np.maximum(c_c, 1) - t_in / np.maximum(t_c, 1))
        lo, hi = np.percentile(diff, [2.5, 97.5])
        parasitemia["pooled_error_points"] = {
            "value": parasitemia["called_pooled_pct"]["value"] - parasitemia["true_pooled_pct"]["value"],
            "low": float(lo),
            "high": float(hi),
        }
    return {
        "n_photos": k,
        "detection": detection,
        "classification": classification,
        "parasitemia": parasitemia,
        "per_photo": [
            {
                "image": s.image,
                "truth": s.truth,
                "found": s.found,
                "matched50": s.matched50,
                "found_boxed": s.found_boxed,
                "matched50_boxed": s.matched50_inner,  # the same cells (kept: the per-photo row reads alone)
                "counted": s.counted,
                "truth_counted": s.truth_counted,
                "infected": s.infected,
                "truth_infected": s.truth_infected,
                "parasitemia_pct": s.parasitemia,
                "true_parasitemia_pct": s.true_parasitemia,
            }
            for s in scores
        ],
    }


def _fmt(d: Any, digits: int = 3) -> str:
    if isinstance(d, dict) and "value" in d:
        v, lo, hi = d["value"], d.get("low"), d.get("high")
        if lo is None or np.isnan(lo):
            return f"{v:.{digits}f}"
        return f"{v:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    return f"{d:.{digits}f}" if isinstance(d, float) else str(d)


def render_report(m: dict[str, Any]) -> str:
    """report.md of an evaluation."""
    d, c, p = m["detection"], m["classification"], m["parasitemia"]
    lines = [
        f"# Smear pipeline evaluation ({m['mode']}, {m['n_photos']} photos)",
        "",
        f"Classifier `{m['model']['classifier']}` at threshold {m['model']['threshold']:.4f}"
        + (", each photo's cells stain-normalized to the NIH cells" if m["model"].get("stain_normalize") else "")
        + f"; detector `{m['model']['detector']}`. 95 % intervals resample photos ({len(m['photos'])}).",
        "",
        "## Detection",
        "",
        "| metric | value (95 % CI) |",
        "|---|---|",
        f"| recall, IoU 0.5 | {_fmt(d['recall_iou50'])} |",
        f"| precision, IoU 0.5 | {_fmt(d['precision_iou50'])} |",
        f"| precision, IoU 0.5, cells not cut by the border | {_fmt(d['precision_iou50_inner'])} |",
        f"| precision, IoU 0.5, cells not cut by the border, where cells are boxed¹ | "
        f"{_fmt(d['precision_iou50_boxed'])} |",
        f"| recall, IoU 0.3 | {_fmt(d['recall_iou30'])} |",
        f"| precision, IoU 0.3 | {_fmt(d['precision_iou30'])} |",
        f"| count error per photo, mean (counted − annotated) | {d['count_error_mean']:.2f} |",
        f"| count error per photo, mean absolute | {d['count_abs_error_mean']:.2f} "
        f"({d['count_abs_error_pct_mean']:.2f} %) |",
        "",
        f"¹ Leaves out detections that overlap no annotated box (IoU < {BOXED_IOU}: cells nobody boxed, which cannot "
        "be judged) and those the pipeline labels Other (white cells, debris) unless they matched a box.",
        "",
        f"## Classification of matched cells ({c['cells']:,} cells, {c['infected']} infected)",
        "",
    ]
    if "sensitivity" in c:
        lines += ["| metric | value (95 % CI) |", "|---|---|"]
        for name in ("sensitivity", "specificity", "roc_auc", "ppv", "npv"):
            lines.append(f"| {name} | {_fmt(c[name])} |")
        for q, v in c["ppv_at_prevalence"].items():
            lines.append(f"| PPV at prevalence {float(q):.3%} | {'—' if v is None else f'{v:.3f}'} |")
    else:
        lines.append("(one class only among the matched cells: no classification metrics)")
    lines += [
        "",
        "## Parasitemia",
        "",
        "| metric | value (95 % CI) |",
        "|---|---|",
        f"| annotated, pooled (%) | {_fmt(p['true_pooled_pct'])} |",
        f"| called, pooled (%) | {_fmt(p['called_pooled_pct'])} |",
        f"| pooled error (points) | {_fmt(p.get('pooled_error_points', float('nan')))} |",
        f"| per-photo error, mean absolute (points) | {p['photo_abs_error_mean_points']:.3f} |",
        f"| per-photo error, mean (points) | {p['photo_error_mean_points']:.3f} |",
        "",
        "Overlays of the photos with the most misses (blue) and false alarms (magenta) are in `errors/`.",
        "",
        "Research and education use only; not for diagnosis.",
        "",
    ]
    return "\n".join(lines)


def _write(out: Path, m: dict[str, Any], kept: dict[str, tuple[FieldResult, PhotoScore]], photos_dir: Path) -> None:
    from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text
    from malaria_cells.overlay import draw_overlay
    from malaria_cells.preprocess import load_image

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_text(out / "report.md", render_report(m))
    (out / "errors").mkdir(exist_ok=True)
    for name, (res, ps) in kept.items():
        extra = [(b, "missed") for b in ps.missed] + [(b, "false") for b in ps.false]
        title = f"{name}: {len(ps.missed)} missed (blue), {len(ps.false)} false alarms (magenta)"
        img = draw_overlay(load_image(photos_dir / name), res.cells, extra=extra, title=title)
        atomic_write(out / "errors" / f"{Path(name).stem}.jpg", lambda t, im=img: im.save(t, format="JPEG", quality=90))
