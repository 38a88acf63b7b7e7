"""Adapting a cell model to a new lab with a few hundred labelled cells of its own.

A model trained on one lab's cells (NIH) ranks another lab's cells well (ROC-AUC ~0.98 on IML-Malaria) but its
threshold and its notion of "normal" stain do not carry over: at the low parasitemia of real smears, a specificity of
0.96 triples the count. :func:`adapt` fine-tunes every layer on the lab's labelled cells, with stain jitter and
class-balanced batches (infected cells are ~1 % of a smear), picks the operating points on held-out photos of that
lab, and writes a new run folder (plus its ONNX file) that ``predict``, ``smear`` and ``serve`` take like any other.

The lab's photos (or cell files) are split by consecutive names into train / validation / test blocks (neighbouring
photos are fields of one slide): validation chooses the epoch and the thresholds, test reports before and after,
with intervals that resample photos.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from malaria_cells import metrics as M
from malaria_cells import progress
from malaria_cells.augment import augment, stain_jitter
from malaria_cells.backends import probability_from_logit
from malaria_cells.boxes import load_annotations
from malaria_cells.calibrate import TemperatureFit, fit_temperature, rescale_threshold, split_logits
from malaria_cells.errors import ConfigError
from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text
from malaria_cells.models import predict_logits, set_threads, to_input
from malaria_cells.run import Run
from malaria_cells.smear import crop_cells
from malaria_cells.stain import normalize_cells

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The report also reads the test cells' ROC curve at this sensitivity (0-1): a screening aim for a lab's model.
READ_OFF_SENSITIVITY = 0.9


@dataclass(frozen=True)
class AdaptConfig:
    """How a model is adapted to a lab."""

    epochs: int = 8
    lr: float = 3e-4  # peak AdamW learning rate: a tenth of training from scratch, so the NIH features survive
    batch_size: int = 64  # half infected, half uninfected cells (balanced batches)
    val_fraction: float = 0.2  # last-but-one block of the sorted photos: epoch and thresholds
    test_fraction: float = 0.2  # last block: before/after report
    target_specificity: float = 0.995  # the high-specificity operating point (low-prevalence screening)
    target_sensitivity: float = 0.95  # the high-sensitivity operating point
    stain_jitter: bool = True
    # Each photo's cells moved to the NIH cells' stain before training (and, through the model's metadata, before
    # every later classification in `smear`): the NIH features then meet colours they know. Photos only.
    stain_normalize: bool = False
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 < self.lr < 1 or self.batch_size < 2:
            raise ConfigError(f"invalid adapt settings: {self}")
        if not (
            0 < self.val_fraction < 0.5
            and 0 <= self.test_fraction < 0.5
            and self.val_fraction + self.test_fraction < 0.8
        ):
            raise ConfigError("val_fraction and test_fraction must each be in (0, 0.5) and leave >= 20 % for training")


@dataclass
class LabCells:
    """A lab's labelled cells in the model's input form."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # (N,) 1 infected
    groups: np.ndarray  # (N,) photo (or file) each cell came from
    source: str


