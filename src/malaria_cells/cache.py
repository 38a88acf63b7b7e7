"""Decoded-image cache: every image letterboxed to the model's input size, stored once as a uint8 memmap.

The first epoch of the first run decodes the images; every later epoch and run memory-maps the array and
decodes nothing. The cache is keyed by the data root, the file list (relative paths and byte sizes) and the
size, so a changed folder or another input size gets its own cache. Files are written to a temporary name
and renamed when complete, so a killed build leaves no cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_cells.data import CellImage
from malaria_cells.io import atomic_write_json
from malaria_cells.preprocess import ImageError, letterbox, load_image
from malaria_cells.progress import parallel_map

CACHE_ENV = "MALARIA_CELLS_CACHE"
VERSION = 1  # bump when the letterbox or decoding changes
SHOWN_ERRORS = 20  # unreadable images logged one by one; the rest are counted (all are in the cache's .json)

log = logging.getLogger(__name__)


@dataclass
class ImageCache:
    """A memory-mapped (N, size, size, 3) uint8 array aligned with a list of images."""

    array: np.ndarray  # memmap, read-only
    ok: np.ndarray  # bool (N,): False where the image could not be decoded
    errors: dict[int, str]  # index -> reason
    path: Path
    built: bool  # True when this call decoded the images (False: loaded from disk)


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where caches live: the argument, else ``$MALARIA_CELLS_CACHE``, else ``~/.cache/malaria-cells``."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "malaria-cells"


def cache_key(images: list[CellImage], size: int, root: str) -> str:
    """Identify a cache by data root, file list, byte sizes and input size.

    Args:
        images: the images, in cache order.
        size: input side in px.
        root: the data root the images were scanned from.

    Returns:
        A hex digest.
    """
    h = hashlib.sha256(f"v{VERSION}|{size}|{os.path.abspath(root)}|{len(images)}\n".encode())
    for im in images:
        h.update(f"{im.rel}\t{im.size_bytes}\n".encode())
    return h.hexdigest()[:24]


def _decode_chunk(job: tuple[list[str], int]) -> tuple[np.ndarray, dict[int, str]]:
    paths, size = job
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            out[i] = letterbox(load_image(p), size)
        except ImageError as e:
            errors[i] = str(e)
    return out, errors


def build_or_load(
    *, images: list[CellImage], size: int, root: str, cache_dir: str | Path | None = None, n_workers: int | None = None
) -> ImageCache:
    """Return the cache for these images at this size, building it (in parallel, with progress) if needed.

    Unreadable images are logged (warnings of this module's logger) with their path and reason and left black with
    ``ok=False``; callers drop them.

    Args:
        images: the images, in the order the array will have.
        size: input side in px.
        root: the data root (part of the key).
        cache_dir: see :func:`default_cache_dir`.
        n_workers: decoding processes (default: the cores this process may use).

    Returns:
        The cache.
    """
    directory = default_cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = cache_key(images, size, root)
    data_path = directory / f"{key}_{size}px.u8"
    meta_path = directory / f"{key}_{size}px.json"
    n = len(images)
    if data_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("n") == n and meta.get("size") == size and data_path.stat().st_size == n * size * size * 3:
            return _open(data_path, meta, n, size, built=False)
    tmp = data_path.with_suffix(f".tmp{os.getpid()}")
    if n == 0:
        raise ValueError("no images to cache")
    arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, size, size, 3))
    errors: dict[int, str] = {}
    paths = [im.path for im in images]
    jobs = [(paths[a : a + 256], size) for a in range(0, n, 256)]
    for j, (block, errs) in parallel_map(
        _decode_batch, jobs, description=f"decoding {n:,} images to {size}px", chunk_size=1, n_workers=n_workers
    ):
        start = j * 256
        arr[start : start + len(block)] = block
        errors.update({start + i: e for i, e in errs.items()})
    arr.flush()
    del arr
    os.replace(tmp, data_path)
    meta = {"n": n, "size": size, "version": VERSION, "errors": {str(k): v for k, v in sorted(errors.items())}}
    atomic_write_json(meta_path, meta)
    for _, reason in sorted(errors.items())[:SHOWN_ERRORS]:
        log.warning("skipped %s", reason)
    if len(errors) > SHOWN_ERRORS:
        log.warning("... and %d more unreadable images (see %s)", len(errors) - SHOWN_ERRORS, meta_path)
    return _open(data_path, meta, n, size, built=True)


def _decode_batch(jobs: list[tuple[list[str], int]]) -> tuple[np.ndarray, dict[int, str]]:
    # parallel_map hands out lists of jobs; here each list holds exactly one (chunk_size=1).
    (job,) = jobs
    return _decode_chunk(job)


def _open(path: Path, meta: dict, n: int, size: int, *, built: bool) -> ImageCache:
    errors = {int(k): v for k, v in meta.get("errors", {}).items()}
    arr = (
        np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        if n
        else np.zeros((0, size, size, 3), np.uint8)
    )
    ok = np.ones(n, dtype=bool)
    ok[list(errors)] = False
    return ImageCache(array=arr, ok=ok, errors=errors, path=path, built=built)
