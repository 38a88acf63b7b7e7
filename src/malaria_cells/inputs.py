"""What to classify: files, folders (walked recursively) and glob patterns turned into a stream of inputs, and shards.

A folder walk never stops at a bad entry and never drops one silently: a symbolic link loop, a second link to a
folder already walked, a dangling link and a folder that cannot be listed each become an :class:`UnreadableInput`
in the stream (its path and the reason), which the classifier reports as an error row like an unreadable image.
Folders are identified by (device, inode), so none is walked twice and a link back to an ancestor ends there.
"""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class UnreadableInput:
    """An entry met while walking the inputs that cannot be classified; it gets an error row, not a model call.

    Attributes:
        path: the entry's path, as walked.
        reason: why, in words.
        code: machine code, as :class:`~malaria_cells.preprocess.ImageError` codes (``file_unreadable``,
            ``symlink_loop``, ``not_a_file``).
        status: the HTTP status that code maps to.
    """

    path: str
    reason: str
    code: str = "file_unreadable"
    status: int = 422

    @property
    def message(self) -> str:
        """``PATH: reason``, the form of every per-file error."""
        return f"{self.path}: {self.reason}"

    def __str__(self) -> str:
        return self.path


InputItem = str | UnreadableInput


def iter_inputs(paths: Sequence[str | Path]) -> Iterator[InputItem]:
    """Expand files, folders (recursively, image files only) and glob patterns into file paths, lazily.

    Folders are walked in sorted order one directory at a time, so a folder of millions of images streams in
    constant memory. A path that neither exists nor matches a glob is kept, so it gets a row with its error; so
    do the walk's problems (see :class:`UnreadableInput`).

    Args:
        paths: what the user passed.

    Yields:
        File paths (and :class:`UnreadableInput` entries) in a deterministic order (each folder's entries sorted by
        name); when several paths are given, a file named twice is yielded once (first occurrence).
    """
    seen: set[str] | None = set() if len(paths) > 1 else None  # only several arguments can overlap
    for p in paths:
        s = str(p)
        path = Path(s)
        found: Iterable[InputItem]
        if path.is_dir():
            found = walk_images(s)
        elif path.exists():
            found = [s]
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            found = [m for m in matches if Path(m).is_file()] or [s]
        else:
            found = [s]
        for f in found:
            if seen is not None:
                key = str(f)
                if key in seen:
                    continue
                seen.add(key)
            yield f


def collect_inputs(paths: Sequence[str | Path]) -> list[InputItem]:
    """Expand files, folders (recursively, image files only) and glob patterns into a list.

    Args:
        paths: what the user passed.

    Returns:
        The items of :func:`iter_inputs`, as a list.
    """
    return list(iter_inputs(paths))


def walk_images(folder: str | Path) -> Iterator[InputItem]:
    """The image files under a folder, depth first, each folder's entries sorted by name.

    Symbolic links are followed, but no folder twice: a link to a folder already walked (a loop back to an
    ancestor, or a second way to the same folder) yields an :class:`UnreadableInput` instead, as do dangling links
    (those named like an image or without a suffix: they may have pointed at either), image-named entries that are
    not regular files (a FIFO would block the reader) and folders that cannot be listed.

    Args:
        folder: the folder.

    Yields:
        Image file paths and :class:`UnreadableInput` entries.
    """
    folder = str(folder)
    visited: dict[tuple[int, int], str] = {}
    try:
        st = os.stat(folder)
    except OSError as e:
        yield UnreadableInput(folder, f"cannot read folder ({_why(e)})")
        return
    visited[(st.st_dev, st.st_ino)] = folder
    yield from _walk(folder, visited)


def _walk(folder: str, visited: dict[tuple[int, int], str]) -> Iterator[InputItem]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield UnreadableInput(folder, f"cannot read folder ({_why(e)})")
        return
    for entry in entries:
        suffix = os.path.splitext(entry.name)[1].lower()
        image_named = suffix in IMAGE_SUFFIXES
        try:
            # Both follow symbolic links (a plain entry costs no system call); a link to itself raises ELOOP.
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as e:
            loop = e.errno == errno.ELOOP
            yield UnreadableInput(
                entry.path,
                f"{'symbolic link loop' if loop else 'cannot read'} ({_why(e)})",
                code="symlink_loop" if loop else "file_unreadable",
            )
            continue
        if is_dir:
            try:
                st = entry.stat()
            except OSError as e:
                yield UnreadableInput(entry.path, f"cannot read folder ({_why(e)})")
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited:
                first = visited[key]
                how = "a symbolic link loop" if _is_within(entry.path, first) else "a second link to it"
                yield UnreadableInput(
                    entry.path, f"folder already walked as {first} ({how}); not followed again", code="symlink_loop"
                )
                continue
            visited[key] = entry.path
            yield from _walk(entry.path, visited)
        elif is_file:
            if image_named:
                yield entry.path
        elif entry.is_symlink() and not os.path.exists(entry.path):
            # Dangling: it may have pointed at an image or a folder of them; other suffixes are ignored as files are.
            if image_named or not suffix:
                yield UnreadableInput(entry.path, f"dangling symbolic link (to {_readlink(entry.path)}, which is gone)")
        elif image_named:
            yield UnreadableInput(entry.path, "not a regular file", code="not_a_file")  # a FIFO would block the reader


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _is_within(path: str, ancestor: str) -> bool:
    """Whether ``path`` lies under ``ancestor`` in the walk (so following it would go round in a circle)."""
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(ancestor)]) == os.path.abspath(ancestor)


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

    Raises:
        ValueError: not 0 <= index < count.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index + 1}/{count}: need 1 <= i <= n")
    return n * index // count, n * (index + 1) // count
