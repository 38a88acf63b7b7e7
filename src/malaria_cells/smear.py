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
from malaria_cells.detect import Detections, Detector, on_border
from malaria_cells.errors import ModelError
from malaria_cells.metrics import Proportion, clustered_proportion
from malaria_cells.predict import Classifier, to_image
from malaria_cells.preprocess import ImageError, letterbox
from malaria_cells.segment import cell_masks
from malaria_cells.stain import normalize_cells

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
# Side of the square each cell is resampled to before its mask is computed (px): masks are cheap at this size, and
# it is above the classifier's input (48-64 px), so no detail the classifier could use is lost first.
WORK_PX = 64
# The square cut around a detected box, as a multiple of the box's longer side: room for the rim the box may miss.
CONTEXT = 1.3
# A detected cell whose mask covers less than this share of its box is not a red cell (debris, a stain blob).
MIN_FILL = 0.25
# A "cell" with at least this share of its mask darker than 0.45 x the background (green channel) is a white cell's
# nucleus or a dark stain deposit, not a red cell: labelled "Other" and not counted. On the detector's 95 training
# photos (`python benchmarks/smear_other.py`), annotated infected cells reached 0.77 (149 infected; mature stages
# are dark) and every unannotated detection above that (white cells, debris; 28 of 982) was at 0.81-1.00: the cut is
# the middle of that gap. One annotated "uninfected" box at 0.96 is a white cell.
DARK_LEVEL = 0.45
OTHER_DARK_SHARE = 0.79
COUNTED_LABELS = ("Parasitized", "Uninfected")
# Smears are screened at low parasitemia (often under 1 %), where a specificity of 0.97 alone would call 3 % of the
# cells infected: the pipeline uses the model's high-specificity point (chosen on the model's own validation
# patients, 0.995 specificity there) when it has one.
SMEAR_OPERATING_POINT = "high_specificity"
CLASSIFY_BATCH = 64  # cells per classifier call


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
    label: str  # "Parasitized", "Uninfected", "Other" (white cell, debris) or "Unknown" (no usable mask)
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
    stain_normalized: bool = False  # its cells were moved to the training cells' stain before classifying

    @property
    def counted(self) -> list[SmearCell]:
        """Cells that count: red cells (Parasitized or Uninfected) not cut by the border."""
        return [c for c in self.cells if not c.on_border and c.label in COUNTED_LABELS]

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
            "other_objects": sum(c.label == "Other" for c in self.cells),
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each box's cell out of the photo in the classifier's training form.

    Args:
        rgb: uint8 (H, W, 3) photo.
        boxes: (N, 4) x, y, w, h in px of the photo.
        size: the classifier's input side.
        background: the photo's background level in the green channel, for the dark share (default:
            :func:`background_level`); each mask takes its background from its own crop's border.

    Returns:
        (uint8 (N, size, size, 3) crops on black, mask areas in px of the photo (N,), usable (N,) bool: a mask
        covering at least :data:`MIN_FILL` of the box, dark share (N,): the share of the mask darker than
        :data:`DARK_LEVEL` x the background (NaN without a mask)).
    """
    n = len(boxes)
    out = np.zeros((n, size, size, 3), np.uint8)
    areas = np.zeros(n, np.int64)
    ok = np.zeros(n, bool)
    dark = np.full(n, np.nan)
    if n == 0:
        return out, areas, ok, dark
    bg = background_level(rgb) if background is None else background
    b = np.asarray(boxes, np.float64)
    sides = np.maximum(np.maximum(b[:, 2], b[:, 3]), 2.0) * CONTEXT
    # Cells cut by the border need pixels beyond it: pad the photo once with its edge pixels (the background there
    # stays background, which the mask's background estimate relies on), by as much as the largest crop sticks out.
    margin = int(np.ceil(sides.max() / 2)) + 2
    photo = Image.fromarray(np.pad(rgb, ((margin, margin), (margin, margin), (0, 0)), mode="edge"))
    work = np.zeros((n, WORK_PX, WORK_PX, 3), np.uint8)
    scale = WORK_PX / sides  # photo px -> work px
    ellipses = np.stack([np.full(n, WORK_PX / 2), np.full(n, WORK_PX / 2), b[:, 2] / 2 * scale, b[:, 3] / 2 * scale], 1)
    for i, ((x, y, w, h), side) in enumerate(zip(b, sides, strict=True)):
        x0, y0 = x + w / 2 - side / 2 + margin, y + h / 2 - side / 2 + margin
        work[i] = np.asarray(photo.resize((WORK_PX, WORK_PX), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side)))
    masks = cell_masks(work, ellipses)
    filled = masks.sum(axis=(1, 2))
    fill = filled / np.maximum(1.0, np.pi * ellipses[:, 2] * ellipses[:, 3])
    areas[:] = np.round(filled / (scale * scale)).astype(np.int64)
    has = filled > 0
    dark[has] = ((work[..., 1] < DARK_LEVEL * bg) & masks).sum(axis=(1, 2))[has] / filled[has]
    ok[:] = fill >= MIN_FILL
    # The training form, vectorised: background to black, then each cell cut to its mask's box (+1 px) and
    # letterboxed (the per-cell part is one crop and one resize).
    black = work * masks[..., None]
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    top, left = rows.argmax(1), cols.argmax(1)
    bottom = WORK_PX - rows[:, ::-1].argmax(1)
    right = WORK_PX - cols[:, ::-1].argmax(1)
    for i in np.nonzero(ok)[0]:
        y0, y1 = max(0, top[i] - 1), min(WORK_PX, bottom[i] + 1)
        x0, x1 = max(0, left[i] - 1), min(WORK_PX, right[i] + 1)
        out[i] = letterbox(Image.fromarray(black[i, y0:y1, x0:x1]), size)
    return out, areas, ok, dark


def background_level(rgb: np.ndarray) -> float:
    """The photo's background level in the green channel: its brightest 5 % (thin smears are mostly background)."""
    g = rgb[::4, ::4, 1]
    return float(np.percentile(g, 95))