def lab_cells(*, data: Path, annotations: Path | None, size: int, stain_normalize: bool = False) -> LabCells:
    """Labelled cells of a lab, cut out into the training form.

    Args:
        data: a folder of field photos (with ``annotations``), or a folder with ``Parasitized/`` and ``Uninfected/``
            cell images (each file its own group; loose crops on a light background are segmented).
        annotations: the photos' boxes (IML JSON or COCO); "difficult" boxes are left out.
        size: the model's input side.
        stain_normalize: move each photo's cells to the NIH cells' stain (:mod:`malaria_cells.stain`), as ``smear``
            does for a model adapted this way; photos only.

    Returns:
        The cells.

    Raises:
        ConfigError: no labelled cells, or ``stain_normalize`` without photos.
    """
    from PIL import Image

    from malaria_cells.preprocess import ImageError, letterbox, load_image
    from malaria_cells.segment import on_black, segment_crop

    images, labels, groups = [], [], []
    if stain_normalize and annotations is None:
        # The stain is measured per photo, over its cells: a folder of separate cells has no photo to measure.
        raise ConfigError("stain normalization needs field photos with --annotations, not a folder of cells")
    if annotations is not None:
        boxes = load_annotations(annotations)
        names = sorted(n for n in boxes if (Path(data) / n).is_file())
        with progress.task(f"cutting out the cells of {len(names)} photos", total=len(names)) as t:
            for name in names:
                fb = boxes[name]
                keep = fb.labels >= 0
                rgb = np.asarray(load_image(Path(data) / name))
                crops, _, ok, _ = crop_cells(rgb, fb.boxes[keep], size=size)
                # All the photo's boxed cells measure its stain, as smear's detected red cells do.
                images.append(normalize_cells(crops[ok])[0] if stain_normalize else crops[ok])
                labels.append(fb.labels[keep][ok])
                groups += [name] * int(ok.sum())
                t.advance()
        source = f"{Path(data).name} + {Path(annotations).name}"
    else:
        for label, folder in ((1, "Parasitized"), (0, "Uninfected")):
            for f in sorted((Path(data) / folder).glob("*")):
                try:
                    img = load_image(f)
                except ImageError as e:
                    log.warning("skipped %s", e)
                    continue
                rgb = np.asarray(img)
                if not on_black(rgb):
                    # The segmenter predict --segment uses, so the lab's cells are trained on as they are classified.
                    cell = segment_crop(rgb)
                    if cell is None:
                        log.warning("skipped %s: no cell found in the crop", f)
                        continue
                    img = Image.fromarray(cell)
                images.append(letterbox(img, size)[None])
                labels.append(np.array([label]))
                groups.append(f.name)
        source = Path(data).name
    if not images:
        raise ConfigError(f"{data}: no labelled cells found")
    return LabCells(np.concatenate(images), np.concatenate(labels).astype(np.int64), np.array(groups), source)


