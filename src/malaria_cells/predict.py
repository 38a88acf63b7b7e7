"""Prediction with a trained model: :class:`Classifier` turns cell images into :class:`Prediction` results.

A classifier wraps one :class:`~malaria_cells.backends.Backend` (an ONNX file through onnxruntime, or a run folder
through torch) and adds decoding, letterboxing, batching and labels. The ONNX path, from :meth:`Classifier.load` to
a prediction, imports neither torch nor timm. ``Classifier.load()`` with no model uses ``$MALARIA_CELLS_MODEL`` if
set, else the model shipped inside the package (see :mod:`malaria_cells.backends`).

What to classify (files, folders, globs, shards) is :mod:`malaria_cells.inputs`; how results are written (table,
csv, jsonl, json) is the command line's business (:mod:`malaria_cells.render`).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from malaria_cells.backends import (
    CARD_KEYS,
    MODEL_ENV,
    ONNX_FORMAT,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    SHIPPED_MODEL,
    Backend,
    load_backend,
    model_card,
    resolve_model,
)
from malaria_cells.errors import ModelError
from malaria_cells.inputs import UnreadableInput
from malaria_cells.preprocess import (
    MAX_PIXELS,
    MAX_VIEWS,
    ImageError,
    Preprocessing,
    _check_pixels,
    _check_side,
    decode_image,
    dihedral_view,
    letterbox,
    load_image,
    to_rgb,
)
from malaria_cells.progress import available_cores, workers

log = logging.getLogger(__name__)

# The model's names are re-exported (callers knew them here and catch predict.ModelError).
__all__ = [
    "CARD_KEYS",
    "LOOKAHEAD_CHUNKS",
    "MODEL_ENV",
    "ONNX_FORMAT",
    "ONNX_INPUT",
    "ONNX_OUTPUTS",
    "SHIPPED_MODEL",
    "Classifier",
    "ImageError",
    "ImageInput",
    "ModelError",
    "Prediction",
    "decode_plan",
    "resolve_model",
    "to_image",
]

# Chunks of files decoding in worker processes ahead of the one the model runs on (Classifier.iter_predict): enough
# that the workers never wait for the model to ask; memory is (this + 1) x batch_size decoded cells.
LOOKAHEAD_CHUNKS = 3
# Decoding processes pay off from this many batches of files (starting one costs ~0.3 s); see decode_plan.
DECODE_PROCESSES_FROM_BATCHES = 4

ImageInput = str | Path | bytes | Image.Image | np.ndarray | UnreadableInput

# The label of an input that does not look like a training cell (see malaria_cells.ood); its flag says why.
UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Prediction:
    """The result for one image: a label and P(Parasitized), or the reason it could not be classified.

    ``error_code`` and ``error_status`` are the machine-readable form of ``error`` (the
    :class:`~malaria_cells.preprocess.ImageError` code and HTTP status), so callers never search the message.
    """

    source: str  # the path, upload name, or "<image N>" for in-memory images
    label: str | None  # a class name, None on error
    probability: float | None  # P(Parasitized), None on error
    threshold: float  # Parasitized when probability >= threshold
    error: str | None = None
    error_code: str | None = None  # e.g. "not_an_image", "image_too_small", "file_unreadable"
    error_status: int | None = None  # the HTTP status of that code (415, 413, 422)
    flag: str = ""  # why the input does not look like a training cell ("grayscale", ...; see malaria_cells.ood)
    raw_label: str | None = None  # the model's label, also when ``label`` is "Unknown" because of the flag

    @property
    def ok(self) -> bool:
        """Whether the image was classified."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "source": self.source,
            "label": self.label,
            "prob_parasitized": self.probability,
            "threshold": self.threshold,
            "error": self.error,
            "error_code": self.error_code,
            "error_status": self.error_status,
            "flag": self.flag,
            "raw_label": self.raw_label,
        }


