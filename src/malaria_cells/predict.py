"""Prediction with a trained model: an ONNX file (onnxruntime only) or a run folder (torch).

The ONNX path, from :meth:`Classifier.load` to a prediction, imports neither torch nor timm: this module
imports torch lazily, only when a run folder is loaded. An exported ONNX file carries everything needed
(preprocessing, threshold, class names, provenance) in its ``metadata_props``, each value JSON-encoded,
under the keys of :data:`CARD_KEYS`; its graph takes the letterboxed uint8 RGB batch as it is.

``Classifier.load()`` with no model uses ``$MALARIA_CELLS_MODEL`` if set, else the model shipped inside the
package at ``malaria_cells/models_shipped/default.onnx`` (package data, so the same path works from a clone
with an editable install and from an installed wheel).
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from malaria_cells.preprocess import (
    MAX_PIXELS,
    MIN_SIDE,
    ImageError,
    Preprocessing,
    decode_image,
    letterbox,
    load_image,
    to_rgb,
)

MODEL_ENV = "MALARIA_CELLS_MODEL"
# Chunks of files decoding in worker processes ahead of the one the model runs on (Classifier.iter_predict): enough
# that the workers never wait for the model to ask; memory is (this + 1) x batch_size decoded cells.
LOOKAHEAD_CHUNKS = 3
SHIPPED_MODEL = Path(__file__).resolve().parent / "models_shipped" / "default.onnx"
ONNX_FORMAT = "malaria-cells-onnx/1"
ONNX_INPUT = "image"  # uint8 (N, S, S, 3) RGB, letterboxed; normalisation happens inside the graph
ONNX_OUTPUTS = ("logit", "prob_parasitized")
# What an exported ONNX file's metadata_props hold (values JSON-encoded) and what /api/v1/model shows.
CARD_KEYS = (
    "format",
    "model",
    "class_names",
    "positive_class",
    "positive_index",
    "preprocessing",
    "input",
    "output",
    "threshold",
    "threshold_method",
    "split_kind",
    "data_manifest_sha256",
    "val_metrics_at_threshold",
    "source_run_created",
    "created",
    "package_version",
    "quantization",
    "parity_max_abs_diff_prob",
    "warning",
)
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")

ImageInput = str | Path | bytes | Image.Image | np.ndarray


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class Prediction:
    """The result for one image: a label and P(Parasitized), or the reason it could not be classified."""

    source: str  # the path, upload name, or "<image N>" for in-memory images
    label: str | None  # a class name, None on error
    probability: float | None  # P(Parasitized), None on error
    threshold: float  # Parasitized when probability >= threshold
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the image was classified."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            "threshold": self.threshold,
            "error": self.error,
        }


def resolve_model(model: str | Path | None) -> Path:
    """Find the model to load: the argument, else ``$MALARIA_CELLS_MODEL``, else the shipped default.

    Args:
        model: an ``.onnx`` file, a run folder, or ``None``.

    Returns:
        The existing path.

    Raises:
        ModelError: nothing there; the message says how to get a model.
    """
    if model is not None:
        path, where = Path(model), "--model"
    elif os.environ.get(MODEL_ENV):
        path, where = Path(os.environ[MODEL_ENV]), f"${MODEL_ENV}"
    else:
        path, where = SHIPPED_MODEL, "the shipped default"
    if path.exists():
        return path
    if where == "the shipped default":
        raise ModelError(
            f"no model given and no shipped default model at {path}. Pass --model RUN_FOLDER_OR_ONNX, set "
            f"${MODEL_ENV}, or export one: `malaria-cells export RUN --format onnx --out {path}`"
        )
    raise ModelError(f"{where} points to {path}, which does not exist")


def model_card(meta: dict, *, backend: str, source: str) -> dict[str, Any]:
    """The model card shown to users: the card fields of a run's metadata or an ONNX file's metadata.

    Args:
        meta: a run's ``metadata.json`` or the decoded ONNX metadata.
        backend: "onnx" or "torch".
        source: the file or folder it came from.

    Returns:
        A JSON-ready dict (missing fields are left out).
    """
    card = {k: meta[k] for k in CARD_KEYS if k in meta}
    if backend == "torch":
        card.setdefault("package_version", meta.get("packages", {}).get("malaria-cells"))
        card["input"] = "letterboxed RGB, normalised as in preprocessing (torch)"
    card.update(
        backend=backend,
        source=source,
        explainable=backend == "torch",
        disclaimer="Research and education use only; not a medical device and not for diagnosis.",
    )
    return card


class _OnnxBackend:
    """onnxruntime inference; preprocessing and threshold come from the file's metadata."""

    name = "onnx"

    def __init__(self, path: Path, *, threads: int | None) -> None:
        import onnxruntime as ort  # imported here: a run folder needs only torch

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            # CUDA when this onnxruntime build has it (onnxruntime-gpu), else the CPU.
            providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=[*providers, "CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ModelError(f"{path}: not a loadable ONNX model ({e})") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        if "format" not in raw:
            raise ModelError(f"{path}: ONNX file without malaria-cells metadata; export it with `malaria-cells export`")
        meta = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v  # a plain string someone else added
        if meta["format"] != ONNX_FORMAT:
            raise ModelError(f"{path}: metadata format {meta['format']!r}, this version reads {ONNX_FORMAT!r}")
        self.meta = meta
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        _, prob = self.session.run(list(ONNX_OUTPUTS), {self.input_name: np.ascontiguousarray(batch_u8)})
        return prob.astype(np.float64).reshape(-1)


class _TorchBackend:
    """torch inference on a run folder's best weights (fp32, so results match an fp32 ONNX export)."""

    name = "torch"

    def __init__(self, run_dir: Path, *, threads: int | None) -> None:
        from malaria_cells.models import default_device, set_threads  # lazy: torch only for run folders
        from malaria_cells.train import load_run_model

        if threads:
            set_threads(threads)
        try:
            self.model, self.meta = load_run_model(run_dir, device=default_device())
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ModelError(f"{run_dir}: cannot load the run's model ({e})") from None
        self.prep = Preprocessing.from_dict(self.meta["preprocessing"])

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        from malaria_cells.models import predict_logits, sigmoid

        logits = predict_logits(self.model, batch_u8, prep=self.prep, precision="fp32", batch_size=len(batch_u8))
        return sigmoid(logits).astype(np.float64)


class Classifier:
    """A loaded model that turns cell images into labels and P(Parasitized).

    Use :meth:`load`; the attributes describe the model: ``card`` (model card), ``prep``, ``threshold``,
    ``class_names``, ``positive_class``, ``backend`` ("onnx" or "torch"), ``source``.
    """

    def __init__(
        self,
        backend: _OnnxBackend | _TorchBackend,
        *,
        source: str,
        threads: int | None = None,
        decode_processes: int = 0,
    ) -> None:
        meta = backend.meta
        self._backend = backend
        # Decoding threads: imagecodecs (WebP) and Pillow (other formats, resizing) release the GIL while they
        # work, so a batch of files decodes on every core (end to end, decoding costs about as much as the model).
        n = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="decode") if n > 1 else None  # threads start on use
        # Decoding processes for streams of files (see iter_predict): letterboxing holds the GIL for part of its
        # time, so threads cannot keep the cores busy; processes can, and they decode the next batch while the
        # model runs on this one. Started on first use; 0 = decode in this process.
        self.decode_processes = decode_processes
        self._procs: ProcessPoolExecutor | None = None
        self.backend: str = backend.name
        self.source = source
        self.prep = Preprocessing.from_dict(meta["preprocessing"])
        self.threshold = float(meta["threshold"])
        self.class_names: list[str] = list(meta["class_names"])
        self.positive_index = int(meta.get("positive_index", 1))
        self.positive_class: str = self.class_names[self.positive_index]
        self.negative_class: str = self.class_names[1 - self.positive_index]
        self.card = model_card(meta, backend=self.backend, source=source)

    @classmethod
    def load(
        cls, model: str | Path | None = None, *, threads: int | None = None, decode_processes: int = 0
    ) -> Classifier:
        """Load an ONNX file (onnxruntime) or a run folder (torch).

        Args:
            model: an ``.onnx`` file, a run folder, or ``None`` for ``$MALARIA_CELLS_MODEL`` or the shipped
                default (see the module docstring).
            threads: intra-op threads (default: the runtime's choice, all cores).
            decode_processes: worker processes that decode image files for :meth:`iter_predict` (0: none, decode
                in this process with threads). Worth it for thousands of files (each process takes ~0.3 s to
                start); ``predict`` on the command line picks them for large inputs.

        Returns:
            The classifier.

        Raises:
            ModelError: the model is missing or unusable.
        """
        path = resolve_model(model)
        if path.is_dir():
            if not (path / "metadata.json").exists():
                raise ModelError(f"{path}: a folder but not a finished run (no metadata.json)")
            backend: _OnnxBackend | _TorchBackend = _TorchBackend(path, threads=threads)
        else:
            backend = _OnnxBackend(path, threads=threads)
        return cls(backend, source=str(path), threads=threads, decode_processes=decode_processes)

    @property
    def explainable(self) -> bool:
        """Whether Grad-CAM is available (torch models)."""
        return self.backend == "torch"

    @property
    def torch_model(self):  # -> torch.nn.Module; not annotated so this module never needs torch
        """The torch model (run folders only)."""
        if not isinstance(self._backend, _TorchBackend):
            raise ModelError("Grad-CAM needs a torch model: pass a run folder, not an ONNX file")
        return self._backend.model

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
        return letterbox(to_image(image, name=name), self.prep.input_size)

    def predict_prepared(self, batch_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) for a batch of already letterboxed uint8 images (N, S, S, 3).

        Args:
            batch_u8: uint8 (N, S, S, 3).

        Returns:
            float64 probabilities (N,).
        """
        if len(batch_u8) == 0:
            return np.zeros(0)
        return self._backend(batch_u8)

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
        elif isinstance(images, (str, Path, bytes, Image.Image, np.ndarray)):
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
            images: an iterable of images (paths, encoded bytes, PIL images, uint8 arrays); consumed lazily.
            names: what to call each image (default: the path, or ``<image N>``); consumed alongside ``images``.
            batch_size: images per model call (>= 1).
            progress: called with the number of images finished after each batch.

        Yields:
            One prediction per image, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        batch = np.zeros((batch_size, self.prep.input_size, self.prep.input_size, 3), dtype=np.uint8)
        chunks = _chunked(images, names, batch_size)
        if self.decode_processes < 1:
            for chunk in chunks:
                yield from self._emit(chunk, self._decode_here(chunk), batch, progress)
            return
        # Pipelined: the files of the next chunks decode in the worker processes while the model runs on this one.
        pending: collections.deque[tuple[list[tuple[str, ImageInput]], list[Future]]] = collections.deque()
        for chunk in chunks:
            if not all(isinstance(im, (str, Path)) for _, im in chunk):
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
            self._procs.submit(_prepare_files, [str(im) for _, im in chunk[a : a + k]], self.prep.input_size)
            for a in range(0, len(chunk), k)
        ]

    def _prepare_or_error(self, item: tuple[str, ImageInput]) -> np.ndarray | str:
        name, image = item
        return _prepared(image, name=name, size=self.prep.input_size)

    def _decode_here(self, chunk: list[tuple[str, ImageInput]]) -> list[np.ndarray | str]:
        if self._pool is not None and len(chunk) > 1:
            return list(self._pool.map(self._prepare_or_error, chunk))
        return [self._prepare_or_error(item) for item in chunk]

    def _emit(
        self,
        chunk: list[tuple[str, ImageInput]],
        decoded: list[np.ndarray | str],
        batch: np.ndarray,
        progress: Callable[[int], None] | None,
    ) -> Iterator[Prediction]:
        good = [d for d in decoded if not isinstance(d, str)]  # a str is the error of an unusable image
        for j, d in enumerate(good):
            batch[j] = d
        probs = iter(self.predict_prepared(batch[: len(good)]))
        for (name, _), d in zip(chunk, decoded, strict=True):
            if isinstance(d, str):
                yield Prediction(name, None, None, self.threshold, error=d)
            else:
                p = float(next(probs))
                yield Prediction(name, self.label_of(p), p, self.threshold)
        if progress:
            progress(len(chunk))


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


def _prepared(image: ImageInput, *, name: str, size: int) -> np.ndarray | str:
    """What :meth:`Classifier.prepare` returns, or the error message of an unusable image."""
    try:
        return letterbox(to_image(image, name=name), size)
    except ImageError as e:
        return str(e)


def _prepare_files(paths: list[str], size: int) -> list[np.ndarray | str]:
    """Decode and letterbox files in a worker process; an unusable file gives its error message instead."""
    return [_prepared(p, name=p, size=size) for p in paths]


def _gathered(
    item: tuple[list[tuple[str, ImageInput]], list[Future]],
) -> tuple[list[tuple[str, ImageInput]], list[np.ndarray | str]]:
    chunk, futures = item
    return chunk, [d for f in futures for d in f.result()]


def _default_name(image: ImageInput, i: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<image {i}>"


def to_image(image: ImageInput, *, name: str = "<image>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Turn any supported input into an 8-bit RGB PIL image, with the same checks as :func:`decode_image`.

    Args:
        image: a path, encoded bytes, a PIL image or a uint8 array (H, W[, 1|3|4]).
        name: used in error messages for in-memory images.
        max_pixels: refuse larger images.

    Returns:
        The RGB image.

    Raises:
        ImageError: unusable input, with the reason.
    """
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
        img = Image.fromarray(np.ascontiguousarray(image))
    elif isinstance(image, Image.Image):
        img = image
        try:
            img.load()  # a lazily opened file may still be truncated
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: unreadable or truncated image ({e})") from None
    else:
        raise ImageError(f"{name}: unsupported input type {type(image).__name__}")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: too many pixels ({w}x{h} > {max_pixels:,})")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image too small ({w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} px)")
    return to_rgb(img)


