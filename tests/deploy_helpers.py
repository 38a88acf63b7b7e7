"""Shared test data for the deployment tests: a tiny synthetic cell data set, a run trained on it in seconds,
and its ONNX export. Built once per test session (module-level cache) and shared by every test module."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

_CACHE: dict[str, Path] = {}
# The IML-Malaria field photos: a read-only share; its README says never to copy them (or crops) into the repo.
IML_FIELDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "iml-malaria" / "fields"


def field_photo(name: str = "PA171710.JPG") -> Path:
    """A real thin-smear field photo (1280 x 960 JPEG, ~110 counted red cells) from the IML-Malaria share.

    Args:
        name: the photo's file name.

    Returns:
        Its path. A missing share is a loud failure, not a skip (CI must have it), like the NIH share in conftest.
    """
    import pytest

    path = IML_FIELDS / name
    if not path.is_file():
        pytest.fail(f"the IML-Malaria field photos are missing at {IML_FIELDS.resolve()}")
    return path


def synthetic_cell(rng: np.random.Generator, *, infected: bool) -> Image.Image:
    """A pink disc on black, 40-70 px, with one or two dark purple dots when infected."""
    w, h = (int(v) for v in rng.integers(40, 70, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = h / 2, w / 2, min(w, h) * rng.uniform(0.38, 0.47)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img = np.zeros((h, w, 3))
    img[disc] = rng.uniform([200, 120, 130], [235, 150, 160]) + rng.normal(0, 6, (int(disc.sum()), 3))
    if infected:
        for _ in range(int(rng.integers(1, 3))):
            dy, dx = rng.uniform(-0.5, 0.5, 2) * r
            dot = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 < (rng.uniform(0.15, 0.25) * r) ** 2
            img[dot & disc] = rng.uniform([70, 20, 100], [100, 50, 140])
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_dataset(root: Path, *, seed: int = 0) -> Path:
    """Write Parasitized/ and Uninfected/ PNGs for 12 patients (8 infected) with NIH-style file names."""
    rng = np.random.default_rng(seed)
    for cls in ("Parasitized", "Uninfected"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    for p in range(1, 13):
        infected = p <= 8
        for i in range(8):
            name = f"C{p}P{p}ThinF_IMG_20150101_000000_cell_{i}.png"
            synthetic_cell(rng, infected=False).save(root / "Uninfected" / name)
            if infected:
                synthetic_cell(rng, infected=True).save(root / "Parasitized" / name)
    return root


def tiny_run(base: Path) -> tuple[Path, Path, Path]:
    """A custom-CNN run trained for 2 epochs on the synthetic data; (run folder, data folder, cache folder)."""
    if "run" not in _CACHE:
        from malaria_cells.config import resolve_config
        from malaria_cells.train import train

        base.mkdir(parents=True, exist_ok=True)
        data = make_dataset(base / "data")
        cache = base / "cache"
        cfg = resolve_config(
            overrides=dict(
                model="custom-cnn",
                input_size=64,
                epochs=2,
                batch_size=8,
                patience=2,
                precision="fp32",
                threads=2,
                cache_dir=str(cache),
                seed=0,
            )
        )
        _CACHE["run"] = train(config=cfg, data_dir=data, run_dir=base / "run")
        _CACHE["data"], _CACHE["cache"] = data, cache
    return _CACHE["run"], _CACHE["data"], _CACHE["cache"]


def tiny_onnx(base: Path) -> Path:
    """The tiny run exported to fp32 ONNX."""
    if "onnx" not in _CACHE:
        from malaria_cells.export import export_run

        run, data, cache = tiny_run(base)
        export_run(run_dir=run, out=base / "tiny.onnx", data_dir=data, cache_dir=str(cache))
        _CACHE["onnx"] = base / "tiny.onnx"
    return _CACHE["onnx"]


def png_bytes(img: Image.Image) -> bytes:
    """Encode as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but holds almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_and_odd_images(cell: Image.Image) -> dict[str, bytes]:
    """Upload bodies for the bad-input cases and the unusual-but-usable ones."""
    gray = cell.convert("L")
    return {
        "empty": b"",
        "text": b"this is a text file, not an image\n",
        "truncated": png_bytes(cell)[: len(png_bytes(cell)) // 2],
        "one_pixel": png_bytes(Image.new("RGB", (1, 1), (200, 120, 130))),
        "bomb": png_header_only(20000, 20000),
        "gray": png_bytes(gray),
        "rgba": png_bytes(cell.convert("RGBA")),
        "gray16": png_bytes(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)),
    }


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (this venv), from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[1],
    )


@contextmanager
def live_server(app, *, timeout_s: float = 120) -> Iterator[str]:
    """Serve ``app`` (from ``serve.create_app``) with uvicorn, as ``malaria-cells serve`` does (same timeouts and
    header limit), in a background thread on a free 127.0.0.1 port; yield its base URL. Stopped on exit."""
    import uvicorn

    from malaria_cells.serve import bind_socket, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)  # bound here, so the port cannot be taken between choosing and binding
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {port} did not start within {timeout_s:g} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