def block_split(groups: np.ndarray, *, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Train / val / test by consecutive sorted group names (photos of one slide stay together)."""
    names = sorted(set(groups.tolist()))
    n = len(names)
    n_test = round(n * test_fraction)
    n_val = max(1, round(n * val_fraction))
    out = {}
    for i, name in enumerate(names):
        out[name] = "test" if i >= n - n_test else "val" if i >= n - n_test - n_val else "train"
    return out


def operating_points(y: np.ndarray, p: np.ndarray, *, specificity: float, sensitivity: float) -> dict[str, float]:
    """Thresholds on P(Parasitized): balanced (Youden), high specificity (the lowest threshold whose specificity
    reaches ``specificity``, and at least the balanced one), high sensitivity (the highest whose sensitivity reaches
    ``sensitivity``, and at most the balanced one)."""
    neg, pos = np.sort(p[y == 0]), np.sort(p[y == 1])
    high_spec = M.threshold_for_specificity(neg, specificity) if len(neg) else 0.5
    high_sens = M.threshold_for_sensitivity(pos, sensitivity) if len(pos) else 0.5
    balanced = float(M.choose_threshold(y, p, method="youden"))
    return {
        "balanced": balanced,
        # never less strict / more strict than the balanced point: the names promise an order
        "high_specificity": max(balanced, min(1.0, high_spec)),
        "high_sensitivity": min(balanced, high_sens),
    }


@dataclass
class StoredPoints:
    """What :func:`store_operating_points` stored in a run's metadata."""

    operating_points: dict[str, float]
    threshold: float  # the run's default threshold, moved to the new probability scale (same decisions)
    temperature: float | None  # None: no temperature stored (T = 1)
    fit: TemperatureFit | None  # None with temperature=False


def store_operating_points(
    *,
    run: Path,
    data: Path,
    specificity: float = 0.995,
    sensitivity: float = 0.95,
    temperature: bool = True,
    cache_dir: str | None = None,
) -> StoredPoints:
    """Fit a run's temperature and choose its operating points on its own validation patients; store both in its
    ``metadata.json`` (``export`` then carries them into the ONNX file).

    With ``temperature`` the validation cells' raw logits fit T (:func:`malaria_cells.calibrate.fit_temperature`) and
    the named thresholds are chosen on sigmoid(logit / T), the probabilities every backend then returns; without it
    the run's probabilities stay raw (a temperature stored earlier is removed). The run's default ``threshold`` is
    moved to the new scale (:func:`~malaria_cells.calibrate.rescale_threshold`: the same decisions), and
    ``val_metrics_at_threshold`` is recomputed on it (its ECE and Brier score change, nothing else).

    Args:
        run: a finished run folder.
        data: its images.
        specificity: of the high-specificity point (0.995: screening smears of low parasitemia).
        sensitivity: of the high-sensitivity point.
        temperature: fit and store a temperature (False: store none).
        cache_dir: decoded-image cache folder.

    Returns:
        The points, the moved threshold and the temperature fit.

    Raises:
        ConfigError: validation cells of one class only.
    """
    from malaria_cells.backends import TorchBackend

    r = Run.open(run)
    val = split_logits(
        TorchBackend(r, precision="fp32"), run_dir=r.path, data_dir=Path(data), split="val", cache_dir=cache_dir
    )
    y = val.labels
    fit = fit_temperature(val.logits, y) if temperature else None
    old_t, new_t = r.meta.temperature or 1.0, fit.temperature if fit else 1.0
    extra = r.meta.to_dict()
    if new_t != old_t and (extra.get("tta_threshold") is not None or extra.get("tta_operating_points")):
        # A mean of sigmoid(logit_view / T) over views is not a monotone function of the mean at another T: these
        # thresholds cannot be moved exactly, and left alone they would be on the wrong scale.
        raise ConfigError(
            f"{r.path}: its TTA thresholds were chosen on probabilities at temperature {old_t:g}; changing the "
            f"temperature to {new_t:g} would leave them on another scale (keep it, or choose them again)"
        )
    p = probability_from_logit(val.logits, new_t)  # exactly what the backends will return
    points = operating_points(y, p, specificity=specificity, sensitivity=sensitivity)
    old_threshold = r.meta.threshold
    threshold = rescale_threshold(old_threshold, from_temperature=old_t, to_temperature=new_t)
    meta = r.meta.to_dict()
    meta["threshold"] = threshold
    meta["val_metrics_at_threshold"] = M.binary_metrics(y, p, threshold)
    meta["operating_points"] = points
    meta["operating_points_chosen_on"] = (
        f"{len(y):,} validation cells of the run's own split; high specificity {specificity}, "
        f"high sensitivity {sensitivity}" + (f"; probabilities at temperature {new_t:.4f}" if fit else "")
    )
    if fit:
        meta["temperature"] = fit.temperature
        meta["temperature_fitted_on"] = (
            f"{fit.cells:,} validation cells of the run's own split: NLL {fit.nll_before:.4f} at T=1, "
            f"{fit.nll_after:.4f} at T={fit.temperature:.4f}"
        )
    else:
        meta["temperature"] = None
        meta.pop("temperature_fitted_on", None)
    if "output" in meta:  # the trainer's one-line description of the output
        meta["output"] = f"one logit; sigmoid(logit{' / temperature' if fit else ''}) = P(Parasitized)"
    r.save_meta(meta)
    log.info(
        "%s: temperature %s, threshold %.4f -> %.4f, operating points %s",
        r.path,
        f"{new_t:.4f}" if fit else "none",
        old_threshold,
        threshold,
        points,
    )
    return StoredPoints(points, threshold, fit.temperature if fit else None, fit)


@dataclass
class AdaptResult:
    """What :func:`adapt` wrote and measured."""

    out: Path
    onnx: Path
    threshold: float
    operating_points: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)