def iter_inputs(paths: Sequence[str | Path]) -> Iterator[str]:
    """Expand files, folders (recursively, image files only) and glob patterns into file paths, lazily.

    Folders are walked in sorted order one directory at a time, so a folder of millions of images streams in
    constant memory. A path that neither exists nor matches a glob is kept, so it gets a row with its error.

    Args:
        paths: what the user passed.

    Yields:
        File paths in a deterministic order (each folder's entries sorted by name); when several paths are
        given, a file named twice is yielded once (first occurrence).
    """
    seen: set[str] | None = set() if len(paths) > 1 else None  # only several arguments can overlap
    for p in paths:
        s = str(p)
        path = Path(s)
        if path.is_dir():
            found: Iterable[str] = _walk_images(str(path))
        elif path.exists():
            found = [s]
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            found = [m for m in matches if Path(m).is_file()] or [s]
        else:
            found = [s]
        for f in found:
            if seen is not None:
                if f in seen:
                    continue
                seen.add(f)
            yield f


def _walk_images(folder: str) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return  # unreadable folder: nothing to classify there
    for entry in entries:
        if entry.is_dir():
            yield from _walk_images(entry.path)
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            yield entry.path


def collect_inputs(paths: Sequence[str | Path]) -> list[str]:
    """Expand files, folders (recursively, image files only) and glob patterns into a list of files.

    Args:
        paths: what the user passed.

    Returns:
        The files of :func:`iter_inputs`, as a list.
    """
    return list(iter_inputs(paths))


