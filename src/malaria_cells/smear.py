"""From a field photo to parasitemia: find every red blood cell, classify it, count per field and per slide.

Steps for one photo (:class:`SmearAnalyzer`): decode; detect the cells (:mod:`malaria_cells.detect`); cut each cell
out, black out its background and frame it like the NIH training crops (:mod:`malaria_cells.segment`); classify
the batch with the cell model (any :class:`~malaria_cells.predict.Classifier`: the shipped ONNX model, an ONNX file
or a run folder); count. Cells cut by the photo's border are listed but not counted (they are counted in the
neighbouring field, as in manual counting, and annotators skip them too).

A slide's parasitemia (% of counted red cells that are infected) pools its fields, with a 95 % interval that widens
with the variation between fields (:func:`malaria_cells.metrics.clustered_proportion`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from malaria_cells.boxes import FieldBoxes
from malaria_cells.detect import BORDER_PX, Detections, Detector
from malaria_cells.metrics import Proportion, clustered_proportion
from malaria_cells.predict import Classifier, to_image
from malaria_cells.preprocess import ImageError, letterbox
from malaria_cells.segment import cell_mask, to_training_form

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
# Side of the square each cell is resampled to before its mask is computed (px): masks are cheap at this size, and
# it is above the classifier's input (48-64 px), so no detail the classifier could use is lost first.
WORK_PX = 72
# The square cut around a detected box, as a multiple of the box's longer side: room for the rim the box may miss.
CONTEXT = 1.3
# A detected cell whose mask covers less than this share of its box is not a red cell (debris, a stain blob).
MIN_FILL = 0.25


@dataclass
class SmearCell:
    """One detected (or given) cell of a field photo."""

    cell: int  # index in the photo
    x: int  # box, px of the original photo
    y: int
    w: int
    h: int
    area: int  # px of the cell's mask, in the original photo
    on_border: bool  # cut by the photo's edge: listed, not counted
    prob_parasitized: float  # NaN when the cell could not be classified
    label: str  # "Parasitized", "Uninfected", or "Unknown" (no usable mask)
    score: float = float("nan")  # detector confidence (NaN for given boxes)
    truth: int | None = None  # annotated label when boxes were given (1 infected, 0 uninfected, -1 ignored)

    def to_row(self, image: str) -> dict[str, Any]:
        """The ``cells.csv`` row."""
        return {
            "image": image,
            "cell": self.cell,
            "x": self.x,
            "y": self.y,
            "w": self.w,
            "h": self.h,
            "area": self.area,
            "on_border": int(self.on_border),
            "prob_parasitized": None if np.isnan(self.prob_parasitized) else round(float(self.prob_parasitized), 6),
            "label": self.label,
        }


@dataclass
class FieldResult:
    """The cells of one photo and its counts."""

    image: str  # path or name of the photo
    width: int = 0
    height: int = 0
    cells: list[SmearCell] = field(default_factory=list)
    error: str | None = None  # the photo could not be read (its cells are empty)
    error_code: str | None = None
    warning: str | None = None  # e.g. "0 cells found"
    crops: np.ndarray | None = None  # uint8 (N, S, S, 3) classifier inputs, kept for contact sheets
    photo: np.ndarray | None = None  # the decoded photo, kept (with the crops) for overlays

    @property
    def counted(self) -> list[SmearCell]:
        """Cells that count: classified and not cut by the border."""
        return [c for c in self.cells if not c.on_border and c.label != "Unknown"]

    @property
    def n_cells(self) -> int:
        """Counted cells."""
        return len(self.counted)

    @property
    def n_infected(self) -> int:
        """Counted cells called Parasitized."""
        return sum(c.label == "Parasitized" for c in self.counted)

    @property
    def parasitemia(self) -> Proportion:
        """This field's parasitemia (one cluster: an exact binomial interval)."""
        return clustered_proportion([self.n_infected], [self.n_cells])

    def to_row(self) -> dict[str, Any]:
        """The ``fields.csv`` row."""
        p = self.parasitemia
        return {
            "image": self.image,
            "cells": self.n_cells,
            "infected": self.n_infected,
            "parasitemia_pct": None if np.isnan(p.estimate) else round(100 * p.estimate, 4),
            "border_cells": sum(c.on_border for c in self.cells),
            "unknown_cells": sum(c.label == "Unknown" for c in self.cells),
            "warning": self.warning or "",
            "error": self.error or "",
        }


