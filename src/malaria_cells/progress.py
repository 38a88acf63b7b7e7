"""Rich progress bars and a process-parallel map that reports progress, shared by the long-running steps."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
T = TypeVar("T")


def make_progress(*, transient: bool = False, extra: str = "") -> Progress:
    """Return a rich progress bar with count, percentage, elapsed time and ETA.

    Args:
        transient: remove the bar when done.
        extra: a field name shown after the bar (set with ``progress.update(task, <extra>=...)``).

    Returns:
        An un-started :class:`rich.progress.Progress` (use it as a context manager).
    """
    columns: list[Any] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(f"{{task.fields[{extra}]}}"))
    return Progress(
        *columns, console=console, transient=transient, disable=os.environ.get("MALARIA_CELLS_QUIET") == "1"
    )


def workers(n: int | None = None) -> int:
    """Number of worker processes: ``n``, else all cores."""
    return max(1, n or os.cpu_count() or 1)


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` ranges covering ``range(n)`` in pieces of ``size``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def parallel_map(
    fn: Callable[[Sequence[Any]], T],
    items: Sequence[Any],
    *,
    description: str,
    chunk_size: int = 256,
    n_workers: int | None = None,
) -> Iterator[tuple[int, T]]:
    """Apply ``fn`` to consecutive chunks of ``items`` in worker processes, showing progress.

    Results come back as they finish (not in order), each with its chunk's start index.

    Args:
        fn: a picklable top-level function taking a list of items.
        items: the work.
        description: progress bar label.
        chunk_size: items per task; large enough to amortise pickling, small enough for a smooth bar.
        n_workers: processes (default: all cores). 1 runs in this process (no pickling; used by tests).

    Yields:
        ``(start, fn(items[start:stop]))``.
    """
    n_workers = workers(n_workers)
    with make_progress(transient=False) as progress:
        task = progress.add_task(description, total=len(items))
        if n_workers == 1 or len(items) <= chunk_size:
            for start, stop in chunks(len(items), chunk_size):
                yield start, fn(items[start:stop])
                progress.advance(task, stop - start)
            return
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, list(items[a:b])): (a, b) for a, b in chunks(len(items), chunk_size)}
            for fut in as_completed(futures):
                a, b = futures[fut]
                yield a, fut.result()
                progress.advance(task, b - a)
