"""The web service: a page to drop cell images or a field photo on, and a small JSON API, with FastAPI and uvicorn.

Routes: ``GET /`` (the page, static files under ``/static``), ``POST /api/v1/predict`` (multipart, field
``files``, one or many cell images), ``POST /api/v1/smear`` (multipart, field ``file``: one field photo; every cell
found, classified and counted, see :mod:`malaria_cells.smear`), ``GET /api/v1/health``, ``GET /api/v1/model``
(model card, detector and limits), ``GET /openapi.json`` and ``GET /docs`` (also at ``/redoc``). Nothing the pages
load comes from outside this server (the machine may have no network): FastAPI's own /docs and /redoc pull Swagger UI
and ReDoc from a CDN, so both addresses here serve a small local page that renders ``/openapi.json`` itself.

Every failure is a JSON ``{"error": {"code", "message"}}`` with a 4xx/5xx status, never a 500 for bad input; the
codes and statuses come from the error objects (:class:`~malaria_cells.errors.MalariaCellsError`), never from their
English messages. For ``/api/v1/predict`` the body always lists every file (``results``); the status is 200 when all
files were classified, otherwise the status of the first file that failed, so a client can check one number.
``/api/v1/smear`` takes one photo, so a bad photo is a plain error answer with that photo's status and code.

How one request cannot stall the service, and how memory stays bounded:

* Admission (before the body is read): at most ``max_requests`` predictions and ``max_inflight_mb`` of declared
  upload bytes at once; beyond, ``503 server_busy`` with ``Retry-After``. Uploads over the request limit get 413,
  uploads slower than ``body_timeout_s`` get 408, request headers slower than ``header_timeout_s`` get the
  connection closed, and only the bound host names are served (DNS rebinding).
* Uploads spool to temporary files (Starlette keeps up to 1 MB per file in RAM); each file is read, decoded and
  letterboxed in one of ``decode_threads`` shared decoding threads (a request uses at most half of them at once),
  and its raw bytes and temporary file are dropped as soon as it is decoded.
  A request may decode at most ``max_request_megapixels`` in all (per file: :data:`preprocess.MAX_PIXELS`) and
  spend at most ``decode_timeout_s`` decoding.
* Only the model call holds a model slot, in batches of ``model_batch`` small letterboxed images, and slots are
  granted in arrival order, so a one-cell request is served between a big request's batches. A heatmap
  (``heatmap=true``) is one more model call per cell under a slot: Grad-CAM, or occlusion (the cell with each of at
  most 121 patches painted over, in one batch; :mod:`malaria_cells.heatmaps`).
* A field photo (``/api/v1/smear``) is decoded in the same decoding threads under the same limits; detecting and
  classifying its cells is one model call (~50-150 ms for a 1280 x 960 photo). A decoded photo is kept whole until
  its answer is made (up to 120 MB at 40 MP), so at most ``workers + 1`` photos are decoded or analysed at once;
  the others wait as spooled uploads.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import errno
import functools
import io
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from malaria_cells import __version__
from malaria_cells.backends import SHIPPED_MODEL, SHIPPED_RUN
from malaria_cells.errors import EXIT_UNAVAILABLE, ConfigError, MalariaCellsError, require_train_extra
from malaria_cells.predict import UNKNOWN, Classifier, ModelError, resolve_model
from malaria_cells.preprocess import MAX_PIXELS, ImageError, decode_image, webp_size
from malaria_cells.serve_adapt import ADAPT_PATH, AdaptJobs, adapt_router
from malaria_cells.serve_guard import (
    API,
    RETRY_AFTER_S,
    SMEAR_PATH,
    Admission,
    BodyGuard,
    HostCheck,
    SecurityHeaders,
    ServiceHTTPError,
    _error,
    _on_http_error,
    _on_package_error,
    _on_unexpected,
    _on_validation_error,
    log,
)
from malaria_cells.serve_schema import (
    OVERLAY_MAX_SIDE,
    DetectorInfo,
    ErrorInfo,
    ErrorResponse,
    FileFailure,
    FileSuccess,
    HealthResponse,
    ModelInfo,
    ModelSummary,
    PredictResponse,
    ServiceLimits,
    SmearCellResult,
    SmearModelSummary,
    SmearResponse,
    SmearSummary,
)

if TYPE_CHECKING:  # the smear modules load scipy: imported when the service starts, not with this module
    from malaria_cells.detect import Detector
    from malaria_cells.smear import FieldResult, SmearAnalyzer

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_FILES = 32
# Decoded pixels per request, in megapixels: a cell is ~130x130 px, so 32 cells are 0.5 MP; 64 MP is one image at
# the per-file limit (40 MP, preprocess.MAX_PIXELS) and then some. Decoding 40 MP takes ~0.5 s on one core.
DEFAULT_MAX_REQUEST_MEGAPIXELS = 64.0
# Predictions admitted at once (more: 503). benchmarks/load_test.py sends 16 at once; the memory bound is the bytes.
DEFAULT_MAX_REQUESTS = 32
DEFAULT_BODY_TIMEOUT_S = 60.0  # a whole upload; 320 MB (32 files x 10 MB) in 60 s needs ~43 Mbit/s
DEFAULT_DECODE_TIMEOUT_S = 30.0  # decoding one request's files, queueing for a decoding thread included
DEFAULT_HEADER_TIMEOUT_S = 10.0  # request line and headers (slowloris); uvicorn itself has no such timeout
DEFAULT_KEEP_ALIVE_S = 5  # idle keep-alive connections are closed after this (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's incomplete-event limit); ours are ~1 KB
DEFAULT_MODEL_BATCH = 8  # images per model call; a slot is released between batches
# Requests classified at once. benchmarks/load_test.py on 2 cores, one cell per request: 1 worker x 2 threads and
# 2 workers x 1 thread both serve ~230 requests/s, but 1 worker has half the p99 latency (137 vs 258 ms).
DEFAULT_WORKERS = 1
MULTIPART_OVERHEAD = 64 * 1024  # bytes per file allowed for multipart headers in the request-size limit
DISCLAIMER = "Research and education use only; not a medical device and not for diagnosis."
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


class ServeUnavailableError(MalariaCellsError):
    """Something the service needs cannot be had here (the port is in use); CLI exit code 4."""

    code = "unavailable"
    status = 503
    exit_code = EXIT_UNAVAILABLE


# --------------------------------------------------------------------------------------------- configuration


def _cores() -> int:
    """CPU cores this process may run on (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _positive(name: str, value: float, *, integer: bool = False, minimum: float = 0.0) -> None:
    """Raise ConfigError unless ``value`` is a finite number above ``minimum`` (at least 1 for integers)."""
    flag = "--" + name.replace("_", "-")
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < max(1, minimum):
            raise ConfigError(f"{flag} must be a whole number of at least {max(1, int(minimum))}, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= minimum:
        raise ConfigError(f"{flag} must be a number above {minimum:g}, not {value!r}")


def check_port(port: int) -> None:
    """Refuse a TCP port outside 1-65535.

    Args:
        port: the port to bind.

    Raises:
        ConfigError: out of range (CLI exit code 2).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, not {port!r}")


@dataclass(frozen=True)
class ServeConfig:
    """The service's limits and sizes; every value is checked when the object is made (ConfigError, exit code 2).

    Attributes:
        max_upload_mb: largest accepted file, in MB (10**6 bytes).
        max_files: most files in one request.
        max_request_megapixels: most decoded pixels in one request, in MP (10**6 px); files beyond get 413.
        max_requests: predictions admitted at once; more get 503 with Retry-After.
        max_inflight_mb: upload bytes (declared Content-Length) admitted at once, in MB; None: two largest
            requests. At least one largest request.
        workers: model calls at once (model slots).
        threads: intra-op threads of the model (None: cores // workers, at least 1).
        decode_threads: threads that decode uploads, shared by all requests (None: the cores, at least 2, so one
            big file never blocks every decode).
        model_batch: images per model call; the model slot is released between calls.
        body_timeout_s: most seconds to receive one request body; slower uploads get 408.
        decode_timeout_s: most seconds one request may spend decoding; files not started by then get 503.
        header_timeout_s: most seconds to receive a request's line and headers; slower connections are closed.
        keep_alive_s: idle keep-alive connections are closed after this many seconds.
        allowed_hosts: extra Host header names served (``*`` any, ``*.example.org`` subdomains); localhost,
            127.0.0.1, ::1 and the bound host are always served.
    """

    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_files: int = DEFAULT_MAX_FILES
    max_request_megapixels: float = DEFAULT_MAX_REQUEST_MEGAPIXELS
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_inflight_mb: float | None = None
    workers: int = DEFAULT_WORKERS
    threads: int | None = None
    decode_threads: int | None = None
    model_batch: int = DEFAULT_MODEL_BATCH
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    allowed_hosts: tuple[str, ...] = ()
    operating_point: str | None = None  # a named threshold of the model for cells (None: its default threshold)
    tta: bool = False  # 8-view test-time augmentation for every cell, at the model's own TTA threshold
    adapt_base: str | None = None  # the run folder POST /api/v1/adapt fine-tunes (default: the model, if a run)
    adapt_max_upload_mb: float = 500.0  # the zip of a lab's labelled cells or boxed photos

    def __post_init__(self) -> None:
        _positive("max_upload_mb", self.max_upload_mb)
        _positive("max_files", self.max_files, integer=True)
        _positive("max_request_megapixels", self.max_request_megapixels)
        _positive("max_requests", self.max_requests, integer=True)
        _positive("workers", self.workers, integer=True)
        _positive("model_batch", self.model_batch, integer=True)
        for name in ("threads", "decode_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), integer=True)
        for name in ("body_timeout_s", "decode_timeout_s", "header_timeout_s", "keep_alive_s"):
            _positive(name.removesuffix("_s").replace("_", "-"), getattr(self, name))
        if self.max_inflight_mb is not None:
            _positive("max_inflight_mb", self.max_inflight_mb)
            if self.max_inflight_mb * 1e6 < self.max_request_bytes:
                raise ConfigError(
                    f"--max-inflight-mb {self.max_inflight_mb:g} is less than one largest request "
                    f"({self.max_request_bytes / 1e6:.1f} MB = max files x max upload size); raise it"
                )
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else tuple(self.allowed_hosts)
        if any(not isinstance(h, str) or not h.strip() for h in hosts):
            raise ConfigError(f"--allowed-host needs a host name, not {self.allowed_hosts!r}")
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower().rstrip(".") for h in hosts))

    @property
    def max_upload_bytes(self) -> int:
        """Largest accepted file, in bytes."""
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_request_bytes(self) -> int:
        """Largest accepted request body: every file at the limit plus room for the multipart headers."""
        return self.max_files * (self.max_upload_bytes + MULTIPART_OVERHEAD)

    @property
    def max_photo_request_bytes(self) -> int:
        """Largest accepted field-photo request body (``/api/v1/smear`` takes one file)."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD

    @property
    def photo_slots(self) -> int:
        """Field photos decoded or analysed at once: one per model slot plus one decoding ahead."""
        return self.workers + 1

    @property
    def max_inflight_bytes(self) -> int:
        """Upload bytes admitted at once."""
        if self.max_inflight_mb is None:
            return 2 * self.max_request_bytes
        return int(self.max_inflight_mb * 1_000_000)

    @property
    def max_request_pixels(self) -> int:
        """Most decoded pixels in one request."""
        return int(self.max_request_megapixels * 1_000_000)

    @property
    def model_threads(self) -> int:
        """Intra-op threads of each model call."""
        return self.threads or max(1, _cores() // self.workers)

    @property
    def decoders(self) -> int:
        """Threads decoding uploads."""
        return self.decode_threads or max(2, _cores())

    @property
    def decode_window(self) -> int:
        """Files one request decodes at once: half the decoding threads, so one request never takes them all."""
        return max(1, self.decoders // 2)

    def served_hosts(self, bound_host: str) -> tuple[str, ...]:
        """The Host header names served when bound to ``bound_host``.

        Args:
            bound_host: the interface the server listens on.

        Returns:
            Lower-case names (patterns ``*`` and ``*.domain`` allowed).
        """
        extra = () if bound_host.strip("[]") in WILDCARD_BINDS else (bound_host.strip("[]").lower(),)
        return tuple(dict.fromkeys((*LOCAL_HOSTS, *extra, *self.allowed_hosts)))


# --------------------------------------------------------------------------------------------- service state


class ModelSlots:
    """At most ``size`` model calls at once, granted in arrival order (asyncio.Semaphore wakes waiters FIFO)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(size)  # made in the lifespan: it belongs to the server's event loop

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Wait for a slot, hold it for the block, release it."""
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self._sem.release()


@dataclass
class ServiceState:
    """Everything the running service holds: config, model, thread pools and load counters (event-loop only)."""

    config: ServeConfig
    hosts: tuple[str, ...]
    model: str | Path | None = None
    classifier: Classifier | None = None
    detector: str | Path | Detector | None = None  # a file (None: the shipped one) until start() loads it
    analyzer: SmearAnalyzer | None = None
    slots: ModelSlots | None = None
    photo_slots: asyncio.Semaphore | None = None
    decode_pool: ThreadPoolExecutor | None = None
    model_pool: ThreadPoolExecutor | None = None
    requests_in_flight: int = 0
    bytes_in_flight: int = 0
    decodes_in_progress: int = 0
    refused_busy: int = 0
    owns_classifier: bool = False

    async def start(self) -> None:
        """Load the model and the cell detector (unless given) and start the slots and thread pools."""
        from malaria_cells.detect import Detector
        from malaria_cells.smear import SmearAnalyzer

        cfg = self.config
        if self.classifier is None:
            self.classifier = await run_in_threadpool(
                lambda: Classifier.load(
                    self.model, threads=cfg.model_threads, operating_point=cfg.operating_point, tta=cfg.tta
                )
            )
            self.owns_classifier = True
        # The detector is small (~0.2 MB, loads in milliseconds): loaded now, so a bad --detector fails at start-up
        # and the first photo does not pay for it.
        det = self.detector
        if not isinstance(det, Detector):
            det = await run_in_threadpool(lambda: Detector(self.detector, threads=cfg.model_threads))
        # keep_crops costs nothing more (the crops and the photo exist anyway; it keeps references) and is never
        # switched per request, so concurrent requests cannot race on it.
        # Field photos: the given operating point, else the model's high-specificity point (smears are screened at
        # low parasitemia; see smear.SMEAR_OPERATING_POINT).
        self.analyzer = SmearAnalyzer(
            classifier=self.classifier, detector=det, keep_crops=True, operating_point=cfg.operating_point or "auto"
        )
        self.slots = ModelSlots(cfg.workers)
        self.photo_slots = asyncio.Semaphore(cfg.photo_slots)
        self.decode_pool = ThreadPoolExecutor(cfg.decoders, thread_name_prefix="serve-decode")
        self.model_pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="serve-model")
        clf = self.classifier
        log.info("model %s (%s) loaded from %s", clf.card.get("model"), clf.backend, clf.source)
        log.info("cell detector loaded from %s (threshold %g)", det.path, det.meta.threshold)

    def stop(self) -> None:
        """Stop the thread pools (and the classifier's, if this service loaded it)."""
        for pool in (self.decode_pool, self.model_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self.owns_classifier and self.classifier is not None:
            self.classifier.close()

    def try_admit(self, nbytes: int) -> bool:
        """Admit a prediction of ``nbytes`` declared upload bytes, or say no (the caller answers 503)."""
        cfg = self.config
        if self.requests_in_flight >= cfg.max_requests or self.bytes_in_flight + nbytes > cfg.max_inflight_bytes:
            self.refused_busy += 1
            return False
        self.requests_in_flight += 1
        self.bytes_in_flight += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Forget an admitted prediction."""
        self.requests_in_flight -= 1
        self.bytes_in_flight -= nbytes

    def health(self) -> HealthResponse:
        """The current load, and the status that sums it up."""
        cfg = self.config
        slots_busy = self.slots.busy if self.slots else 0
        queue = self.slots.waiting if self.slots else 0
        free_bytes = cfg.max_inflight_bytes - self.bytes_in_flight
        if self.classifier is None:
            status = "loading"
        elif self.requests_in_flight >= cfg.max_requests or free_bytes < cfg.max_upload_bytes:
            status = "saturated"
        elif queue or slots_busy >= cfg.workers or self.decodes_in_progress >= cfg.decoders:
            status = "busy"
        else:
            status = "ok"
        return HealthResponse(
            status=status,
            model_loaded=self.classifier is not None,
            version=__version__,
            requests_in_flight=self.requests_in_flight,
            max_requests_in_flight=cfg.max_requests,
            upload_mb_in_flight=round(self.bytes_in_flight / 1e6, 3),
            max_inflight_mb=round(cfg.max_inflight_bytes / 1e6, 3),
            model_slots=cfg.workers,
            model_slots_busy=slots_busy,
            model_queue=queue,
            decodes_in_progress=self.decodes_in_progress,
            decode_threads=cfg.decoders,
            refused_busy=self.refused_busy,
        )

    def detector_info(self) -> DetectorInfo | None:
        """The loaded detector, as /api/v1/model shows it."""
        if self.analyzer is None:
            return None
        det = self.analyzer.detector
        meta = det.meta.to_dict()
        del meta["stride"]
        return DetectorInfo(source=Path(det.path).name, **meta)

    def limits(self) -> ServiceLimits:
        """The limits, as /api/v1/model shows them."""
        cfg = self.config
        return ServiceLimits(
            max_upload_mb=cfg.max_upload_bytes / 1e6,
            max_files=cfg.max_files,
            max_request_mb=round(cfg.max_request_bytes / 1e6, 3),
            max_image_megapixels=MAX_PIXELS / 1e6,
            max_request_megapixels=cfg.max_request_pixels / 1e6,
            max_requests_in_flight=cfg.max_requests,
            max_inflight_mb=round(cfg.max_inflight_bytes / 1e6, 3),
            body_timeout_s=cfg.body_timeout_s,
            decode_timeout_s=cfg.decode_timeout_s,
        )


def service_state(app: FastAPI) -> ServiceState:
    """The :class:`ServiceState` of an app made by :func:`create_app`.

    Args:
        app: the application.

    Returns:
        Its state.
    """
    return app.state.service


def _state(request: Request) -> ServiceState:
    return service_state(request.app)


State = Annotated[ServiceState, Depends(_state)]


# --------------------------------------------------------------------------------------------- classification


@dataclass
class _Upload:
    """One uploaded file on its way through a request: its name, size, pixel count, then its result."""

    name: str
    file: BinaryIO
    nbytes: int = 0
    pixels: int | None = None  # from the header, None when the header cannot be read (decoding says why)
    prepared: np.ndarray | None = None  # the letterboxed uint8 model input (for a field photo: the whole photo)
    flag: str = ""  # why the image is unlike the training cells (malaria_cells.ood); "" when it looks like one
    failure: FileFailure | None = None

    def fail(self, status: int, code: str, message: str) -> None:
        self.failure = FileFailure(filename=self.name, status=status, error=ErrorInfo(code=code, message=message))


def _inspect(upload: _Upload) -> None:
    """Size in bytes and pixel count from the spooled file's header; nothing is decoded (runs in a thread)."""
    f = upload.file
    f.seek(0, os.SEEK_END)
    upload.nbytes = f.tell()
    f.seek(0)
    size = webp_size(f.read(30))
    f.seek(0)
    if size is None:
        try:
            with warnings.catch_warnings():
                # Pillow warns about images over its own limit; ours (MAX_PIXELS) is smaller and checked below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as img:  # reads the header only; the spooled file stays open
                    size = img.size
        except Exception:  # any unreadable header: decoding it gives the reason later
            size = None
        f.seek(0)
    upload.pixels = size[0] * size[1] if size else None


def _decode_photo(data: bytes, *, name: str) -> np.ndarray:
    """A field photo's bytes to uint8 (H, W, 3) RGB, whole (not letterboxed), with :func:`decode_image`'s checks."""
    return np.asarray(decode_image(data, name=name))


def _decode(convert: Callable[..., np.ndarray], upload: _Upload) -> np.ndarray | ImageError:
    """Read one upload, decode it with ``convert(data, name=...)``, and drop its bytes and spooled file (runs in a
    thread)."""
    try:
        upload.file.seek(0)
        data = upload.file.read()
    except OSError as e:
        return ImageError(f"{upload.name}: cannot read the upload ({e})", code="file_unreadable")
    finally:
        upload.file.close()  # the temporary file (or its RAM copy) goes now, not at the end of the request
    try:
        return convert(data, name=upload.name)
    except ImageError as e:
        return e


def _admit_pixels(uploads: list[_Upload], cfg: ServeConfig) -> list[_Upload]:
    """Refuse oversized files and the files that do not fit in the request's pixel budget; the rest, in order."""
    left = cfg.max_request_pixels
    todo = []
    for u in uploads:
        if u.nbytes > cfg.max_upload_bytes:
            u.fail(413, "file_too_large", f"{u.name}: larger than the {cfg.max_upload_bytes / 1e6:g} MB limit")
        elif u.pixels is not None and u.pixels <= MAX_PIXELS and u.pixels > left:
            u.fail(
                413,
                "request_too_many_pixels",
                f"{u.name}: with it this request's images would hold more than {cfg.max_request_pixels / 1e6:g} "
                f"megapixels in all (the limit per request; {u.pixels / 1e6:.1f} MP in this file, "
                f"{left / 1e6:.1f} MP left); send it in another request",
            )
        else:
            left -= u.pixels if u.pixels is not None and u.pixels <= MAX_PIXELS else 0  # over MAX_PIXELS: refused
            todo.append(u)
    return todo


async def _decode_all(
    state: ServiceState, uploads: list[_Upload], convert: Callable[..., np.ndarray] | None = None
) -> None:
    """Decode the uploads in the shared decoding threads, ``decode_window`` at a time, within the time budget.

    Args:
        state: the service.
        uploads: the files to decode; each gets ``prepared`` or ``failure``.
        convert: bytes to array, called as ``convert(data, name=...)`` (default: the classifier's letterboxing).
    """
    cfg = state.config
    clf = state.classifier
    loop = asyncio.get_running_loop()
    assert clf is not None and state.decode_pool is not None
    convert = convert or clf.prepare_checked
    start = time.monotonic()

    async def one(u: _Upload) -> None:
        state.decodes_in_progress += 1
        try:
            out = await loop.run_in_executor(state.decode_pool, _decode, convert, u)
        finally:
            state.decodes_in_progress -= 1
        if isinstance(out, ImageError):
            u.fail(out.status, out.code, out.message)
        elif isinstance(out, tuple):  # prepare_checked: (input, out-of-distribution flag)
            u.prepared, u.flag = out
        else:
            u.prepared = out

    running: collections.deque[asyncio.Task] = collections.deque()
    try:
        for u in uploads:
            while len(running) >= cfg.decode_window:
                await running.popleft()
            if time.monotonic() - start > cfg.decode_timeout_s:
                u.file.close()
                u.fail(
                    503,
                    "decode_timeout",
                    f"{u.name}: not decoded: this request used up its {cfg.decode_timeout_s:g} s decoding time "
                    "(the server is busy, or the images are large); send it again or in a smaller request",
                )
                continue
            running.append(asyncio.ensure_future(one(u)))
        while running:
            await running.popleft()
    finally:
        for task in running:  # only on an error above: stop waiting (a decode running in a thread ends there)
            task.cancel()


async def _classify(state: ServiceState, uploads: list[_Upload]) -> dict[int, float]:
    """P(Parasitized) of the decoded uploads, by index, in batches that each hold a model slot."""
    clf, slots, pool = state.classifier, state.slots, state.model_pool
    assert clf is not None and slots is not None and pool is not None
    loop = asyncio.get_running_loop()
    ready = [i for i, u in enumerate(uploads) if u.prepared is not None]
    probs: dict[int, float] = {}
    step = state.config.model_batch
    for a in range(0, len(ready), step):
        idx = ready[a : a + step]
        batch = np.stack([uploads[i].prepared for i in idx])
        async with slots.hold():
            out = await loop.run_in_executor(pool, clf.predict_prepared, batch)
        probs.update(zip(idx, (float(p) for p in out), strict=True))
    return probs


def _heatmap(clf: Classifier, prepared: np.ndarray, name: str) -> str | None:
    from malaria_cells.heatmaps import heatmap_png, occlusion_map

    try:
        if clf.explainable:
            from malaria_cells.explain import explain  # torch models only; keeps the ONNX service torch-free

            heat = explain(clf, prepared, name=name).heatmap  # letterboxing a letterboxed image changes nothing
        else:
            heat, _ = occlusion_map(clf, prepared)  # one batch: the cell and at most 121 occluded copies
        png = heatmap_png(prepared, heat)
    except (ImageError, ModelError):
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------------- routes


async def index() -> FileResponse:
    """The page."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def docs() -> FileResponse:
    """The local API documentation page (renders /openapi.json)."""
    return FileResponse(STATIC / "docs.html", media_type="text/html")


async def health(state: State) -> HealthResponse:
    """Liveness, readiness and load: requests in flight, model slots and queue, decoding threads."""
    return state.health()


async def model_info(state: State) -> ModelInfo:
    """The model card and this service's limits."""
    clf = state.classifier
    if clf is None:
        raise ServiceHTTPError(
            503, "loading", "the model is still loading; retry in a moment", headers={"Retry-After": "1"}
        )
    card = {**clf.card, "source": Path(clf.source).name}  # the file name, not the server's directory layout
    method = "grad-cam" if clf.explainable else "occlusion"
    return ModelInfo(**card, heatmap_method=method, detector=state.detector_info(), limits=state.limits())


async def predict(
    state: State,
    files: Annotated[list[UploadFile], File(description="Cell images (PNG, JPEG, WebP, ...), one part per file.")],
    heatmap: Annotated[
        bool, Query(description="Add a heatmap per cell: Grad-CAM (torch models) or occlusion sensitivity (ONNX).")
    ] = False,
) -> JSONResponse:
    """Classify the uploaded images; every file gets a result, in order."""
    cfg, clf = state.config, state.classifier
    if clf is None or state.slots is None:
        return _error(503, "loading", "the model is still loading; retry in a moment", headers={"Retry-After": "1"})
    if len(files) > cfg.max_files:
        return _error(400, "too_many_files", f"{len(files)} files; at most {cfg.max_files} per request")
    uploads = [_Upload(name=f.filename or f"file {i + 1}", file=f.file) for i, f in enumerate(files)]
    await run_in_threadpool(lambda: [_inspect(u) for u in uploads])  # headers only: fast, but file I/O
    await _decode_all(state, _admit_pixels(uploads, cfg))
    probs = await _classify(state, uploads)
    results: list[FileSuccess | FileFailure] = []
    for i, u in enumerate(uploads):
        if i in probs:
            p = probs[i]
            raw = clf.label_of(p)
            label = UNKNOWN if u.flag and clf.unknown_when_flagged else raw
            results.append(
                FileSuccess(
                    filename=u.name,
                    label=label,
                    prob_parasitized=p,
                    threshold=clf.threshold,
                    flag=u.flag,
                    raw_label=raw,
                )
            )
        else:
            assert u.failure is not None
            results.append(u.failure)
    if heatmap:
        loop = asyncio.get_running_loop()
        for i, r in enumerate(results):
            if isinstance(r, FileSuccess):
                async with state.slots.hold():
                    r.heatmap = await loop.run_in_executor(
                        state.model_pool, _heatmap, clf, uploads[i].prepared, uploads[i].name
                    )
    failed = [r for r in results if isinstance(r, FileFailure)]
    body = PredictResponse(
        results=results,
        model=ModelSummary(name=clf.card.get("model"), backend=clf.backend, threshold=clf.threshold),
        error=ErrorInfo(
            code=failed[0].error.code,
            message=f"{len(failed)} of {len(results)} file(s) could not be classified; first: "
            f"{failed[0].error.message}",
        )
        if failed
        else None,
        warning=clf.single_cell_warning,
    )
    payload = body.model_dump(mode="json")
    for key in ("error", "warning"):  # present only when there is something to say
        if payload[key] is None:
            del payload[key]
    status = failed[0].status if failed else 200
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(payload, status_code=status, headers=headers)


async def smear(
    state: State,
    request: Request,
    file: Annotated[UploadFile, File(description="One field photo of a thin smear (JPEG, PNG, TIFF, WebP).")],
    overlay: Annotated[bool, Query(description="Add the photo with every cell outlined, as a data URL.")] = False,
    overlay_format: Annotated[
        Literal["png", "jpeg"],
        Query(description="The overlay's encoding: png (lossless, ~1.3 MB for 1280 x 960 px) or jpeg (~0.25 MB)."),
    ] = "png",
    crops: Annotated[
        bool, Query(description="Add each cell's classifier input (the cell on black) as a PNG data URL.")
    ] = False,
    stain_normalize: Annotated[
        bool | None,
        Query(
            description="Move the photo's cells to the NIH training cells' stain before classifying: for another "
            "lab's photos with a model trained on NIH cells (more infected cells found, more false alarms; "
            "docs/trust.md). Default: the model's choice (on for a model adapted on normalized cells)."
        ),
    ] = None,
) -> JSONResponse:
    """Find, classify and count the red blood cells of one field photo."""
    cfg, analyzer = state.config, state.analyzer
    if analyzer is None or state.slots is None or state.photo_slots is None or state.model_pool is None:
        return _error(503, "loading", "the model is still loading; retry in a moment", headers={"Retry-After": "1"})
    parts = (await request.form()).getlist("file")  # FastAPI parsed the form already: this is its cached copy
    if len(parts) > 1:
        return _error(400, "too_many_files", f"{len(parts)} parts named 'file'; send one field photo per request")
    upload = _Upload(name=file.filename or "photo", file=file.file)
    await run_in_threadpool(_inspect, upload)  # header only: size and pixel count
    loop = asyncio.get_running_loop()
    # A decoded photo is held until its answer is made: the photo slots bound how many are in memory at once.
    async with state.photo_slots:
        await _decode_all(state, _admit_pixels([upload], cfg), convert=_decode_photo)
        if upload.failure is not None:
            err = upload.failure.error
            retry = {"Retry-After": str(RETRY_AFTER_S)} if upload.failure.status == 503 else None
            return _error(upload.failure.status, err.code, err.message, headers=retry)
        rgb, upload.prepared = upload.prepared, None
        assert rgb is not None
        # Detection and classification are one model call: the slot is held ~50-150 ms for a 1280 x 960 photo.
        async with state.slots.hold():
            result = await loop.run_in_executor(
                state.model_pool,
                functools.partial(analyzer.analyze_array, rgb, name=upload.name, stain_normalize=stain_normalize),
            )
        # Drawing and encoding the overlay and crops is not model work: done in a decoding thread, slot released.
        fmt = overlay_format if overlay else None
        answer = functools.partial(smear_body, result, analyzer, overlay=fmt, crops=crops)
        body = await loop.run_in_executor(state.decode_pool, answer)
    return JSONResponse(body)


def _data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        # Fastest zlib level: 4x quicker than the default for 20 % more bytes; CPU is what a busy server lacks.
        img.save(buf, format="PNG", compress_level=1)
    mime = "image/jpeg" if fmt == "jpeg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def smear_overlay(result: FieldResult, *, fmt: str = "png") -> str:
    """The photo with every cell's box drawn (:func:`malaria_cells.overlay.draw_overlay`), as a data URL.

    Args:
        result: an analysed photo, with its ``photo`` kept.
        fmt: ``png`` or ``jpeg``.

    Returns:
        The data URL; photos longer than :data:`OVERLAY_MAX_SIDE` px are drawn scaled down to it.
    """
    from malaria_cells.overlay import draw_overlay

    assert result.photo is not None
    photo = Image.fromarray(result.photo)
    cells: Sequence[Any] = result.cells
    k = OVERLAY_MAX_SIDE / max(photo.size)
    if k < 1:
        photo = photo.resize((max(1, round(photo.width * k)), max(1, round(photo.height * k))), Image.BILINEAR)
        cells = [
            dataclasses.replace(c, x=round(c.x * k), y=round(c.y * k), w=round(c.w * k), h=round(c.h * k))
            for c in result.cells
        ]
    return _data_url(draw_overlay(photo, cells), fmt)


def smear_body(
    result: FieldResult, analyzer: SmearAnalyzer, *, overlay: str | None = None, crops: bool = False
) -> dict[str, Any]:
    """The JSON answer of ``/api/v1/smear`` for one analysed photo.

    Args:
        result: the photo's result (with ``photo`` and ``crops`` kept when an overlay or crops are asked for).
        analyzer: the analyzer that made it (model names and thresholds).
        overlay: ``png`` or ``jpeg`` to add the overlay; None for none.
        crops: add each cell's classifier input as a PNG data URL.

    Returns:
        A :class:`SmearResponse` as JSON-ready data, without ``overlay`` or ``crop`` keys unless asked for.
    """
    clf, det = analyzer.classifier, analyzer.detector
    cells = []
    for c in result.cells:
        known = not math.isnan(c.prob_parasitized)  # Unknown and Other cells have no probability
        crop = None
        if crops and known and result.crops is not None:
            crop = _data_url(Image.fromarray(result.crops[c.cell]), "png")
        cells.append(
            SmearCellResult(
                cell=c.cell, x=c.x, y=c.y, w=c.w, h=c.h, area=c.area, on_border=c.on_border,
                prob_parasitized=round(float(c.prob_parasitized), 6) if known else None, label=c.label, crop=crop,
            )
        )  # fmt: skip
    p = result.parasitemia
    row = result.to_row()  # the fields.csv row of `malaria-cells smear`: the same counts, by the same rules
    pct = lambda v: None if math.isnan(v) else round(100 * v, 4)  # noqa: E731
    body = SmearResponse(
        filename=result.image,
        width=result.width,
        height=result.height,
        cells=cells,
        summary=SmearSummary(
            cells=result.n_cells,
            infected=result.n_infected,
            parasitemia_pct=pct(p.estimate),
            ci95_pct=None if math.isnan(p.estimate) else [pct(p.low), pct(p.high)],
            border_cells=row["border_cells"],
            unknown_cells=row["unknown_cells"],
            other_objects=row.get("other_objects", 0),
            warning=result.warning,
        ),
        model=SmearModelSummary(
            name=clf.card.get("model"),
            backend=clf.backend,
            threshold=analyzer.threshold,
            detector=Path(det.path).name,
            detector_threshold=det.meta.threshold,
            stain_normalized=result.stain_normalized,
        ),
        overlay=smear_overlay(result, fmt=overlay) if overlay else None,
        disclaimer=str(clf.card.get("disclaimer") or DISCLAIMER),
    )
    payload = body.model_dump(mode="json")
    if not overlay:
        del payload["overlay"]
    if not crops:
        for c in payload["cells"]:
            del c["crop"]
    return payload


def _smear_description(cfg: ServeConfig) -> str:
    return (
        "Multipart form with one part named `file`: a photo of one microscope field of a Giemsa-stained thin "
        "smear. Every red blood cell is found (a small detector), cut out and classified; cells cut by the photo's "
        "edge are listed but not counted. `summary` gives the counts and the parasitemia with its exact 95 % "
        "interval; a photo where no cell is found is still a 200, with `summary.warning` set. `overlay=true` adds the "
        "photo with the boxes drawn (`overlay_format=jpeg` for a smaller one), `crops=true` each cell's classifier "
        "input. Box coordinates are pixels of the uploaded photo as stored (EXIF rotation is not applied).\n\n"
        f"Limits: one photo per request, {cfg.max_upload_bytes / 1e6:g} MB, {MAX_PIXELS / 1e6:g} megapixels "
        f"(and at most {cfg.max_request_pixels / 1e6:g} megapixels per request), {cfg.decode_timeout_s:g} s of "
        "decoding; bad uploads get the same statuses and codes as /api/v1/predict (a plain error answer). Requests "
        f"share the admission limits of /api/v1/predict ({cfg.max_requests} at once; beyond, 503 `server_busy`)."
    )


def _predict_description(cfg: ServeConfig) -> str:
    return (
        "Multipart form with one or more parts named `files`. Returns one entry per file, in order. Status 200 "
        "when every file was classified, otherwise the status of the first failure (the body still lists every "
        "file). `heatmap=true` adds a heatmap of the evidence for each label (PNG data URL): Grad-CAM for torch "
        "models, occlusion sensitivity for ONNX ones (the model card's `heatmap_method`).\n\n"
        f"Limits: at most {cfg.max_files} files per request, {cfg.max_upload_bytes / 1e6:g} MB per file, "
        f"{cfg.max_request_bytes / 1e6:.1f} MB per request body, {MAX_PIXELS / 1e6:g} megapixels per image and "
        f"{cfg.max_request_pixels / 1e6:g} megapixels per request (decoded; files beyond get 413 "
        f"`request_too_many_pixels`), {cfg.decode_timeout_s:g} s of decoding per request and {cfg.body_timeout_s:g} "
        f"s to send the body (408). At most {cfg.max_requests} requests and {cfg.max_inflight_bytes / 1e6:.0f} MB "
        "of uploads are admitted at once; beyond, 503 `server_busy` with Retry-After."
    )


def api_router(cfg: ServeConfig) -> APIRouter:
    """The JSON API's routes, with this configuration's limits in their descriptions.

    Args:
        cfg: the service configuration.

    Returns:
        The router (prefix /api/v1).
    """
    router = APIRouter(prefix=API)
    router.add_api_route(
        "/health",
        health,
        methods=["GET"],
        response_model=HealthResponse,
        summary="Liveness, whether the model is loaded, and the load (requests in flight, queue, busy slots)",
    )
    router.add_api_route(
        "/model",
        model_info,
        methods=["GET"],
        response_model=ModelInfo,
        summary="The model card: name, classes, threshold, preprocessing, provenance, and the service's limits",
        responses={503: {"model": ErrorResponse, "description": "the model is still loading"}},
    )
    failure = {"model": PredictResponse}
    router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        summary="Classify one or many cell images",
        description=_predict_description(cfg),
        responses={
            400: {"model": ErrorResponse, "description": "no files, a part that is not a file, too many files"},
            408: {"model": ErrorResponse, "description": "the body was not received in time"},
            413: {
                **failure,
                "description": "a file (file_too_large, too_many_pixels, request_too_many_pixels) or the request "
                "body (request_too_large: then an ErrorResponse) is too large",
            },
            415: {**failure, "description": "a file is not an image (not_an_image)"},
            422: {
                **failure,
                "description": "an image is unusable (empty_file, unreadable_image, image_too_small, unusable_image)",
            },
            503: {
                "model": ErrorResponse,
                "description": "server busy (server_busy, with Retry-After), or decoding ran out of time "
                "(decode_timeout: then a PredictResponse)",
            },
        },
    )
    router.add_api_route(
        "/smear",
        smear,
        methods=["POST"],
        response_model=SmearResponse,
        summary="Count the infected red blood cells of one field photo (parasitemia)",
        description=_smear_description(cfg),
        responses={
            400: {"model": ErrorResponse, "description": "no photo (no_files), a plain field (not_a_file), two photos"},
            408: {"model": ErrorResponse, "description": "the body was not received in time"},
            413: {
                "model": ErrorResponse,
                "description": "the photo is too large (request_too_large, file_too_large, too_many_pixels, "
                "request_too_many_pixels)",
            },
            415: {"model": ErrorResponse, "description": "not an image (not_an_image)"},
            422: {
                "model": ErrorResponse,
                "description": "an unusable photo (empty_file, unreadable_image, image_too_small) or a bad parameter",
            },
            503: {"model": ErrorResponse, "description": "server busy (server_busy) or decoding ran out of time"},
        },
    )
    return router


# --------------------------------------------------------------------------------------------- app and server


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = service_state(app)
    await state.start()
    # Known once the model is loaded: its source is then the resolved path (argument, $MALARIA_CELLS_MODEL or shipped).
    app.state.adapt_jobs = AdaptJobs(base=_adapt_base(state.classifier, state.config))
    try:
        yield
    finally:
        state.stop()
        app.state.adapt_jobs.close()


def _adapt_base(classifier: Classifier, cfg: ServeConfig) -> Path | None:
    """The run folder adapt jobs start from: the configured one, else the served model when it is a run folder, else
    the shipped run when the served model is the shipped ONNX file (exported from it); None: nothing to fine-tune."""
    if cfg.adapt_base:
        return Path(cfg.adapt_base)
    source = Path(classifier.source)
    if source.is_dir():
        return source
    if source.resolve() == SHIPPED_MODEL.resolve() and SHIPPED_RUN.is_dir():
        return SHIPPED_RUN
    return None


def create_app(
    *,
    model: str | Path | None = None,
    classifier: Classifier | None = None,
    detector: str | Path | Detector | None = None,
    host: str = "127.0.0.1",
    config: ServeConfig | None = None,
    **options: Any,
) -> FastAPI:
    """Build the app; the model and the cell detector are loaded once, at start-up (lifespan), unless given.

    Args:
        model: an ``.onnx`` file or a run folder (``None``: ``$MALARIA_CELLS_MODEL`` or the shipped default).
        classifier: an already loaded classifier (tests); wins over ``model``.
        detector: the cell detector of ``/api/v1/smear``: an ``.onnx`` file or a loaded
            :class:`~malaria_cells.detect.Detector` (``None``: ``$MALARIA_CELLS_DETECTOR`` or the shipped one).
        host: the interface the server binds; its name is served besides localhost (see ``allowed_hosts``).
        config: the limits; or give them as keyword arguments (``max_upload_mb=1``, ...; see :class:`ServeConfig`).
        **options: :class:`ServeConfig` fields, when ``config`` is not given.

    Returns:
        The FastAPI application.

    Raises:
        ConfigError: a limit out of range (or both ``config`` and options).
    """
    if config is not None and options:
        raise ConfigError("give create_app either config= or limits as keyword arguments, not both")
    cfg = config or ServeConfig(**options)
    state = ServiceState(
        config=cfg, hosts=cfg.served_hosts(host), model=model, classifier=classifier, detector=detector
    )
    app = FastAPI(
        title="malaria-cells",
        version=__version__,
        summary="Classify thin-smear red blood cell images as Parasitized or Uninfected, and count the parasitemia "
        "of a field photo.",
        description=f"{DISCLAIMER}\n\n"
        f"Limits: {cfg.max_files} files per request, {cfg.max_upload_bytes / 1e6:g} MB per file, "
        f"{MAX_PIXELS / 1e6:g} MP per image, {cfg.max_request_pixels / 1e6:g} MP per request; "
        f"{cfg.max_requests} requests at once. Served host names: {', '.join(state.hosts)}.",
        lifespan=_lifespan,
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN; /docs and /redoc below are local
        redoc_url=None,
    )
    app.state.service = state
    app.include_router(api_router(cfg))
    app.include_router(adapt_router())
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", docs, methods=["GET"], include_in_schema=False)  # the address FastAPI users try
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(MalariaCellsError, _on_package_error)
    app.add_exception_handler(Exception, _on_unexpected)
    # Added innermost first: a request meets SecurityHeaders, then HostCheck, BodyGuard, Admission.
    app.add_middleware(Admission, state=state)
    app.add_middleware(
        BodyGuard,
        max_bytes=cfg.max_request_bytes,
        timeout_s=cfg.body_timeout_s,
        path_limits={
            SMEAR_PATH: (cfg.max_photo_request_bytes, "one photo per request, at most max upload size"),
            ADAPT_PATH: (int(cfg.adapt_max_upload_mb * 1e6), "one zip of labelled cells, at most adapt_max_upload_mb"),
        },
    )
    app.add_middleware(HostCheck, allowed=state.hosts)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _protocol_with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take over ``seconds``.

    uvicorn times out idle keep-alive connections only: a client that sends a header byte now and then holds a
    connection forever (slowloris). The timer starts when the connection opens, or with the first byte of the next
    request on a kept-alive connection, and stops when the headers are complete.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection whose request headers took over %g s", seconds)
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """uvicorn's settings for an app from :func:`create_app`: its timeouts and header-size limit.

    Args:
        app: the application.
        host: interface.
        port: TCP port.
        log_level: uvicorn's log level.

    Returns:
        A ``uvicorn.Config``.
    """
    import uvicorn

    cfg = service_state(app).config
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_protocol_with_header_timeout(cfg.header_timeout_s),
        timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type]  # a float works: it goes to call_later
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        server_header=False,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one), made before the model loads.

    Args:
        host: interface (IPv4 or IPv6 address or name).
        port: TCP port, 0 for any free one.

    Returns:
        The bound socket.

    Raises:
        ServeUnavailableError: the port is in use or the address is not this machine's (exit code 4).
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ServeUnavailableError(f"cannot listen on {host}:{port} ({e.strerror or e})", code="bind_failed") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = (
            "the port is in use; pick another with --port" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        )
        raise ServeUnavailableError(f"cannot listen on {host}:{port}: {reason}", code="bind_failed") from None
    sock.set_inheritable(True)
    return sock


def serve(
    *,
    model: str | Path | None = None,
    detector: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    **options: Any,
) -> None:
    """Load the model and serve until interrupted.

    Args:
        model: an ``.onnx`` file or run folder (``None``: ``$MALARIA_CELLS_MODEL`` or the shipped default).
        detector: the cell detector ``.onnx`` (``None``: ``$MALARIA_CELLS_DETECTOR`` or the shipped one).
        host: interface to bind (127.0.0.1: this machine only).
        port: TCP port.
        config: the limits; or give them as keyword arguments (see :class:`ServeConfig`).
        **options: :class:`ServeConfig` fields, when ``config`` is not given.

    Raises:
        ConfigError: a limit or the port out of range (exit code 2), before anything is loaded.
        ModelError: no usable model or detector (exit code 2).
        ServeUnavailableError: the port cannot be bound (exit code 4).
        ExtraMissingError: a run folder as the model without the ``train`` extra (exit code 4).
    """
    import uvicorn

    check_port(port)
    cfg = config or ServeConfig(**options)
    # A missing model (or, for a run folder, a missing torch) is a clear error here, not a traceback from the
    # start-up hook.
    if resolve_model(model).is_dir():
        require_train_extra("serving a run folder")
    from malaria_cells.detect import resolve_detector

    resolve_detector(detector)  # the same for a missing detector
    sock = bind_socket(host, port)  # a port in use is a clear error here, before the model loads
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    app = create_app(model=model, detector=detector, host=host, config=cfg)
    if host.strip("[]") in WILDCARD_BINDS and not cfg.allowed_hosts:
        log.warning(
            "listening on all interfaces, but only requests naming %s are served; add --allowed-host NAME for each "
            "name or address clients use",
            ", ".join(LOCAL_HOSTS),
        )
    try:
        uvicorn.Server(uvicorn_config(app, host=host, port=port)).run(sockets=[sock])
    finally:
        sock.close()
