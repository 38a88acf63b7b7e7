"""The web service: a page to drop cell images on, and a small JSON API, with FastAPI and uvicorn.

Routes: ``GET /`` (the page, static files under ``/static``), ``POST /api/v1/predict`` (multipart, field
``files``, one or many), ``GET /api/v1/health``, ``GET /api/v1/model`` (model card), ``GET /openapi.json``
and ``GET /docs``. Nothing the pages load comes from outside this server (the machine may have no network):
FastAPI's own /docs pulls Swagger UI from a CDN, so ``/docs`` here is a small local page that renders
``/openapi.json`` itself.

Every failure is a JSON ``{"error": {"code", "message"}}`` with a 4xx status, never a 500 for bad input. For
``/api/v1/predict`` the body always lists every file (``results``); the status is 200 when all files were
classified, otherwise the 4xx of the first file that failed, so a client can check one number.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from malaria_cells import __version__
from malaria_cells.predict import Classifier, ModelError, Prediction, resolve_model
from malaria_cells.preprocess import ImageError

STATIC = Path(__file__).resolve().parent / "static"
API = "/api/v1"
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_FILES = 32  # with 10 MB files, at most 320 MB of uploads held at once
# Requests classified at once. benchmarks/load_test.py on 2 cores, one cell per request: 1 worker x 2 threads and
# 2 workers x 1 thread both serve ~230 requests/s, but 1 worker has half the p99 latency (137 vs 258 ms).
DEFAULT_WORKERS = 1
# Pages may load only what this server serves; data: and blob: for the heatmaps and the local previews.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
log = logging.getLogger("malaria_cells.serve")


def error_code(message: str) -> tuple[int, str]:
    """HTTP status and a machine-readable code for an :class:`ImageError` message.

    Args:
        message: the error's text (``decode_image`` words its reasons consistently).

    Returns:
        (status, code).
    """
    checks = (
        ("empty file", 422, "empty_file"),
        ("not an image", 415, "not_an_image"),
        ("too many pixels", 422, "too_many_pixels"),
        ("too small", 422, "image_too_small"),
        ("truncated", 422, "unreadable_image"),
    )
    for needle, status, code in checks:
        if needle in message:
            return status, code
    return 422, "unusable_image"


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, **extra}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, before anything parses them.

    Checks Content-Length up front and counts streamed bytes too (a chunked upload has no length).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"request body larger than {self.max_bytes / 1e6:.1f} MB (max files x max upload size); "
            "send fewer or smaller files"
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _error(413, "request_too_large", message)(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(message)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _error(413, "request_too_large", message)(scope, receive, send)


class _TooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on (it turns other errors into a 400).
    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


def create_app(
    *,
    model: str | Path | None = None,
    classifier: Classifier | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_files: int = DEFAULT_MAX_FILES,
    threads: int | None = None,
    workers: int = DEFAULT_WORKERS,
) -> FastAPI:
    """Build the app; the model is loaded once, at start-up (lifespan), unless a classifier is given.

    Requests are decoded and classified in at most ``workers`` threads at a time, each model call using
    ``threads`` cores: with 16 clients and no cap every request's model call would ask for every core at once,
    and the server would grow a thread (and its runtime arenas) per concurrent request.

    Args:
        model: an ``.onnx`` file or a run folder (``None``: ``$MALARIA_CELLS_MODEL`` or the shipped default).
        classifier: an already loaded classifier (tests); wins over ``model``.
        max_upload_mb: largest accepted file, in MB (10**6 bytes).
        max_files: most files in one request.
        threads: intra-op threads of the model (default: cores // workers, at least 1).
        workers: requests classified at once (>= 1); the others wait their turn.

    Returns:
        The FastAPI application.
    """
    max_upload = int(max_upload_mb * 1_000_000)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.classifier = classifier or await run_in_threadpool(Classifier.load, model, threads=threads)
        app.state.model_slots = asyncio.Semaphore(workers)  # created here: it belongs to the server's event loop
        clf: Classifier = app.state.classifier
        log.info("model %s (%s) loaded from %s", clf.card.get("model"), clf.backend, clf.source)
        yield

    app = FastAPI(
        title="malaria-cells",
        version=__version__,
        summary="Classify thin-smear red blood cell images as Parasitized or Uninfected.",
        description="Research and education use only; not a medical device and not for diagnosis.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN; /docs below is local
        redoc_url=None,
    )
    app.state.max_upload = max_upload
    app.state.max_files = max_files
    # Largest legitimate body: every file at the limit, plus room for the multipart headers.
    app.add_middleware(BodyLimit, max_bytes=max_files * max_upload + 64 * 1024 * max_files)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        missing_files = any(tuple(e.get("loc") or ())[-1:] == ("files",) for e in exc.errors())
        if missing_files:
            return _error(
                400,
                "no_files",
                "no image files in the request: send multipart/form-data with one or more parts named 'files'",
            )
        return _error(422, "invalid_request", "; ".join(_describe(e) for e in exc.errors()) or "invalid request")

    @app.exception_handler(HTTPException)
    async def on_http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        code = codes.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, "internal_error", f"unexpected server error ({type(exc).__name__}); see the server log")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get(f"{API}/health", summary="Liveness and whether the model is loaded")
    async def health(request: Request) -> dict[str, Any]:
        clf: Classifier | None = getattr(request.app.state, "classifier", None)
        return {
            "status": "ok" if clf else "loading",
            "model_loaded": clf is not None,
            "version": __version__,
        }

    @app.get(f"{API}/model", summary="The model card: name, classes, threshold, preprocessing, provenance")
    async def model_info(request: Request) -> dict[str, Any]:
        clf: Classifier = request.app.state.classifier
        return {
            **clf.card,
            "source": Path(clf.source).name,  # not the server's directory layout
            "limits": {"max_upload_mb": max_upload / 1e6, "max_files": request.app.state.max_files},
        }

    @app.post(
        f"{API}/predict",
        summary="Classify one or many cell images",
        description="Multipart form with one or more parts named `files`. Returns one entry per file, in order. "
        "Status 200 when every file was classified, otherwise the 4xx of the first failure (the body still lists "
        "every file). `heatmap=true` adds a Grad-CAM overlay (PNG data URL) for torch models.",
        responses={
            400: {"description": "no files, or a malformed request"},
            413: {"description": "a file or the request is too large"},
            415: {"description": "a file is not an image"},
            422: {"description": "an image is unusable (empty, truncated, too small, too many pixels)"},
        },
    )
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description="cell images (PNG, JPEG, WebP, ...)")],
        heatmap: Annotated[bool, Query(description="add Grad-CAM overlays (torch models only)")] = False,
    ) -> JSONResponse:
        clf: Classifier = request.app.state.classifier
        if len(files) > request.app.state.max_files:
            return _error(400, "too_many_files", f"{len(files)} files; at most {request.app.state.max_files}")
        names: list[str] = []
        contents: list[bytes | None] = []
        early: dict[int, dict] = {}
        for i, f in enumerate(files):
            name = f.filename or f"file {i + 1}"
            names.append(name)
            data = await f.read(max_upload + 1)
            if len(data) > max_upload:
                early[i] = _failure(
                    name, 413, "file_too_large", f"{name}: larger than the {max_upload / 1e6:g} MB limit"
                )
                contents.append(None)
            else:
                contents.append(data)
        todo = [i for i, c in enumerate(contents) if c is not None]
        async with request.app.state.model_slots:
            preds = await run_in_threadpool(clf.predict, [contents[i] for i in todo], names=[names[i] for i in todo])
        results: list[dict] = [early.get(i, {}) for i in range(len(files))]
        for i, p in zip(todo, preds, strict=True):
            if p.ok:
                results[i] = _success(p)
                if heatmap and clf.explainable:
                    async with request.app.state.model_slots:
                        results[i]["heatmap"] = await run_in_threadpool(_heatmap, clf, contents[i], names[i])
            else:
                status, code = error_code(p.error or "")
                results[i] = _failure(p.source, status, code, p.error or "unusable image")
        failed = [r for r in results if not r["ok"]]
        body = {
            "results": results,
            "model": {"name": clf.card.get("model"), "backend": clf.backend, "threshold": clf.threshold},
        }
        if failed:
            first = failed[0]
            body["error"] = {
                "code": first["error"]["code"],
                "message": f"{len(failed)} of {len(results)} file(s) could not be classified; first: "
                f"{first['error']['message']}",
            }
            return JSONResponse(body, status_code=first["status"])
        return JSONResponse(body)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid"))


def _success(p: Prediction) -> dict[str, Any]:
    return {
        "filename": p.source,
        "ok": True,
        "label": p.label,
        "probability": p.probability,
        "threshold": p.threshold,
        "heatmap": None,
    }


def _failure(name: str, status: int, code: str, message: str) -> dict[str, Any]:
    return {"filename": name, "ok": False, "status": status, "error": {"code": code, "message": message}}


def _heatmap(clf: Classifier, data: bytes | None, name: str) -> str | None:
    from malaria_cells.explain import explain, overlay_png  # torch models only; keeps the ONNX service torch-free

    try:
        png = overlay_png(explain(clf, data or b"", name=name))
    except (ImageError, ModelError):
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def serve(
    *,
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_files: int = DEFAULT_MAX_FILES,
    threads: int | None = None,
    workers: int = DEFAULT_WORKERS,
) -> None:
    """Load the model and serve until interrupted.

    Args:
        model: an ``.onnx`` file or run folder (``None``: ``$MALARIA_CELLS_MODEL`` or the shipped default).
        host: interface to bind (127.0.0.1: this machine only).
        port: TCP port.
        max_upload_mb: largest accepted file in MB.
        max_files: most files per request.
        threads: intra-op threads of the model (default: cores // workers).
        workers: requests classified at once.
    """
    import uvicorn

    resolve_model(model)  # a missing model is a clear error here, not a traceback from the start-up hook
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    app = create_app(model=model, max_upload_mb=max_upload_mb, max_files=max_files, threads=threads, workers=workers)
    uvicorn.run(app, host=host, port=port, log_level="info")