def shard_bounds(n: int, *, index: int, count: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that shard ``index`` of ``count`` takes.

    Contiguous (not round-robin) so that the shards' outputs, concatenated in shard order, are exactly the
    unsharded output; sizes differ by at most one.

    Args:
        n: number of items.
        index: shard number, 0-based (``--shard 1/4`` is index 0).
        count: number of shards (>= 1).

    Returns:
        ``(start, stop)``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index + 1}/{count}: need 1 <= i <= n")
    return n * index // count, n * (index + 1) // count


FORMATS = ("table", "csv", "jsonl", "json")
CSV_HEADER = ("source", "label", "prob_parasitized", "threshold", "error")


def format_predictions(
    predictions: Sequence[Prediction], *, fmt: str, card: dict | None = None, width: int = 160
) -> str:
    """Render predictions as a text table, CSV, JSON lines or JSON.

    Args:
        predictions: the results.
        fmt: "table", "csv", "jsonl" or "json".
        card: the model card, included in the JSON output.
        width: table width in characters.

    Returns:
        The text (ends with a newline).
    """
    return "".join(render_predictions(predictions, fmt=fmt, card=card, width=width))


def render_predictions(
    predictions: Iterable[Prediction], *, fmt: str, card: dict | None = None, width: int = 160, header: bool = True
) -> Iterator[str]:
    """Render predictions piece by piece, so a stream of millions is written without holding it.

    "csv" and "jsonl" yield one line per prediction (shards of one input concatenate: ``jsonl`` with ``cat``,
    ``csv`` with the header of the first); "json" streams one document ``{"model": card, "predictions": [...]}``;
    "table" collects every row first.

    Args:
        predictions: the results, consumed lazily.
        fmt: one of :data:`FORMATS`.
        card: the model card (JSON only).
        width: table width in characters.
        header: the CSV header line.

    Yields:
        Pieces of text; together they end with a newline.
    """
    if fmt == "json":
        yield '{"model": ' + json.dumps(card or {}, indent=2) + ', "predictions": ['
        sep = "\n"
        for p in predictions:
            yield sep + json.dumps(p.to_dict())
            sep = ",\n"
        yield "\n]}\n"
    elif fmt == "jsonl":
        for p in predictions:
            yield json.dumps(p.to_dict()) + "\n"
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        rows = (
            [
                p.source,
                p.label or "",
                "" if p.probability is None else f"{p.probability:.6f}",
                f"{p.threshold:.6f}",
                p.error or "",
            ]
            for p in predictions
        )
        for row in itertools.chain([CSV_HEADER] if header else [], rows):
            w.writerow(row)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        rows = list(predictions)
        threshold = f"; Parasitized when P >= {rows[0].threshold:.4f}" if rows else ""
        t = Table(title=f"{len(rows)} image(s){threshold}", title_justify="left")
        for col, just in (("source", "left"), ("label", "left"), ("P(Parasitized)", "right"), ("error", "left")):
            t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
        for p in rows:
            prob = "" if p.probability is None else f"{p.probability:.4f}"
            reason = (p.error or "").removeprefix(f"{p.source}: ")  # the source is in its own column
            t.add_row(p.source, p.label or "error", prob, reason)
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None).print(t)
        yield buf.getvalue()
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