@dataclass
class SlideSummary:
    """Parasitemia of one slide (a folder of field photos)."""

    slide: str
    photos: int
    failed_photos: int
    parasitemia: Proportion

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (percentages)."""
        p = self.parasitemia
        pct = lambda v: None if np.isnan(v) else round(100 * v, 4)  # noqa: E731
        return {
            "slide": self.slide,
            "photos": self.photos,
            "failed_photos": self.failed_photos,
            "cells": p.total,
            "infected": p.count,
            "parasitemia_pct": pct(p.estimate),
            "ci95_pct": [pct(p.low), pct(p.high)],
            "design_effect": None if np.isnan(p.design_effect) else round(p.design_effect, 3),
        }


@dataclass(frozen=True)
class FieldCounts:
    """What a slide's summary needs of a field."""

    n_cells: int
    n_infected: int
    error: str | None

    @classmethod
    def of(cls, result: FieldResult) -> FieldCounts:
        """The counts of a field's result."""
        return cls(result.n_cells, result.n_infected, result.error)


def summarize(slide: str, fields: Sequence[FieldResult | FieldCounts]) -> SlideSummary:
    """Pool the fields of one slide.

    Args:
        slide: its name.
        fields: its photos' results (failed photos are counted, not pooled).

    Returns:
        The slide's summary.
    """
    ok = [f for f in fields if f.error is None]
    prop = clustered_proportion([f.n_infected for f in ok], [f.n_cells for f in ok])
    return SlideSummary(slide, len(fields), len(fields) - len(ok), prop)


def crop_cells(
    rgb: np.ndarray, boxes: np.ndarray, *, size: int, background: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each box's cell out of the photo in the classifier's training form.

    Args:
        rgb: uint8 (H, W, 3) photo.
        boxes: (N, 4) x, y, w, h in px of the photo.
        size: the classifier's input side.
        background: the photo's background level in the green channel (default: each crop's own border).

    Returns:
        (uint8 (N, size, size, 3) crops on black, mask areas in px of the photo (N,), usable (N,) bool: a mask
        covering at least :data:`MIN_FILL` of the box).
    """
    n = len(boxes)
    out = np.zeros((n, size, size, 3), np.uint8)
    areas = np.zeros(n, np.int64)
    ok = np.zeros(n, bool)
    height, width = rgb.shape[:2]
    for i, (x, y, w, h) in enumerate(np.asarray(boxes, np.float64)):
        side = max(w, h) * CONTEXT
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = cx - side / 2, cy - side / 2
        # Crop with Pillow's box argument: sub-pixel placement, and any part outside the photo is edge-padded.
        xi0, yi0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        xi1, yi1 = min(width, int(np.ceil(x0 + side))), min(height, int(np.ceil(y0 + side)))
        if xi1 - xi0 < 2 or yi1 - yi0 < 2:
            continue
        region = rgb[yi0:yi1, xi0:xi1]
        pad = ((max(0, yi0 - int(np.floor(y0))), max(0, int(np.ceil(y0 + side)) - yi1)),) + (
            (max(0, xi0 - int(np.floor(x0))), max(0, int(np.ceil(x0 + side)) - xi1)),
            (0, 0),
        )
        if any(p for pair in pad[:2] for p in pair):
            region = np.pad(region, pad, mode="edge")
        work = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((WORK_PX, WORK_PX), Image.BILINEAR))
        k = WORK_PX / side  # photo px -> work px
        ellipse = (WORK_PX / 2, WORK_PX / 2, w / 2 * k, h / 2 * k)
        mask = cell_mask(work, background=background, ellipse=ellipse)
        fill = mask.sum() / max(1.0, np.pi * ellipse[2] * ellipse[3])
        areas[i] = int(round(mask.sum() / (k * k)))
        if fill < MIN_FILL:
            continue
        ok[i] = True
        out[i] = letterbox(Image.fromarray(to_training_form(work, mask)), size)
    return out, areas, ok


def background_level(rgb: np.ndarray) -> float:
    """The photo's background level in the green channel: its brightest 5 % (thin smears are mostly background)."""
    g = rgb[::4, ::4, 1]
    return float(np.percentile(g, 95))