class SmearAnalyzer:
    """A detector and a classifier, loaded once, that turn field photos into counted cells.

    Args:
        classifier: the cell model (default: the shipped one).
        detector: the cell detector (default: the shipped one).
        threshold: decision threshold on P(Parasitized) (wins over ``operating_point``).
        operating_point: a named threshold of the model; "auto" (default): its :data:`SMEAR_OPERATING_POINT` when
            it has one, else its default threshold.
        keep_crops: keep each field's classifier inputs (for contact sheets; costs memory).
        stain_normalize: move each photo's cells to the NIH training cells' stain before classifying them
            (:mod:`malaria_cells.stain`): for another lab's photos with a model trained on NIH cells. Default: what
            the model says (``stain_normalize`` in its metadata: set by ``adapt --stain-normalize``, else off).
    """

    def __init__(
        self,
        *,
        classifier: Classifier | None = None,
        detector: Detector | None = None,
        threshold: float | None = None,
        operating_point: str | None = "auto",
        keep_crops: bool = False,
        stain_normalize: bool | None = None,
    ) -> None:
        self.classifier = classifier or Classifier.load()
        wants = bool(self.classifier.card.get("stain_normalize"))
        self.stain_normalize = wants if stain_normalize is None else stain_normalize
        self.detector = detector or Detector()
        points = self.classifier.operating_points
        if operating_point == "auto":
            operating_point = SMEAR_OPERATING_POINT if SMEAR_OPERATING_POINT in points else None
        if operating_point is not None and operating_point not in points:
            known = ", ".join(sorted(points)) or "none"
            raise ModelError(
                f"no operating point {operating_point!r} (this model has: {known})", code="operating_point_unknown"
            )
        self.operating_point = operating_point
        if threshold is not None:
            self.threshold = float(threshold)
        elif operating_point is not None:
            self.threshold = points[operating_point]
        else:
            self.threshold = self.classifier.threshold
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], not {self.threshold}")
        self.keep_crops = keep_crops

    @classmethod
    def load(
        cls,
        *,
        model: str | Path | None = None,
        detector: str | Path | None = None,
        threshold: float | None = None,
        operating_point: str | None = None,
        workers: int = 1,
        stain_normalize: bool | None = None,
    ) -> SmearAnalyzer:
        """Load the models for ``workers`` photos at a time: with several, each model call uses one thread (the
        photos in flight use the cores), else the runtimes' default.

        Args:
            model: the cell model (ONNX file or run folder; default: the shipped one).
            detector: the detector ONNX file (default: the shipped one).
            threshold: decision threshold (default: the model's).
            operating_point: a named threshold stored with the model (``adapt`` stores "high_specificity",
                "balanced", "high_sensitivity"); ``threshold`` wins over it.
            workers: photos analysed at once.
            stain_normalize: move each photo's cells to the NIH training cells' stain (default: the model's choice;
                see the class).

        Returns:
            The analyzer.
        """
        threads = 1 if workers > 1 else None
        return cls(
            classifier=Classifier.load(model, threads=threads),
            detector=Detector(detector, threads=threads),
            threshold=threshold,
            operating_point=operating_point or "auto",
            stain_normalize=stain_normalize,
        )

    def label(self, prob: float) -> str:
        """Parasitized / Uninfected at this analyzer's threshold."""
        return self.classifier.positive_class if prob >= self.threshold else self.classifier.negative_class

    def analyze(
        self,
        image: Any,
        *,
        name: str | None = None,
        boxes: FieldBoxes | None = None,
        stain_normalize: bool | None = None,
    ) -> FieldResult:
        """Detect (or take the given boxes), crop, classify and count one photo.

        Args:
            image: a path, encoded bytes, a PIL image or a uint8 (H, W, 3) array.
            name: shown in results and errors (default: the path, or "<image>").
            boxes: annotated boxes to classify instead of detecting (classification judged apart from detection).
            stain_normalize: this photo only (default: the analyzer's setting).

        Returns:
            The field's result; an unreadable photo gives a result with ``error`` set, never an exception.
        """
        name = name or (str(image) if isinstance(image, (str, Path)) else "<image>")
        try:
            rgb = np.asarray(to_image(image, name=name))
        except ImageError as e:
            return FieldResult(name, error=str(e), error_code=e.code)
        return self.analyze_array(rgb, name=name, boxes=boxes, stain_normalize=stain_normalize)

    def analyze_array(
        self, rgb: np.ndarray, *, name: str, boxes: FieldBoxes | None = None, stain_normalize: bool | None = None
    ) -> FieldResult:
        """:meth:`analyze` for a decoded uint8 (H, W, 3) photo."""
        height, width = rgb.shape[:2]
        if boxes is not None:
            b = boxes.boxes.astype(np.float32)
            det = Detections(b, np.full(len(b), np.nan, np.float32), on_border(b, width=width, height=height))
            truth: list[int | None] = [int(v) for v in boxes.labels]
        else:
            det = self.detector(rgb)
            truth = [None] * len(det)
        crops, areas, ok, dark = crop_cells(rgb, det.boxes, size=self.classifier.prep.input_size)
        other = ok & (dark >= OTHER_DARK_SHARE)
        ok &= ~other
        probs = np.full(len(det), np.nan, np.float32)
        idx = np.nonzero(ok)[0]
        normalized = False
        if self.stain_normalize if stain_normalize is None else stain_normalize:
            # The red cells of the photo together (not "Other", not unusable crops) measure its stain.
            crops[idx], normalized = normalize_cells(crops[idx])
        # In batches of CLASSIFY_BATCH: the runtime keeps its largest activations allocated, and a photo's ~150 cells
        # at once cost ~2.5x the memory of 64 for no gain in speed.
        for a in range(0, len(idx), CLASSIFY_BATCH):
            part = idx[a : a + CLASSIFY_BATCH]
            probs[part] = self.classifier.predict_prepared(crops[part])
        cells = []
        for i in range(len(det)):
            x, y, w, h = (int(round(float(v))) for v in det.boxes[i])
            label = self.label(float(probs[i])) if ok[i] else ("Other" if other[i] else "Unknown")
            cells.append(
                SmearCell(i, x, y, w, h, int(areas[i]), bool(det.on_border[i]), float(probs[i]), label,
                          float(det.scores[i]), truth[i])
            )  # fmt: skip
        result = FieldResult(name, width, height, cells, stain_normalized=normalized)
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
    stain_normalize: bool | None = None,
) -> FieldResult:
    """Analyze one field photo: every red cell found, classified and counted.

    Args:
        image: a path, encoded bytes, a PIL image or a uint8 (H, W, 3) array.
        model: the cell model (ONNX file or run folder; default: the shipped one).
        detector: the detector ONNX file (default: the shipped one).
        threshold: decision threshold (default: the model's).
        analyzer: an already loaded analyzer (wins over ``model``/``detector``; load once for many photos).
        stain_normalize: move the photo's cells to the NIH training cells' stain first (another lab's photos);
            default: the model's choice.

    Returns:
        The field's cells, counts and parasitemia (``result.parasitemia``); ``overlay(result, image)`` draws it.
    """
    if analyzer is None:
        analyzer = SmearAnalyzer(
            classifier=Classifier.load(model), detector=Detector(detector), threshold=threshold, keep_crops=True
        )  # operating point "auto": the model's high-specificity point
    return analyzer.analyze(image, stain_normalize=stain_normalize)


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
    workers: int = 1,
) -> Iterator[FieldResult]:
    """Analyze photos in order, ``workers`` at a time (memory stays flat: at most ``2 x workers`` photos are held).

    Decoding, detection and the ONNX models release the GIL, so photos analysed in threads use every core; give
    the analyzer's models one thread each when ``workers`` > 1 (``SmearAnalyzer.load(..., workers=N)`` does).

    Args:
        analyzer: the loaded analyzer.
        photos: the photo files.
        boxes: per file name, boxes to classify instead of detecting; a photo without an entry is detected.
        on_done: called after each photo (progress).
        workers: photos analysed at once.

    Yields:
        One result per photo, in the order given.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def one(p: Path) -> FieldResult:
        given = boxes.get(p.name) if boxes is not None else None
        return analyzer.analyze(p, name=str(p), boxes=given)

    if workers <= 1:
        for p in photos:
            result = one(p)
            if on_done is not None:
                on_done(result)
            yield result
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="smear") as pool:
        pending: deque = deque()
        todo = iter(photos)
        for p in todo:
            pending.append(pool.submit(one, p))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(one, nxt))
            if on_done is not None:
                on_done(result)
            yield result


CELLS_COLUMNS = ("image", "cell", "x", "y", "w", "h", "area", "on_border", "prob_parasitized", "label")
FIELDS_COLUMNS = (
    "slide", "image", "cells", "infected", "parasitemia_pct", "border_cells", "unknown_cells", "other_objects",
    "warning", "error",
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
    workers: int = 1,
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
        workers: photos analysed at once (see :func:`iter_fields`).

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
    failed = empty = n_photos = seq = 0
    tmp_cells = tempfile.NamedTemporaryFile("w", newline="", dir=out, prefix=".cells.", suffix=".tmp", delete=False)
    tmp_fields = tempfile.NamedTemporaryFile("w", newline="", dir=out, prefix=".fields.", suffix=".tmp", delete=False)
    try:
        cells_csv = csv.DictWriter(tmp_cells, CELLS_COLUMNS)
        fields_csv = csv.DictWriter(tmp_fields, FIELDS_COLUMNS)
        cells_csv.writeheader()
        fields_csv.writeheader()
        for slide, photos in slides:
            per_slide: list[FieldResult] = []
            for result in iter_fields(analyzer, photos, boxes=boxes, on_done=on_done, workers=workers):
                n_photos += 1
                failed += result.error is not None
                empty += result.error is None and result.n_cells == 0
                fields_csv.writerow({"slide": slide, **result.to_row()})
                for c in result.cells:
                    cells_csv.writerow(c.to_row(result.image))
                    if c.label == "Parasitized" and result.crops is not None:
                        caption = f"{Path(result.image).stem}#{c.cell} {c.prob_parasitized:.2f}"
                        seq += 1  # unique tie-breaker: the heap never compares two crops
                        item = (float(c.prob_parasitized), seq, result.crops[c.cell], caption)
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
        "operating_point": analyzer.operating_point or "the model's default threshold",
        "detector": str(analyzer.detector.path),
        "detector_threshold": analyzer.detector.meta.threshold,
        "boxes": "given" if boxes is not None else "detected",
        "stain_normalize": analyzer.stain_normalize,
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