class _Ready(NamedTuple):
    """A prepared input (picklable: it comes back from the decoding processes)."""

    array: np.ndarray  # letterboxed uint8 (S, S, 3)
    flag: str  # "" or the reason it is unlike the training cells


class _Failure(NamedTuple):
    """Why an input could not be prepared (picklable: it comes back from the decoding processes)."""

    message: str
    code: str
    status: int

    @classmethod
    def of(cls, e: ImageError) -> _Failure:
        return cls(str(e), e.code, e.status)


def decode_plan(
    n_files: int,
    *,
    batch_size: int = 64,
    threads: int | None = None,
    decode_processes: int | None = None,
    cores: int | None = None,
) -> tuple[int | None, int]:
    """How to share the cores between the model and decoding processes for ``n_files`` files.

    Starting a process costs ~0.3 s: worth it only for many files, on more than one core. Decoding a cell costs about
    what the shipped model does, so half the cores decode and the model gets the rest
    (benchmarks/decode_speed.py: on 2 cores, 1 + 1 beat 2 model threads + 2 processes, and threads alone).

    Args:
        n_files: files to classify.
        batch_size: images per model call.
        threads: model threads asked for (None: decide).
        decode_processes: decoding processes asked for (None: decide).
        cores: cores to plan for (default: those this process may use).

    Returns:
        (model threads or None for the runtime's default, decoding processes) for :meth:`Classifier.load`.
    """
    cores = workers(cores)
    if decode_processes is None:
        many = n_files >= DECODE_PROCESSES_FROM_BATCHES * batch_size
        decode_processes = cores // 2 if cores > 1 and many else 0
    if threads is None and decode_processes:
        threads = max(1, cores - decode_processes)
    return threads, decode_processes


