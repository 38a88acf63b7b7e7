"""Small file helpers: atomic writes (a killed process never leaves a half-written file behind), JSON lines, and
reading a file or a member of a zip archive addressed as ``ARCHIVE.zip::MEMBER``.

The bottom of the package: imports nothing of it, so every layer (decoding, data, runs) can read files through it.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

ZIP_SEP = "::"  # separates an archive from a member in an image path: ``cell_images.zip::Parasitized/C1_....png``


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: the final file.
        write: writes the content to the temporary path it is given.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600 (and a writer that recreates the file may too): give it the permissions open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text atomically.

    Args:
        path: the final file.
        text: its content (UTF-8).

    Returns:
        ``path``.
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically (indented, NaN written as null).

    Args:
        path: the final file.
        obj: a JSON-serialisable object; float NaN/inf become null.

    Returns:
        ``path``.
    """
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def _clean(obj: Any) -> Any:
    # JSON has no NaN; null is what other tools read back without surprises.
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj


def jsonl_text(rows: list[dict]) -> str:
    """Render records as JSON lines (NaN written as null), the format of ``metrics.jsonl``.

    Args:
        rows: the records.

    Returns:
        One JSON object per line, each line ending in a newline.
    """
    return "".join(json.dumps(_clean(r)) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    """Read a ``.jsonl`` file, ignoring a torn last line.

    Args:
        path: the file.

    Returns:
        The records.
    """
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@lru_cache(maxsize=4)
def _open_zip(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)


def read_bytes(path: str) -> bytes:
    """Read a file, or a member of a zip archive addressed as ``ARCHIVE.zip::MEMBER``.

    Args:
        path: the file's path, or ``ARCHIVE.zip::MEMBER``.

    Returns:
        Its bytes.

    Raises:
        OSError: the file, the archive or the member cannot be read.
    """
    if ZIP_SEP in path:
        archive, member = path.split(ZIP_SEP, 1)
        try:
            return _open_zip(archive).read(member)
        except (KeyError, zipfile.BadZipFile) as e:
            raise OSError(str(e)) from None
    with open(path, "rb") as f:
        return f.read()
