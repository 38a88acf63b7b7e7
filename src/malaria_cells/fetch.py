"""Download the NIH malaria cell-image archive resumably, verify it and unpack it safely.

Progress (bytes downloaded, files unpacked) goes to the current :mod:`malaria_cells.progress` reporter; this module
prints nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from malaria_cells import progress as _progress
from malaria_cells.errors import EXIT_DATA, MalariaCellsError

__all__ = ["NIH_BYTES", "NIH_SHA256", "NIH_URL", "FetchError", "fetch_archive", "sha256_file"]

NIH_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
NIH_BYTES = 353_452_851
NIH_SHA256 = "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668"

CLASS_DIRS = ("Parasitized", "Uninfected")
OFFLINE_HINT = "no internet? download the archive yourself and pass its folder with --data"

# Files that archivers on macOS/Windows add and that are never images.
_JUNK_DIRS = frozenset({"__macosx"})
_JUNK_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_TMP_PREFIX = ".unpack-"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_USER_AGENT = "malaria-cells-fetch/1 (+python urllib)"


class FetchError(MalariaCellsError, RuntimeError):
    """Raised when the archive cannot be downloaded, verified or unpacked (the data cannot be had: exit code 3)."""

    code = "fetch_failed"
    exit_code = EXIT_DATA


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Compute the SHA-256 of a file without loading it into memory.

    Args:
        path: File to hash.
        chunk_bytes: Read size per step.

    Returns:
        The lowercase hex digest.
    """
    hasher = hashlib.sha256()
    _hash_into(hasher, Path(path), chunk_bytes)
    return hasher.hexdigest()