class Classifier:
    """A loaded model that turns cell images into labels and P(Parasitized).

    Use :meth:`load`, or wrap any :class:`~malaria_cells.backends.Backend`. The attributes describe the model:
    ``card`` (model card), ``prep``, ``threshold``, ``class_names``, ``positive_class``, ``backend`` ("onnx" or
    "torch"), ``source``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        source: str,
        threads: int | None = None,
        decode_processes: int = 0,
        unknown_when_flagged: bool = True,
        segment: str = "auto",
        operating_point: str | None = None,
        threshold: float | None = None,
        tta: bool = False,
    ) -> None:
        """Wrap a backend.

        Args:
            backend: the model.
            source: where it came from (shown in the card).
            threads: decoding threads (default: all cores).
            decode_processes: see :meth:`load`.
            unknown_when_flagged: label an input that does not look like a training cell "Unknown" (its flag says
                why; ``raw_label`` keeps the model's answer). False keeps the model's label, with the flag.
            segment: "auto" (default) puts a cell whose background is not black on black first (a loose crop:
                :func:`malaria_cells.segment.segment_crop`); "on" always; "off" never.
            operating_point: a named threshold stored with the model ("high_specificity", "balanced",
                "high_sensitivity": ``adapt`` stores them) instead of its default threshold.
            threshold: an explicit threshold on P(Parasitized) (wins over ``operating_point``).
            tta: test-time augmentation: P(Parasitized) is the mean over the 8 rotations/reflections of each cell
                (8x the model's work), judged at the model's own TTA threshold (``tta_threshold`` and
                ``tta_operating_points`` of its metadata, chosen on out-of-fold predictions of the CV).
        """
        if segment not in SEGMENT_MODES:
            raise ValueError(f"segment must be one of {', '.join(SEGMENT_MODES)}, not {segment!r}")
        self.unknown_when_flagged = unknown_when_flagged
        self.segment = segment
        meta = backend.meta
        self._backend = backend
        # Decoding threads: imagecodecs (WebP) and Pillow (other formats, resizing) release the GIL while they
        # work, so a batch of files decodes on every core (end to end, decoding costs about as much as the model).
        n = threads or available_cores()
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="decode") if n > 1 else None  # threads start on use
        # Decoding processes for streams of files (see iter_predict): letterboxing holds the GIL for part of its
        # time, so threads cannot keep the cores busy; processes can, and they decode the next batch while the
        # model runs on this one. Started on first use; 0 = decode in this process.
        self.decode_processes = decode_processes
        self._procs: ProcessPoolExecutor | None = None
        self.backend: str = backend.name
        self.source = source
        self.prep: Preprocessing = backend.prep
        try:
            self.threshold = float(meta["threshold"])
            self.class_names: list[str] = list(meta["class_names"])
            self.positive_index = int(meta.get("positive_index", 1))
            self.positive_class: str = self.class_names[self.positive_index]
            self.negative_class: str = self.class_names[1 - self.positive_index]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ModelError(f"{source}: metadata without a usable threshold or class names ({e!r})") from None
        self.tta = tta
        points = dict(meta.get("operating_points") or {})
        if tta:
            # TTA averages the views: its probabilities are smoother than one view's, so it has its own threshold.
            if meta.get("tta_threshold") is not None:
                self.threshold = float(meta["tta_threshold"])
            elif threshold is None:
                raise ModelError(
                    f"{source}: no TTA threshold stored with this model (a final fit of `reproduce --cv` stores one); "
                    "pass --threshold to use TTA anyway",
                    code="tta_threshold_missing",
                )
            points = dict(meta.get("tta_operating_points") or {})
        self.operating_points: dict[str, float] = {k: float(v) for k, v in points.items()}
        if operating_point is not None:
            if operating_point not in self.operating_points:
                known = ", ".join(sorted(self.operating_points)) or "none"
                raise ModelError(
                    f"{source}: no operating point {operating_point!r} (this model has: {known})",
                    code="operating_point_unknown",
                )
            self.threshold = self.operating_points[operating_point]
        if threshold is not None:
            if not 0 <= threshold <= 1:
                raise ModelError(f"threshold must be in [0, 1], not {threshold}", code="config_invalid")
            self.threshold = float(threshold)
        self.card = model_card(meta, backend=self.backend, source=source)
        self.card["threshold_in_use"] = self.threshold  # differs from "threshold" with an operating point
        self.card["tta"] = tta

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        threads: int | None = None,
        decode_processes: int = 0,
        unknown_when_flagged: bool = True,
        segment: str = "auto",
        operating_point: str | None = None,
        threshold: float | None = None,
        tta: bool = False,
    ) -> Classifier:
        """Load an ONNX file (onnxruntime) or a run folder (torch).

        Args:
            model: an ``.onnx`` file, a run folder, or ``None`` for ``$MALARIA_CELLS_MODEL`` or the shipped
                default (see :func:`malaria_cells.backends.resolve_model`).
            threads: intra-op threads (default: the runtime's choice, all cores).
            decode_processes: worker processes that decode image files for :meth:`iter_predict` (0: none, decode
                in this process with threads). Worth it for thousands of files (each process takes ~0.3 s to
                start); :func:`decode_plan` picks them for a number of files.
            unknown_when_flagged: see :class:`Classifier`.
            segment, operating_point, threshold, tta: see :class:`Classifier`.

        Returns:
            The classifier.

        Raises:
            ModelError: the model is missing or unusable (the message names the file).
        """
        path = resolve_model(model)
        backend = load_backend(path, threads=threads)
        return cls(
            backend,
            source=str(path),
            threads=threads,
            decode_processes=decode_processes,
            unknown_when_flagged=unknown_when_flagged,
            segment=segment,
            operating_point=operating_point,
            threshold=threshold,
            tta=tta,
        )

    @property
    def explainable(self) -> bool:
        """Whether Grad-CAM is available (torch models)."""
        return self.backend == "torch"

    @property
    def torch_model(self):  # -> torch.nn.Module; not annotated so this module never needs torch
        """The torch model (run folders only)."""
        model = getattr(self._backend, "model", None)
        if self.backend != "torch" or model is None:
            raise ModelError("Grad-CAM needs a torch model: pass a run folder, not an ONNX file")
        return model

    def label_of(self, probability: float) -> str:
        """The class name for a P(Parasitized) at this model's threshold."""
        return self.positive_class if probability >= self.threshold else self.negative_class

    def prepare(self, image: ImageInput, *, name: str = "<image>") -> np.ndarray:
        """Decode and letterbox one image to this model's uint8 input.

        Args:
            image: a path (also ``ARCHIVE.zip::MEMBER``), encoded bytes, a PIL image or a uint8 array
                (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA.
            name: used in error messages for in-memory images.

        Returns:
            uint8 (S, S, 3).

        Raises:
            ImageError: unusable image, with the reason.
        """
        return self.prepare_checked(image, name=name)[0]

    def prepare_checked(self, image: ImageInput, *, name: str = "<image>") -> tuple[np.ndarray, str]:
        """:meth:`prepare` plus the input's out-of-distribution flag (see :mod:`malaria_cells.ood`).

        Returns:
            (uint8 (S, S, 3), "" or the reason the image is unlike the training cells).

        Raises:
            ImageError: unusable image, with the reason.
        """
        out = _prepared(image, name=name, size=self.prep.input_size, segment=self.segment)
        if isinstance(out, _Failure):
            raise ImageError(out.message, code=out.code, status=out.status)
        return out.array, out.flag

    def predict_prepared(self, batch_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) for a batch of already letterboxed uint8 images (N, S, S, 3).

        Args:
            batch_u8: uint8 (N, S, S, 3).

        Returns:
            float32 probabilities (N,).
        """
        if len(batch_u8) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.tta:
            views = dihedral_views(batch_u8)
            return self._backend(views).reshape(MAX_VIEWS, len(batch_u8)).mean(axis=0).astype(np.float32)
        return self._backend(batch_u8)

    @property
    def single_cell_warning(self) -> str | None:
        """Why this model's answers on single cells deserve less trust than usual (None: no such reason)."""
        if self.card.get("stain_normalize"):
            # Adapted on field-photo cells moved to the NIH stain: `smear` does that per photo; single cells cannot
            # be (no photo to measure the stain on), so they keep their own colours, which the model never saw.
            return (
                "this model was adapted on stain-normalized field-photo cells and is meant for smear on whole photos: "
                "single cells are classified in their own colours"
            )
        return None

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        names: Sequence[str] | None = None,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """Classify images; an unreadable one gets a :class:`Prediction` with ``error`` and the rest go on.

        Args:
            images: one image, an iterable of images (paths, encoded bytes, PIL images, uint8 arrays), or a
                uint8 batch array (N, H, W, C).
            names: what to call each image in the results (default: the path, or ``<image N>``).
            batch_size: images per model call.
            progress: called with the number of images finished after each batch.

        Returns:
            One prediction per image, in order.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items: list[ImageInput] = list(images)  # a batch (N, H, W, C)
        elif isinstance(images, (str, Path, bytes, Image.Image, np.ndarray, UnreadableInput)):
            items = [images]
        else:
            items = list(images)
        if names is not None and len(names) != len(items):
            raise ValueError(f"{len(names)} names for {len(items)} images")
        return list(self.iter_predict(items, names=names, batch_size=batch_size, progress=progress))

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        names: Iterable[str] | None = None,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Prediction]:
        """Classify a stream of images, yielding results in order while holding one batch in memory.

        This is what makes ``predict`` on a folder of millions of cells run in constant memory: paths are read
        lazily from ``images`` and each result is yielded as soon as its batch is done.

        Args:
            images: an iterable of images (paths, encoded bytes, PIL images, uint8 arrays, and the
                :class:`~malaria_cells.inputs.UnreadableInput` entries of a folder walk); consumed lazily.
            names: what to call each image (default: the path, or ``<image N>``); consumed alongside ``images``.
            batch_size: images per model call (>= 1).
            progress: called with the number of images finished after each batch.

        Yields:
            One prediction per image, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if self.single_cell_warning:
            log.warning("%s: %s", self.source, self.single_cell_warning)
        batch = np.zeros((batch_size, self.prep.input_size, self.prep.input_size, 3), dtype=np.uint8)
        chunks = _chunked(images, names, batch_size)
        if self.decode_processes < 1:
            for chunk in chunks:
                yield from self._emit(chunk, self._decode_here(chunk), batch, progress)
            return
        # Pipelined: the files of the next chunks decode in the worker processes while the model runs on this one.
        pending: collections.deque[tuple[list[tuple[str, ImageInput]], list[Future]]] = collections.deque()
        for chunk in chunks:
            if not all(isinstance(im, (str, Path, UnreadableInput)) for _, im in chunk):
                while pending:  # in-memory images: decoded here, in order after what is pending
                    yield from self._emit(*_gathered(pending.popleft()), batch, progress)
                yield from self._emit(chunk, self._decode_here(chunk), batch, progress)
                continue
            pending.append((chunk, self._submit(chunk)))
            if len(pending) > LOOKAHEAD_CHUNKS:
                yield from self._emit(*_gathered(pending.popleft()), batch, progress)
        while pending:
            yield from self._emit(*_gathered(pending.popleft()), batch, progress)

    def close(self) -> None:
        """Stop the decoding processes and threads (they are also stopped when the interpreter exits)."""
        if self._procs is not None:
            self._procs.shutdown(cancel_futures=True)
            self._procs = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _submit(self, chunk: list[tuple[str, ImageInput]]) -> list[Future]:
        if self._procs is None:
            # spawn, not fork: this process runs onnxruntime/torch threads, and a forked copy of a process with
            # threads can inherit a held lock.
            self._procs = ProcessPoolExecutor(self.decode_processes, mp_context=multiprocessing.get_context("spawn"))
        k = -(-len(chunk) // self.decode_processes)  # one slice of the chunk per process
        return [
            self._procs.submit(
                _prepare_files,
                [im if isinstance(im, UnreadableInput) else str(im) for _, im in chunk[a : a + k]],
                self.prep.input_size,
                self.segment,
            )
            for a in range(0, len(chunk), k)
        ]

    def _prepare_or_error(self, item: tuple[str, ImageInput]) -> _Ready | _Failure:
        name, image = item
        return _prepared(image, name=name, size=self.prep.input_size, segment=self.segment)

    def _decode_here(self, chunk: list[tuple[str, ImageInput]]) -> list[_Ready | _Failure]:
        if self._pool is not None and len(chunk) > 1:
            return list(self._pool.map(self._prepare_or_error, chunk))
        return [self._prepare_or_error(item) for item in chunk]

    def _emit(
        self,
        chunk: list[tuple[str, ImageInput]],
        decoded: list[_Ready | _Failure],
        batch: np.ndarray,
        progress: Callable[[int], None] | None,
    ) -> Iterator[Prediction]:
        good = [d for d in decoded if not isinstance(d, _Failure)]
        for j, d in enumerate(good):
            batch[j] = d.array
        probs = iter(self.predict_prepared(batch[: len(good)]))
        for (name, _), d in zip(chunk, decoded, strict=True):
            if isinstance(d, _Failure):
                yield Prediction(name, None, None, self.threshold, d.message, d.code, d.status)
            else:
                p = float(next(probs))
                raw = self.label_of(p)
                label = UNKNOWN if d.flag and self.unknown_when_flagged else raw
                yield Prediction(name, label, p, self.threshold, flag=d.flag, raw_label=raw)
        if progress:
            progress(len(chunk))


def dihedral_views(batch: np.ndarray) -> np.ndarray:
    """The 8 rotations/reflections of a uint8 (N, S, S, 3) batch, stacked view after view: (8N, S, S, 3).

    Args:
        batch: square images.

    Returns:
        View ``k`` of every image at rows ``k*N .. (k+1)*N``, numbered as :data:`malaria_cells.preprocess.DIHEDRAL`
        (the numbering of training's feature stores and of evaluation's test-time augmentation).
    """
    return np.ascontiguousarray(np.concatenate([dihedral_view(batch, v) for v in range(MAX_VIEWS)]))


def _chunked(
    images: Iterable[ImageInput], names: Iterable[str] | None, size: int
) -> Iterator[list[tuple[str, ImageInput]]]:
    """(name, image) lists of ``size`` items (the last may be shorter), read lazily."""
    name_iter = iter(names) if names is not None else None
    chunk: list[tuple[str, ImageInput]] = []
    for i, image in enumerate(images):
        chunk.append((next(name_iter) if name_iter is not None else _default_name(image, i), image))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SEGMENT_MODES = ("auto", "on", "off")


def _prepared(image: ImageInput, *, name: str, size: int, segment: str = "auto") -> _Ready | _Failure:
    """The letterboxed input and its out-of-distribution flag, or why an image is unusable.

    ``segment``: "on" puts the middle cell on black first (a loose crop from a field photo), "auto" does so when the
    image's border is not black, "off" never.
    """
    from malaria_cells.ood import check, signals
    from malaria_cells.preprocess import MIN_SIDE
    from malaria_cells.segment import on_black, segment_crop

    try:
        img = to_image(image, name=name)
    except ImageError as e:
        return _Failure.of(e)
    rgb = np.asarray(img)
    if segment == "on" or (segment == "auto" and not on_black(rgb)):
        cell = segment_crop(rgb)
        if cell is not None and min(cell.shape[:2]) >= MIN_SIDE:
            rgb = cell
            img = Image.fromarray(cell)
    return _Ready(letterbox(img, size), check(signals(rgb)))


def _prepare_files(items: list[str | UnreadableInput], size: int, segment: str = "auto") -> list[_Ready | _Failure]:
    """Decode and letterbox files in a worker process; an unusable file gives its failure instead."""
    return [_prepared(p, name=str(p), size=size, segment=segment) for p in items]


def _gathered(
    item: tuple[list[tuple[str, ImageInput]], list[Future]],
) -> tuple[list[tuple[str, ImageInput]], list[_Ready | _Failure]]:
    chunk, futures = item
    return chunk, [d for f in futures for d in f.result()]


def _default_name(image: ImageInput, i: int) -> str:
    return str(image) if isinstance(image, (str, Path, UnreadableInput)) else f"<image {i}>"


def to_image(image: ImageInput, *, name: str = "<image>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Turn any supported input into an 8-bit RGB PIL image, with the same checks as :func:`decode_image`.

    Args:
        image: a path, encoded bytes, a PIL image, a uint8 array (H, W[, 1|3|4]), or an
            :class:`~malaria_cells.inputs.UnreadableInput` (raised as the error it describes).
        name: used in error messages for in-memory images.
        max_pixels: refuse larger images.

    Returns:
        The RGB image.

    Raises:
        ImageError: unusable input, with the reason and its code.
    """
    if isinstance(image, UnreadableInput):
        raise ImageError(image.message, code=image.code, status=image.status)
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name=name, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"{name}: array of dtype {image.dtype}; expected uint8 (0-255)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ImageError(f"{name}: array of shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
        _check_pixels(image.shape[1], image.shape[0], name=name, max_pixels=max_pixels)
        img = Image.fromarray(np.ascontiguousarray(image))
    elif isinstance(image, Image.Image):
        img = image
        _check_pixels(*img.size, name=name, max_pixels=max_pixels)  # before load(): a lazy file is not decoded yet
        try:
            img.load()  # a lazily opened file may still be truncated
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: unreadable or truncated image ({e})", code="unreadable_image") from None
    else:
        raise ImageError(f"{name}: unsupported input type {type(image).__name__}")
    # The same size checks as a decoded file (one place: preprocess), so every kind of input is refused alike.
    _check_side(*img.size, name=name)
    return to_rgb(img)
