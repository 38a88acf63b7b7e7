"""Tests for malaria_cells.fetch against a real loopback HTTP server (no internet needed)."""

from __future__ import annotations

import hashlib
import http.server
import io
import random
import socket
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from malaria_cells import progress
from malaria_cells.errors import EXIT_DATA, MalariaCellsError
from malaria_cells.fetch import OFFLINE_HINT, FetchError, fetch_archive, sha256_file

ARCHIVE = "cell_images.zip"


def _png(seed: int, side: int = 24) -> bytes:
    """Build a tiny valid RGB PNG with noisy pixels (noise keeps the zip from compressing to nothing)."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _zip(members: dict[str, bytes]) -> bytes:
    """Zip ``members`` in memory; ZipInfo keeps names verbatim (ZipFile.write would strip unsafe prefixes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def _cell_zip() -> bytes:
    """Mimic the NIH layout (cell_images/<class>/...png) plus the macOS/Windows junk real archives carry."""
    members = {}
    for i in range(1, 5):
        members[f"cell_images/Parasitized/C{i}P1ThinF_IMG_{i}_cell_{i}.png"] = _png(i)
        members[f"cell_images/Uninfected/C{i}NThinF_IMG_{i}_cell_{i}.png"] = _png(100 + i)
    members["cell_images/Parasitized/Thumbs.db"] = b"junk"
    members["__MACOSX/cell_images/._Parasitized"] = b"junk"
    return _zip(members)


@dataclass
class Server:
    """A loopback file server that records requests; ``mode`` is 'range', 'ignore_range' or 'drop_first'."""

    payload: bytes
    mode: str = "range"
    requests: list[dict[str, str]] = field(default_factory=list)
    bytes_sent: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/files/{ARCHIVE}"


def _handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # name fixed by BaseHTTPRequestHandler
            server.requests.append(dict(self.headers.items()))
            if self.path != f"/files/{ARCHIVE}":
                self.send_error(404)
                return
            data, size = server.payload, len(server.payload)
            start = 0
            range_header = self.headers.get("Range")
            if range_header and server.mode != "ignore_range":
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.mode == "drop_first" and len(server.requests) == 1:
                # Announce the full length, send half, then hang up: what a killed transfer looks like.
                half = body[: len(body) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                server.bytes_sent += len(half)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)
            server.bytes_sent += len(body)

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib from routing loopback requests through a proxy configured in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def serve() -> Iterator:
    """Start servers on demand (127.0.0.1, port 0) and shut them all down afterwards."""
    started: list[http.server.ThreadingHTTPServer] = []

    def start(payload: bytes, mode: str = "range") -> Server:
        server = Server(payload, mode)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
        httpd.daemon_threads = True
        server.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(httpd)
        return server

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def _fetch(server: Server, to: Path, payload: bytes, **kwargs: object) -> Path:
    """Call fetch_archive with the payload's real size/checksum unless overridden; small chunks, no bars."""
    args: dict[str, object] = {
        "to": to,
        "url": server.url,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "expected_bytes": len(payload),
        "chunk_bytes": 1024,
        "progress": False,
        "timeout_s": 5.0,
    }
    args.update(kwargs)
    return fetch_archive(**args)


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_full_download_verifies_and_unpacks(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload)
    root = _fetch(server, tmp_path, payload, progress=True)

    assert root == tmp_path / "cell_images"
    assert len(list((root / "Parasitized").glob("*.png"))) == 4
    assert len(list((root / "Uninfected").glob("*.png"))) == 4
    # Junk from archivers is skipped; temp dirs and the .part file are gone.
    assert not (tmp_path / "__MACOSX").exists()
    assert not (root / "Parasitized" / "Thumbs.db").exists()
    assert not list(tmp_path.glob(".unpack-*"))
    assert not (tmp_path / f"{ARCHIVE}.part").exists()
    assert sha256_file(tmp_path / ARCHIVE) == hashlib.sha256(payload).hexdigest()
    assert len(server.requests) == 1 and "Range" not in server.requests[0]


def test_unpack_false_returns_archive_path(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    archive = _fetch(serve(payload), tmp_path, payload, unpack=False)
    assert archive == tmp_path / ARCHIVE
    assert archive.read_bytes() == payload
    assert not (tmp_path / "cell_images").exists()


def test_resume_after_dropped_connection(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload, mode="drop_first")

    with pytest.raises(FetchError, match="run again to resume"):
        _fetch(server, tmp_path, payload)
    part = tmp_path / f"{ARCHIVE}.part"
    partial = part.stat().st_size
    assert 0 < partial < len(payload)
    assert part.read_bytes() == payload[:partial]  # what was written is a valid prefix
    assert not (tmp_path / ARCHIVE).exists()

    root = _fetch(server, tmp_path, payload)
    assert root == tmp_path / "cell_images"
    assert (tmp_path / ARCHIVE).read_bytes() == payload
    assert server.requests[1]["Range"] == f"bytes={partial}-"
    assert server.bytes_sent < 2 * len(payload)


def test_server_ignoring_range_restarts_from_zero(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload, mode="ignore_range")
    # A garbage part: if the 200 body were appended to it the checksum would fail.
    (tmp_path / f"{ARCHIVE}.part").write_bytes(b"x" * 500)

    root = _fetch(server, tmp_path, payload)
    assert root == tmp_path / "cell_images"
    assert (tmp_path / ARCHIVE).read_bytes() == payload
    assert server.requests[0]["Range"] == "bytes=500-"


def test_complete_part_is_verified_without_network(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload)
    (tmp_path / f"{ARCHIVE}.part").write_bytes(payload)
    _fetch(server, tmp_path, payload, unpack=False)
    assert server.requests == []
    assert (tmp_path / ARCHIVE).read_bytes() == payload


def test_checksum_mismatch_raises_and_leaves_nothing(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    with pytest.raises(FetchError, match=r"sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}"):
        _fetch(serve(payload), tmp_path, payload, sha256="0" * 64)
    assert not (tmp_path / ARCHIVE).exists()
    assert not (tmp_path / f"{ARCHIVE}.part").exists()


def test_wrong_expected_size_raises(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    with pytest.raises(FetchError, match=f"expected {len(payload) + 1} bytes.*{len(payload)}"):
        _fetch(serve(payload), tmp_path, payload, expected_bytes=len(payload) + 1)
    assert not (tmp_path / ARCHIVE).exists()
    assert not (tmp_path / f"{ARCHIVE}.part").exists()


@pytest.mark.parametrize("evil", ["../evil.png", "cell_images/../../evil.png", "/tmp/evil.png", "C:/evil.png"])
def test_zip_slip_member_rejected(serve, tmp_path: Path, evil: str) -> None:
    payload = _zip({"cell_images/Parasitized/a.png": _png(1), "cell_images/Uninfected/b.png": _png(2), evil: b"x"})
    to = tmp_path / "data"
    with pytest.raises(FetchError, match="unsafe zip member"):
        _fetch(serve(payload), to, payload)
    assert not (tmp_path / "evil.png").exists()
    # Validation happens before any write, so no partial tree or temp dir is left behind.
    assert sorted(p.name for p in to.iterdir()) == [ARCHIVE]


def test_existing_good_archive_not_downloaded_again(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload)
    (tmp_path / ARCHIVE).write_bytes(payload)

    root = _fetch(server, tmp_path, payload)
    assert root == tmp_path / "cell_images"
    assert server.requests == []


def test_existing_bad_archive_is_replaced(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload)
    (tmp_path / ARCHIVE).write_bytes(b"not the archive")
    _fetch(server, tmp_path, payload, unpack=False)
    assert (tmp_path / ARCHIVE).read_bytes() == payload
    assert len(server.requests) == 1


def test_unpack_is_idempotent_and_replaces_half_trees(serve, tmp_path: Path) -> None:
    payload = _cell_zip()
    server = serve(payload)
    root = _fetch(server, tmp_path, payload)
    expected = _tree(root)

    # Same archive again: nothing downloaded, tree unchanged.
    assert _fetch(server, tmp_path, payload) == root
    assert _tree(root) == expected and len(server.requests) == 1

    # Simulate a killed earlier unpack: stray temp dir and a damaged tree with no completion marker.
    (tmp_path / f".{ARCHIVE}.unpacked").unlink()
    (tmp_path / ".unpack-stale" / "cell_images").mkdir(parents=True)
    next((root / "Uninfected").iterdir()).unlink()
    (root / "Parasitized" / "half.png").write_bytes(b"partial")
    assert _fetch(server, tmp_path, payload) == root
    assert _tree(root) == expected
    assert not list(tmp_path.glob(".unpack-*"))


def test_class_folders_matched_case_insensitively(serve, tmp_path: Path) -> None:
    payload = _zip({"data/parasitized/a.png": _png(1), "data/UNINFECTED/b.png": _png(2)})
    assert _fetch(serve(payload), tmp_path, payload, sha256=None, expected_bytes=None) == tmp_path / "data"


def test_archive_without_class_folders_raises(serve, tmp_path: Path) -> None:
    payload = _zip({"stuff/a.png": _png(1)})
    with pytest.raises(FetchError, match="Parasitized/ and Uninfected/"):
        _fetch(serve(payload), tmp_path, payload)


def test_http_error_raises_with_url(serve, tmp_path: Path) -> None:
    server = serve(b"")
    url = f"http://127.0.0.1:{server.port}/missing.zip"
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch_archive(to=tmp_path, url=url, progress=False)
    assert url in str(info.value)


def test_unreachable_url_raises_with_hint(tmp_path: Path) -> None:
    with socket.socket() as sock:  # grab a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{ARCHIVE}"
    with pytest.raises(FetchError) as info:
        fetch_archive(to=tmp_path, url=url, progress=False, timeout_s=2.0)
    assert url in str(info.value)
    assert OFFLINE_HINT in str(info.value)
    assert "--data" in str(info.value)
    assert not (tmp_path / ARCHIVE).exists()


class _Recorder(progress.Reporter):
    """Keeps every task's description, total and final count."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []

    def start(self, description: str, *, total: float | None, completed: float = 0, transient: bool = False) -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed, "closed": False})
        return len(self.tasks) - 1

    def advance(self, handle: int, n: float) -> None:
        self.tasks[handle]["completed"] += n

    def update(self, handle: int, *, completed=None, total=None, status=None) -> None:
        if completed is not None:
            self.tasks[handle]["completed"] = completed

    def close(self, handle: int) -> None:
        self.tasks[handle]["closed"] = True


@pytest.mark.parametrize("show", [True, False])
def test_progress_goes_to_the_reporter_and_nothing_is_printed(serve, tmp_path: Path, capsys, show: bool) -> None:
    payload = _cell_zip()
    server = serve(payload)
    recorder = _Recorder()
    with progress.reporting(recorder):
        _fetch(server, tmp_path, payload, progress=show)
    out, err = capsys.readouterr()
    assert out == err == ""
    if not show:
        assert recorder.tasks == []
        return
    download, unpack = recorder.tasks
    assert download["description"] == f"download {ARCHIVE}"
    assert download["total"] == download["completed"] == len(payload) and download["closed"]
    with zipfile.ZipFile(tmp_path / ARCHIVE) as zf:
        members = [i for i in zf.infolist() if "__MACOSX" not in i.filename and "Thumbs" not in i.filename]
    assert unpack["description"] == f"unpack {ARCHIVE}"
    assert unpack["total"] == unpack["completed"] == len(members) and unpack["closed"]


def test_fetch_error_is_a_data_error_with_a_code() -> None:
    assert issubclass(FetchError, MalariaCellsError)
    e = FetchError("x")
    assert e.code == "fetch_failed" and e.exit_code == EXIT_DATA