def fetch_archive(
    *,
    to: Path,
    url: str = NIH_URL,
    sha256: str | None = NIH_SHA256,
    expected_bytes: int | None = NIH_BYTES,
    unpack: bool = True,
    timeout_s: float = 30.0,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download (resuming if possible), verify and optionally unpack the cell-image archive.

    Args:
        to: Folder that receives the archive and, with ``unpack``, the extracted tree.
        url: Where to download the zip from.
        sha256: Expected hex digest, or None to skip the checksum.
        expected_bytes: Expected archive size, or None to skip the size check.
        unpack: Extract the zip and return the image folder instead of the archive path.
        timeout_s: Socket timeout for connecting and for each read.
        chunk_bytes: Bytes read, written and flushed per step.
        progress: Report progress (download bytes, unpacked files) to the current progress reporter.

    Returns:
        With ``unpack``, the folder holding ``Parasitized/`` and ``Uninfected/``; otherwise the archive path.

    Raises:
        FetchError: On network failure, size or checksum mismatch, a corrupt or unsafe zip,
            or a zip without the two class folders.
    """
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    final = to / _basename(url)
    part = final.with_name(final.name + ".part")
    want_sha = sha256.lower() if sha256 else None

    if not (final.is_file() and _is_valid(final, want_sha, expected_bytes, chunk_bytes)):
        # A stale or corrupt final file must not shadow a fresh download.
        final.unlink(missing_ok=True)
        digest = _download(url, part, expected_bytes, timeout_s, chunk_bytes, progress)
        _verify(part, digest, want_sha, expected_bytes)
        os.replace(part, final)

    if not unpack:
        return final
    return _unpack(final, to, chunk_bytes, progress)


def _basename(url: str) -> str:
    """Return the file name a URL points at (``download.zip`` when the path has none)."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name or "download.zip"


def _hash_into(hasher: hashlib._Hash, path: Path, chunk_bytes: int) -> None:
    """Feed a file's bytes into ``hasher`` chunk by chunk."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            hasher.update(chunk)


def _is_valid(path: Path, sha256: str | None, expected_bytes: int | None, chunk_bytes: int) -> bool:
    """Check an existing archive against the expected size (cheap, first) and checksum."""
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        return False
    return sha256 is None or sha256_file(path, chunk_bytes) == sha256


def _verify(part: Path, digest: str, sha256: str | None, expected_bytes: int | None) -> None:
    """Delete the partial file and raise if its size or checksum is wrong."""
    size = part.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        part.unlink(missing_ok=True)
        raise FetchError(f"size mismatch for {part.name}: expected {expected_bytes} bytes, got {size}")
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {part.name}: expected {sha256}, got {digest}; the download was deleted")


def _network_error(url: str, exc: BaseException) -> FetchError:
    """Wrap a low-level network failure with the URL and the offline hint."""
    if isinstance(exc, urllib.error.HTTPError):
        reason = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        reason = str(exc.reason)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return FetchError(f"could not download {url}: {reason} ({OFFLINE_HINT})")


def _open(url: str, offset: int, timeout_s: float) -> http.client.HTTPResponse | None:
    """Send the GET (with a Range header when resuming); None means the server answered 416."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            return None
        raise _network_error(url, exc) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(url, exc) from exc


def _server_total(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """Return (start offset the body begins at, full file size if the server said) for a response."""
    if response.status == 206:
        match = _CONTENT_RANGE.search(response.headers.get("Content-Range", ""))
        if match is None:
            return -1, None  # unusable partial answer: caller restarts from zero
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _download(
    url: str, part: Path, expected_bytes: int | None, timeout_s: float, chunk_bytes: int, progress: bool
) -> str:
    """Stream ``url`` into ``part``, resuming from its current size, and return the sha256 of the whole file."""
    offset = part.stat().st_size if part.is_file() else 0
    if expected_bytes is not None and offset > expected_bytes:
        # Longer than the real file: it cannot be a prefix of it, so resuming would only waste bandwidth.
        part.unlink()
        offset = 0
    if expected_bytes is not None and offset == expected_bytes:
        # Fully downloaded by an earlier run that stopped before the rename: just verify it, no network needed.
        return sha256_file(part, chunk_bytes)

    response = _open(url, offset, timeout_s)
    if response is None:
        # 416: the part already covers the whole file (or is junk); the size/checksum check decides which.
        return sha256_file(part, chunk_bytes)

    with response:
        start, total = _server_total(response, offset)
        if start != offset:
            # 200 (server ignored Range) or a 206 for another range: the body starts elsewhere, so start over.
            if start != 0:
                response.close()
                part.unlink(missing_ok=True)
                return _download(url, part, expected_bytes, timeout_s, chunk_bytes, progress)
            offset = 0
        if total is not None and expected_bytes is not None and total != expected_bytes:
            # Fail before transferring hundreds of MB that can never verify.
            part.unlink(missing_ok=True)
            raise FetchError(f"size mismatch for {url}: expected {expected_bytes} bytes, server reports {total}")
        total = total if total is not None else expected_bytes

        hasher = hashlib.sha256()
        if offset:
            _hash_into(hasher, part, chunk_bytes)
        mode = "ab" if offset else "wb"
        with part.open(mode) as out, _task(progress, f"download {_basename(url)}", total, offset) as task:
            size = offset
            while chunk := _read(response, url, chunk_bytes):
                out.write(chunk)
                # Flush every chunk so whatever is on disk is a valid prefix if the process is killed.
                out.flush()
                hasher.update(chunk)
                size += len(chunk)
                task.update(completed=size)
            os.fsync(out.fileno())

    if total is not None and size < total:
        raise FetchError(
            f"download of {url} interrupted at {size} of {total} bytes; the partial file {part} is kept, "
            f"run again to resume ({OFFLINE_HINT})"
        )
    return hasher.hexdigest()


def _read(response: http.client.HTTPResponse, url: str, chunk_bytes: int) -> bytes:
    """Read one chunk, turning socket failures into FetchError (the part file stays as written)."""
    try:
        return response.read(chunk_bytes)
    except (http.client.HTTPException, OSError) as exc:
        raise _network_error(url, exc) from exc


def _task(progress: bool, description: str, total: int | None, completed: int = 0) -> _progress.Task:
    """A progress task on the current reporter, or one that reports nowhere when ``progress`` is off."""
    if progress:
        return _progress.task(description, total=total, completed=completed)
    return _progress.Task(_progress.Reporter(), None)


def _member_parts(name: str) -> tuple[str, ...]:
    """Split a zip member name into safe path parts, raising FetchError for zip-slip attempts."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise FetchError(f"unsafe zip member {name!r}: absolute path")
    parts = tuple(p for p in posix.split("/") if p not in ("", "."))
    if ".." in parts:
        raise FetchError(f"unsafe zip member {name!r}: '..' escapes the target folder")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """Tell whether a member is archiver metadata (``__MACOSX``, AppleDouble, Thumbs.db) rather than data."""
    if any(p.lower() in _JUNK_DIRS for p in parts):
        return True
    return parts[-1].lower() in _JUNK_FILES or parts[-1].startswith("._")


def _unpack(archive: Path, to: Path, chunk_bytes: int, progress: bool) -> Path:
    """Extract ``archive`` into ``to`` via a temp dir and return the folder holding the class folders."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{archive} is not a readable zip archive: {exc}") from exc

    with zf:
        # Validate every name before writing anything so a malicious archive leaves no files behind.
        members = [(info, parts) for info in zf.infolist() if (parts := _member_parts(info.filename))]
        members = [(info, parts) for info, parts in members if not _is_junk(parts)]
        tops = sorted({parts[0] for _, parts in members})
        reserved = {archive.name, f"{archive.name}.part", f".{archive.name}.unpacked"}
        if clash := [t for t in tops if t in reserved or t.startswith(_TMP_PREFIX)]:
            raise FetchError(f"unsafe zip member {clash[0]!r}: would overwrite the download's own files")
        stat = archive.stat()
        stamp = f"{archive.name} {stat.st_size} {stat.st_mtime_ns}\n"
        marker = to / f".{archive.name}.unpacked"
        if marker.is_file() and marker.read_text() == stamp and all((to / t).exists() for t in tops):
            return _find_root(to, tops)

        # Remove the marker first: a run killed from here on must redo the extraction.
        marker.unlink(missing_ok=True)
        for stale in to.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=to))
        try:
            _extract(zf, members, tmp, chunk_bytes, progress, archive.name)
            for top in tops:
                dest = to / top
                if dest.exists() or dest.is_symlink():
                    # Move the old tree aside (same filesystem, atomic) so it is deleted along with tmp.
                    os.replace(dest, tmp / f"{_TMP_PREFIX}old-{top}")
                os.replace(tmp / top, dest)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FetchError(f"failed to unpack {archive}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(stamp)
    return _find_root(to, tops)


def _extract(
    zf: zipfile.ZipFile,
    members: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    dest: Path,
    chunk_bytes: int,
    progress: bool,
    label: str,
) -> None:
    """Write already-validated members under ``dest`` (CRC is checked by zipfile as each member is read)."""
    with _task(progress, f"unpack {label}", len(members)) as task:
        for info, parts in members:
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, chunk_bytes)
            task.advance()


def _has_classes(folder: Path) -> bool:
    """Tell whether ``folder`` directly contains both class folders (names compared case-insensitively)."""
    names = {child.name.lower() for child in folder.iterdir() if child.is_dir()}
    return all(c.lower() in names for c in CLASS_DIRS)


def _find_root(to: Path, tops: list[str]) -> Path:
    """Breadth-first search the extracted tree for the shallowest folder holding both class folders."""
    queue = [to] + [to / t for t in tops if (to / t).is_dir()]
    seen: set[Path] = set()
    while queue:
        folder = queue.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        if _has_classes(folder):
            return folder
        if folder != to:
            queue.extend(sorted(c for c in folder.iterdir() if c.is_dir()))
    expected = " and ".join(f"{c}/" for c in CLASS_DIRS)
    raise FetchError(f"no folder containing {expected} found in the archive unpacked into {to}")