def _scores(y: np.ndarray, p: np.ndarray, g: np.ndarray, threshold: float, n_boot: int) -> dict[str, Any]:
    ci = M.bootstrap_ci(y, p, g, threshold=threshold, n_boot=n_boot, seed=0)
    out = {k: ci[k] for k in ("roc_auc", "sensitivity", "specificity", "accuracy")}
    out["threshold"] = threshold
    _, counts = np.unique(g, return_counts=True)
    called = float((p >= threshold).mean())
    out["parasitemia_true_pct"] = 100 * float(y.mean())
    out["parasitemia_called_pct"] = 100 * called
    out["photos"] = len(counts)
    out["cells"] = len(y)
    out["infected"] = int(y.sum())
    return out


def adapt(
    *, run: Path, data: Path, annotations: Path | None, out: Path, config: AdaptConfig | None = None, n_boot: int = 1000
) -> AdaptResult:
    """Fine-tune a run on a lab's labelled cells and write the adapted run folder and ``model.onnx``.

    Args:
        run: the run folder to start from (its weights, preprocessing and NIH split).
        data: the lab's photos (with ``annotations``) or a Parasitized/Uninfected folder of cells.
        annotations: boxes of the photos (IML JSON or COCO).
        out: the new run folder (must not hold a run).
        config: the settings.
        n_boot: bootstrap resamples of photos for the report's intervals.

    Returns:
        The result: folder, ONNX file, threshold, operating points and the before/after report.
    """
    from malaria_cells.export import export_run

    config = config or AdaptConfig()
    base = Run.open(run)
    dest = Run(out)
    if dest.started:
        raise FileExistsError(f"{dest.path} already holds a run; pick another --out")
    set_threads(config.threads)
    torch.manual_seed(config.seed)
    prep = base.meta.prep
    cells = lab_cells(
        data=Path(data), annotations=annotations, size=prep.input_size, stain_normalize=config.stain_normalize
    )
    assign = block_split(cells.groups, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    part = np.array([assign[g] for g in cells.groups])
    idx = {s: np.nonzero(part == s)[0] for s in SPLITS}
    for s in ("train", "val"):
        if not 0 < cells.labels[idx[s]].sum() < len(idx[s]):
            raise ConfigError(f"the lab's {s} photos need both infected and uninfected cells")
    log.info(
        "adapt: %s cells (%s infected) from %s; train/val/test photos %s",
        f"{len(cells.labels):,}",
        int(cells.labels.sum()),
        cells.source,
        "/".join(str(len({g for g, s in assign.items() if s == k})) for k in SPLITS),
    )
    model = base.load_model()

    def probs(which: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        logits = predict_logits(model, cells.images[which], prep=prep, precision="fp32")
        return probability_from_logit(logits, temperature)

    # The base model as its users see it: its stored temperature applies (its threshold is on that scale). The
    # adapted model is scored raw and stores no temperature: fine-tuning changes its calibration.
    before = {s: probs(idx[s], base.meta.temperature or 1.0) for s in ("val", "test")}
    pos, neg = idx["train"][cells.labels[idx["train"]] == 1], idx["train"][cells.labels[idx["train"]] == 0]
    steps = max(1, len(neg) // config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps * config.epochs, pct_start=0.15)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    best = (-np.inf, None, -1)
    history = []
    t0 = time.perf_counter()
    half = config.batch_size // 2
    with progress.task("adapt epochs", total=config.epochs) as ep_task:
        for epoch in range(config.epochs):
            model.train()
            order = rng.permutation(neg)
            losses = []
            for s in range(steps):
                b = np.concatenate([order[s * half : (s + 1) * half], rng.choice(pos, half)])
                xb = torch.from_numpy(cells.images[np.sort(b)])
                yb = torch.from_numpy(cells.labels[np.sort(b)]).float()
                xb = augment(xb, gen)
                if config.stain_jitter:
                    xb = stain_jitter(xb, gen)
                loss = nn.functional.binary_cross_entropy_with_logits(model(to_input(xb, prep)), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            pv = probs(idx["val"])
            yv = cells.labels[idx["val"]]
            auc = M.binary_metrics(yv, pv, 0.5)["roc_auc"]
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_roc_auc": auc,
                            "elapsed_s": time.perf_counter() - t0})  # fmt: skip
            if auc > best[0]:
                best = (auc, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch)
            ep_task.update(completed=epoch + 1, status=f"loss {np.mean(losses):.4f}  lab val AUC {auc:.4f}")
    model.load_state_dict(best[1])
    after_val = probs(idx["val"])
    points = operating_points(
        cells.labels[idx["val"]],
        after_val,
        specificity=config.target_specificity,
        sensitivity=config.target_sensitivity,
    )
    threshold = points["high_specificity"]
    dest.path.mkdir(parents=True, exist_ok=True)
    dest.save_weights(model, "best")
    dest.save_weights(model, "last")
    if base.split_path.exists():  # the NIH patients' split of the base model: export's parity check reads it
        atomic_write_text(dest.split_path, base.split_path.read_text())
    base_points = operating_points(
        cells.labels[idx["val"]],
        before["val"],
        specificity=config.target_specificity,
        sensitivity=config.target_sensitivity,
    )
    report: dict[str, Any] = {
        "config": config.__dict__,
        "lab": cells.source,
        "history": history,
        "best_epoch": best[2] + 1,
    }
    if len(idx["test"]):
        yt, gt = cells.labels[idx["test"]], cells.groups[idx["test"]]
        after_test = probs(idx["test"])
        report["test"] = {
            "before, its own threshold": _scores(yt, before["test"], gt, base.meta.threshold, n_boot),
            "before, high-specificity point chosen on lab val": _scores(
                yt, before["test"], gt, base_points["high_specificity"], n_boot
            ),
            "after, high-specificity point chosen on lab val": _scores(yt, after_test, gt, threshold, n_boot),
            "after, balanced point chosen on lab val": _scores(yt, after_test, gt, points["balanced"], n_boot),
        }
        # The ranking's reach at the screening aims, thresholds read off the test cells themselves (a property of the
        # ROC curve, not of an operating point chosen beforehand: those are the rows of "test").
        both = 0 < yt.sum() < len(yt)  # a test block of one class has no ROC curve to read
        report["test_roc_read_off"] = {
            when: None
            if not both
            else {
                f"specificity_at_sensitivity_{READ_OFF_SENSITIVITY:g}": M.specificity_at_sensitivity(
                    yt, pt, READ_OFF_SENSITIVITY
                ),
                f"sensitivity_at_specificity_{config.target_specificity:g}": M.sensitivity_at_specificity(
                    yt, pt, config.target_specificity
                ),
            }
            for when, pt in (("before", before["test"]), ("after", after_test))
        }
    meta = base.meta.to_dict()
    # What described the base and is not true of the adapted model: its calibration, its NIH cross-validation estimate
    # and final-fit status, and its TTA thresholds (chosen on NIH out-of-fold predictions, not on this lab's cells).
    for key in ("temperature_fitted_on", "final_fit", "cv_estimate", "tta_threshold", "tta_operating_points"):
        meta.pop(key, None)
    if "output" in meta:
        meta["output"] = "one logit; sigmoid(logit) = P(Parasitized)"
    meta.update(
        threshold=threshold,
        temperature=None,
        operating_points_chosen_on=f"{len(idx['val']):,} cells of the lab's validation photos",
        threshold_method=f"high specificity ({config.target_specificity:.3f}) on the lab's validation photos",
        operating_points=points,
        stain_normalize=config.stain_normalize,
        adapted={
            "from_run": str(base.path),
            "from_threshold": base.meta.threshold,
            "lab_data": cells.source,
            "lab_cells": int(len(cells.labels)),
            "lab_infected": int(cells.labels.sum()),
            "best_epoch": best[2] + 1,
            "settings": config.__dict__,
        },
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    dest.save_meta(meta)

    def write_split(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["photo", "split"])
            w.writerows(sorted(assign.items()))

    atomic_write(dest.path / "lab_split.csv", write_split)
    atomic_write_json(dest.path / "adapt_report.json", report)
    onnx = export_run(run_dir=dest.path)
    return AdaptResult(dest.path, Path(onnx.path), threshold, points, report)