class SmearAnalyzer:
    """A detector and a classifier, loaded once, that turn field photos into counted cells.

    Args:
        classifier: the cell model (default: the shipped one).
        detector: the cell detector (default: the shipped one).
        threshold: decision threshold on P(Parasitized) (default: the model's).
        keep_crops: keep each field's classifier inputs (for contact sheets; costs memory).
    """

    def __init__(
        self,
        *,
        classifier: Classifier | None = None,
        detector: Detector | None = None,
        threshold: float | None = None,
        keep_crops: bool = False,
    ) -> None:
        self.classifier = classifier or Classifier.load()
        self.detector = detector or Detector()
        self.threshold = self.classifier.threshold if threshold is None else float(threshold)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], not {self.threshold}")
        self.keep_crops = keep_crops

    def label(self, prob: float) -> str:
        """Parasitized / Uninfected at this analyzer's threshold."""
        return self.classifier.positive_class if prob >= self.threshold else self.classifier.negative_class

    def analyze(self, image: Any, *, name: str | None = None, boxes: FieldBoxes | None = None) -> FieldResult:
        """Detect (or take the given boxes), crop, classify and count one photo.

        Args:
            image: a path, encoded bytes, a PIL image or a uint8 (H, W, 3) array.
            name: shown in results and errors (default: the path, or "<image>").
            boxes: annotated boxes to classify instead of detecting (classification judged apart from detection).

        Returns:
            The field's result; an unreadable photo gives a result with ``error`` set, never an exception.
        """
        name = name or (str(image) if isinstance(image, (str, Path)) else "<image>")
        try:
            rgb = np.asarray(to_image(image, name=name))
        except ImageError as e:
            return FieldResult(name, error=str(e), error_code=e.code)
        return self.analyze_array(rgb, name=name, boxes=boxes)

    def analyze_array(self, rgb: np.ndarray, *, name: str, boxes: FieldBoxes | None = None) -> FieldResult:
        """:meth:`analyze` for a decoded uint8 (H, W, 3) photo."""
        height, width = rgb.shape[:2]
        if boxes is not None:
            b = boxes.boxes.astype(np.float32)
            border = (
                (b[:, 0] <= BORDER_PX)
                | (b[:, 1] <= BORDER_PX)
                | (b[:, 0] + b[:, 2] >= width - BORDER_PX)
                | (b[:, 1] + b[:, 3] >= height - BORDER_PX)
            )
            det = Detections(b, np.full(len(b), np.nan, np.float32), border)
            truth: list[int | None] = [int(v) for v in boxes.labels]
        else:
            det = self.detector(rgb)
            truth = [None] * len(det)
        crops, areas, ok = crop_cells(rgb, det.boxes, size=self.classifier.prep.input_size, background=None)
        probs = np.full(len(det), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.classifier.predict_prepared(crops[ok])
        cells = []
        for i in range(len(det)):
            x, y, w, h = (int(round(float(v))) for v in det.boxes[i])
            label = self.label(float(probs[i])) if ok[i] else "Unknown"
            cells.append(
                SmearCell(i, x, y, w, h, int(areas[i]), bool(det.on_border[i]), float(probs[i]), label,
                          float(det.scores[i]), truth[i])
            )  # fmt: skip
        result = FieldResult(name, width, height, cells)
        if self.keep_crops:
            result.crops, result.photo = crops, rgb
        if result.n_cells == 0:
            result.warning = "0 cells found: not a thin-smear field photo, blank, or out of focus?"
        return result


def analyze_smear(
    image: Any,
    *,
    model: str | Path | None = None,
    detector: str | Path | None = None,
    threshold: float | None = None,
    analyzer: SmearAnalyzer | None = None,
) -> FieldResult:
    """Analyze one field photo: every red cell found, classified and counted.

    Args:
        image: a path, encoded bytes, a PIL image or a uint8 (H, W, 3) array.
        model: the cell model (ONNX file or run folder; default: the shipped one).
        detector: the detector ONNX file (default: the shipped one).
        threshold: decision threshold (default: the model's).
        analyzer: an already loaded analyzer (wins over ``model``/``detector``; load once for many photos).

    Returns:
        The field's cells, counts and parasitemia (``result.parasitemia``); ``overlay(result, image)`` draws it.
    """
    if analyzer is None:
        analyzer = SmearAnalyzer(
            classifier=Classifier.load(model), detector=Detector(detector), threshold=threshold, keep_crops=True
        )
    return analyzer.analyze(image)


def group_slides(paths: Iterable[str | Path]) -> list[tuple[str, list[Path]]]:
    """Slides from command-line paths: each folder is one slide (its photos, sorted); loose files form one slide
    per parent folder.

    Args:
        paths: photo files and folders.

    Returns:
        (slide name, photo paths) in the order given; a missing path is kept as a photo (it gets an error row).
    """
    slides: dict[str, list[Path]] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            photos = sorted(q for q in p.iterdir() if q.suffix.lower() in PHOTO_SUFFIXES and q.is_file())
            slides.setdefault(p.name or str(p), []).extend(photos)
        else:
            slides.setdefault(p.parent.name or ".", []).append(p)
    return list(slides.items())


def iter_fields(
    analyzer: SmearAnalyzer,
    photos: list[Path],
    *,
    boxes: dict[str, FieldBoxes] | None = None,
    on_done: Callable[[FieldResult], None] | None = None,
) -> Iterator[FieldResult]:
    """Analyze photos one after another (constant memory: nothing is kept between photos).

    Args:
        analyzer: the loaded analyzer.
        photos: the photo files.
        boxes: per file name, boxes to classify instead of detecting; a photo without an entry is detected.
        on_done: called after each photo (progress).

    Yields:
        One result per photo, in order.
    """
    for p in photos:
        given = boxes.get(p.name) if boxes is not None else None
        result = analyzer.analyze(p, name=str(p), boxes=given)
        if on_done is not None:
            on_done(result)
        yield result


CELLS_COLUMNS = ("image", "cell", "x", "y", "w", "h", "area", "on_border", "prob_parasitized", "label")
FIELDS_COLUMNS = (
    "slide", "image", "cells", "infected", "parasitemia_pct", "border_cells", "unknown_cells", "warning", "error",
)  # fmt: skip
SHEET_CELLS = 64  # most confident infected calls on the contact sheet


@dataclass
class SmearRun:
    """What :func:`run_smear` wrote and found."""

    out: Path
    slides: list[SlideSummary]
    photos: int
    failed: int  # photos that could not be read
    empty: int  # photos with 0 cells found
    model: dict[str, Any]


def run_smear(
    slides: list[tuple[str, list[Path]]],
    *,
    out: Path,
    analyzer: SmearAnalyzer,
    boxes: dict[str, FieldBoxes] | None = None,
    overlays: bool = True,
    on_done: Callable[[FieldResult], None] | None = None,
) -> SmearRun:
    """Analyze slides of field photos and write ``cells.csv``, ``fields.csv``, ``summary.json``, an overlay per
    photo (``overlays/``) and ``infected_cells.png`` (the cells called infected, most confident first).

    Photos stream through one at a time: memory stays flat however many there are (the contact sheet keeps at most
    :data:`SHEET_CELLS` crops). The tables are written to temporary files and renamed at the end, so a killed run
    leaves no half-written table.

    Args:
        slides: (slide name, photos) from :func:`group_slides`.
        out: output folder (created).
        analyzer: the loaded analyzer (``keep_crops`` is switched on for the contact sheet).
        boxes: per file name, boxes to classify instead of detecting.
        overlays: write the overlay pictures.
        on_done: called after each photo.

    Returns:
        The slides' summaries and counts.
    """
    import csv
    import heapq
    import os
    import tempfile

    from malaria_cells.io import atomic_write, atomic_write_json
    from malaria_cells.overlay import contact_sheet, draw_overlay

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    analyzer.keep_crops = True
    sheet: list[tuple[float, int, np.ndarray, str]] = []  # min-heap of the most confident infected cells
    summaries: list[SlideSummary] = []
    failed = empty = n_photos = 0
    tmp_cells = tempfile.NamedTemporaryFile("w", newline="", dir=out, prefix=".cells.", suffix=".tmp", delete=False)
    tmp_fields = tempfile.NamedTemporaryFile("w", newline="", dir=out, prefix=".fields.", suffix=".tmp", delete=False)
    try:
        cells_csv = csv.DictWriter(tmp_cells, CELLS_COLUMNS)
        fields_csv = csv.DictWriter(tmp_fields, FIELDS_COLUMNS)
        cells_csv.writeheader()
        fields_csv.writeheader()
        for slide, photos in slides:
            per_slide: list[FieldResult] = []
            for result in iter_fields(analyzer, photos, boxes=boxes, on_done=on_done):
                n_photos += 1
                failed += result.error is not None
                empty += result.error is None and result.n_cells == 0
                fields_csv.writerow({"slide": slide, **result.to_row()})
                for c in result.cells:
                    cells_csv.writerow(c.to_row(result.image))
                    if c.label == "Parasitized" and result.crops is not None:
                        caption = f"{Path(result.image).stem}#{c.cell} {c.prob_parasitized:.2f}"
                        item = (float(c.prob_parasitized), len(sheet), result.crops[c.cell], caption)
                        if len(sheet) < SHEET_CELLS:
                            heapq.heappush(sheet, item)
                        elif item[0] > sheet[0][0]:
                            heapq.heapreplace(sheet, item)
                if overlays and result.error is None:
                    title = (
                        f"{result.n_infected} infected / {result.n_cells} cells"
                        f" ({100 * result.parasitemia.estimate:.2f} %)"
                        if result.n_cells
                        else "0 cells found"
                    )
                    img = draw_overlay(result.photo, result.cells, title=title)
                    dest = out / "overlays" / f"{Path(result.image).stem}.jpg"
                    atomic_write(dest, lambda t, im=img: im.save(t, format="JPEG", quality=90))
                # Keep only the counts of earlier photos: memory stays flat over thousands of photos.
                per_slide.append(FieldCounts.of(result))
            summaries.append(summarize(slide, per_slide))
        tmp_cells.close()
        tmp_fields.close()
        os.replace(tmp_cells.name, out / "cells.csv")
        os.replace(tmp_fields.name, out / "fields.csv")
    finally:
        for f in (tmp_cells, tmp_fields):
            f.close()
            Path(f.name).unlink(missing_ok=True)
    ranked = sorted(sheet, key=lambda t: -t[0])
    img = contact_sheet(
        [t[2] for t in ranked],
        [t[3] for t in ranked],
        title=f"cells called Parasitized, most confident first ({len(ranked)} shown)",
    )
    atomic_write(out / "infected_cells.png", lambda t: img.save(t, format="PNG"))
    model = {
        "model": analyzer.classifier.card.get("model"),
        "source": analyzer.classifier.source,
        "threshold": analyzer.threshold,
        "detector": str(analyzer.detector.path),
        "detector_threshold": analyzer.detector.meta.threshold,
        "boxes": "given" if boxes is not None else "detected",
    }
    atomic_write_json(
        out / "summary.json",
        {
            "slides": [s.to_dict() for s in summaries],
            "photos": n_photos,
            "failed_photos": failed,
            "photos_without_cells": empty,
            "model": model,
            "counting": "cells cut by the photo border are listed in cells.csv but not counted",
            "note": "research and education use only; not for diagnosis",
        },
    )
    return SmearRun(out, summaries, n_photos, failed, empty, model)
