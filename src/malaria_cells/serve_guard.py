"""The web service's guards: ASGI middleware (security headers, host check, body size and time, admission)
and the exception handlers that turn every failure into ``{"error": {"code", "message"}}``.

They know the service only through small interfaces (a state with ``try_admit``/``release``, the limits), so
:mod:`malaria_cells.serve` imports them and never the reverse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from malaria_cells.errors import MalariaCellsError

if TYPE_CHECKING:  # the smear modules load scipy: imported when the service starts, not with this module
    pass


API = "/api/v1"
PREDICT_PATH = f"{API}/predict"
SMEAR_PATH = f"{API}/smear"
RETRY_AFTER_S = 2  # what a 503 tells the client to wait, in seconds
# Pages may load only what this server serves; data: and blob: for the heatmaps and the local previews.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
log = logging.getLogger("malaria_cells.serve")


# --------------------------------------------------------------------------------------------- ASGI middleware


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, **extra}, status_code=status, headers=headers)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


class SecurityHeaders:
    """ASGI middleware: the page's Content-Security-Policy and no-sniff/no-referrer headers on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.extra = [
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                present = {k.lower() for k, _ in msg.get("headers", ())}
                msg["headers"] = [*msg.get("headers", ()), *(h for h in self.extra if h[0] not in present)]
            await send(msg)

        await self.app(scope, receive, send_with_headers)


def host_allowed(host_header: str, allowed: Sequence[str]) -> bool:
    """Whether a Host header names one of the served hosts (port ignored; ``*`` and ``*.domain`` patterns).

    Args:
        host_header: the Host header, e.g. ``127.0.0.1:8000`` or ``[::1]:8000``.
        allowed: served names, lower case.

    Returns:
        True when served.
    """
    h = host_header.strip().lower()
    if h.startswith("["):  # IPv6 literal, maybe with a port
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    h = h.rstrip(".")
    for pattern in allowed:
        if pattern == "*" or h == pattern or (pattern.startswith("*.") and h.endswith(pattern[1:])):
            return True
    return False


class HostCheck:
    """ASGI middleware: answer 400 ``invalid_host`` unless the Host header names a served host.

    A web page on another site can make the browser send requests to 127.0.0.1 under the attacker's host name
    (DNS rebinding); checking the name keeps such pages out.
    """

    def __init__(self, app: ASGIApp, *, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no WebSocket routes: the router refuses those
            await self.app(scope, receive, send)
            return
        host = (_header(scope, b"host") or b"").decode("latin-1")
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        name = host or "(none)"
        message = (
            f"Host header {name!r} is not served here (protection against DNS rebinding); serves "
            f"{', '.join(self.allowed)}. Start the server with --allowed-host NAME to serve another name"
        )
        await _error(400, "invalid_host", message, headers={"Connection": "close"})(scope, receive, send)


class ServiceHTTPError(HTTPException):
    """An HTTP error with our machine code. An HTTPException, so FastAPI's body parsing passes it on when the
    request's ``receive`` raises it (it turns other errors into a 400)."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


class BodyGuard:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (413) or slower than ``timeout_s`` (408).

    Checks Content-Length up front and counts streamed bytes too (a chunked upload has no length). The time runs
    from the moment the headers are in until the last body byte.

    Args:
        app: the wrapped application.
        max_bytes: largest body.
        timeout_s: most seconds to receive a body.
        path_limits: a lower limit for some paths, with the advice its 413 message gives (one photo per request).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        path_limits: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, advice = self.path_limits.get(
            scope["path"], (self.max_bytes, "max files x max upload size; send fewer or smaller files")
        )
        too_large = f"request body larger than {max_bytes / 1e6:.1f} MB ({advice})"
        length = _content_length(scope)
        if length is not None and length > max_bytes:
            await _error(413, "request_too_large", too_large, headers={"Connection": "close"})(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        seen = 0
        body_done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body only http.disconnect can come: no deadline on that wait
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise ServiceHTTPError(
                    408,
                    "request_timeout",
                    f"the request body was not received within {self.timeout_s:g} s; send it faster or in smaller "
                    "requests",
                    headers={"Connection": "close"},  # the rest of the body is not wanted
                ) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_bytes:
                    raise ServiceHTTPError(413, "request_too_large", too_large, headers={"Connection": "close"})
                body_done = not msg.get("more_body", False)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except ServiceHTTPError as e:  # raised where no exception handler caught it
            if not started:
                await _error(e.status_code, e.code, str(e.detail), headers=e.headers)(scope, receive, send)


class Admission:
    """ASGI middleware: admit predictions and field photos while the count and upload-byte budgets allow, else 503
    + Retry-After.

    Runs before the body is read, so a refused upload costs nothing. A request without Content-Length is counted
    at the largest request size of its route.
    """

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self.state = state
        cfg = state.config
        self.largest = {PREDICT_PATH: cfg.max_request_bytes, SMEAR_PATH: cfg.max_photo_request_bytes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        largest = self.largest.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if largest is None:
            await self.app(scope, receive, send)
            return
        cfg = self.state.config
        length = _content_length(scope)
        nbytes = largest if length is None else min(length, largest)
        if not self.state.try_admit(nbytes):
            message = (
                f"server busy: {self.state.requests_in_flight} request(s), "
                f"{self.state.bytes_in_flight / 1e6:.1f} MB of uploads in progress (limits {cfg.max_requests} and "
                f"{cfg.max_inflight_bytes / 1e6:.1f} MB); retry in {RETRY_AFTER_S} s"
            )
            headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
            await _error(503, "server_busy", message, headers=headers)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.release(nbytes)


# --------------------------------------------------------------------------------------------- exception handlers


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if request.url.path == SMEAR_PATH:
        errors = [e for e in exc.errors() if tuple(e.get("loc") or ())[:2] == ("body", "file")]
        if any(e.get("type") == "missing" for e in errors):
            return _error(
                400, "no_files", "no photo in the request: send multipart/form-data with one part named 'file'"
            )
        if errors:
            return _error(
                400,
                "not_a_file",
                "the part named 'file' is a plain form field, not a file (its Content-Disposition has no filename); "
                'send the photo as a file part: Content-Disposition: form-data; name="file"; filename="field.jpg"',
            )
    locs = [tuple(e.get("loc") or ()) for e in exc.errors()]
    if any(loc[-1:] == ("files",) for loc in locs):
        return _error(
            400,
            "no_files",
            "no image files in the request: send multipart/form-data with one or more parts named 'files'",
        )
    plain = [loc[2] for loc in locs if len(loc) == 3 and loc[:2] == ("body", "files") and isinstance(loc[2], int)]
    if plain:
        return _error(
            400,
            "not_a_file",
            f"part {plain[0] + 1} named 'files' is a plain form field, not a file (its Content-Disposition has no "
            'filename); send each image as a file part: Content-Disposition: form-data; name="files"; '
            'filename="cell.png"',
        )
    return _error(422, "invalid_request", "; ".join(_describe(e) for e in exc.errors()) or "invalid request")


HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    503: "server_busy",
}


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "error")
    message = str(exc.detail)
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow:
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allow}"
    return _error(exc.status_code, code, message, headers=exc.headers)  # 405 keeps its Allow header


async def _on_package_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MalariaCellsError)
    return _error(exc.status, exc.code, exc.message)


async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return _error(500, "internal_error", f"unexpected server error ({type(exc).__name__}); see the server log")


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid"))
