"""Progress reporting through callbacks, core counting, and a process-parallel map.

Library code never prints: it logs through :mod:`logging` and reports progress to the current :class:`Reporter`.
The default reporter does nothing; the CLI installs one that draws rich progress bars (``malaria_cells.terminal``)
with :func:`reporting`. A reporter is held in a context variable, so a library function deep in a call chain
reports without every caller threading a parameter through, and two threads (the web service) never share one.
"""

from __future__ import annotations

import contextlib
import contextvars
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

T = TypeVar("T")


class Task:
    """One unit of long work (an epoch, a feature extraction, a decode pass), reported to a :class:`Reporter`.

    Use as a context manager so the task is closed however the work ends.
    """

    def __init__(self, reporter: Reporter, handle: Any) -> None:
        self._reporter = reporter
        self._handle = handle

    def advance(self, n: float = 1) -> None:
        """Mark ``n`` more units done."""
        self._reporter.advance(self._handle, n)

    def update(self, *, completed: float | None = None, total: float | None = None, status: str | None = None) -> None:
        """Set the done count, the total or the one-line status shown beside the bar."""
        self._reporter.update(self._handle, completed=completed, total=total, status=status)

    def close(self) -> None:
        """End the task (a transient one disappears from the display)."""
        self._reporter.close(self._handle)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Receives progress from the library. This base class ignores everything (the default: silent library)."""

    def start(self, description: str, *, total: float | None, completed: float = 0, transient: bool = False) -> Any:  # noqa: ARG002
        """Begin a task; returns a handle passed back to the other methods."""
        return None

    def advance(self, handle: Any, n: float) -> None:  # noqa: ARG002
        """``n`` more units of the task are done."""

    def update(self, handle: Any, *, completed: float | None, total: float | None, status: str | None) -> None:  # noqa: ARG002
        """Set the task's done count, total or status line."""

    def close(self, handle: Any) -> None:  # noqa: ARG002
        """The task ended."""


_SILENT = Reporter()
_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("malaria_cells_reporter", default=None)


def reporter() -> Reporter:
    """The reporter installed for this context (a silent one unless the caller installed another)."""
    return _current.get() or _SILENT


@contextlib.contextmanager
def reporting(rep: Reporter) -> Iterator[Reporter]:
    """Install ``rep`` as the reporter for the code inside the ``with`` block.

    Args:
        rep: the reporter (the CLI's rich one, a test's recorder, ...).

    Yields:
        ``rep``.
    """
    token = _current.set(rep)
    try:
        yield rep
    finally:
        _current.reset(token)


def task(description: str, *, total: float | None, completed: float = 0, transient: bool = False) -> Task:
    """Start a task on the current reporter.

    Args:
        description: what is being done ("epoch 3", "decoding 20,682 images").
        total: units of work, or None when unknown.
        completed: units already done (a resumed run).
        transient: the display may drop the task when it ends.

    Returns:
        The task; use it as a context manager.
    """
    rep = reporter()
    return Task(rep, rep.start(description, total=total, completed=completed, transient=transient))


def available_cores() -> int:
    """Cores this process may use: CPU affinity and a cgroup CPU quota (containers) both count.

    ``os.cpu_count()`` reports the machine's cores even when the process is pinned to fewer or a container's quota
    allows fewer; every "how many threads/processes" decision in the package starts here.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    # cgroup v2: "max 100000" (no limit) or "200000 100000" (2 CPUs); v1: cfs_quota_us / cfs_period_us.
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]  # noqa: SIM115 - tiny read
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())  # noqa: SIM115
        p = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())  # noqa: SIM115
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def workers(n: int | None = None) -> int:
    """Number of worker processes or threads: ``n``, else :func:`available_cores`."""
    return max(1, n or available_cores())


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
    """Apply ``fn`` to consecutive chunks of ``items`` in worker processes, reporting progress.

    Results come back as they finish (not in order), each with its chunk's start index.

    Args:
        fn: a picklable top-level function taking a list of items.
        items: the work.
        description: progress task label.
        chunk_size: items per task; large enough to amortise pickling, small enough for smooth progress.
        n_workers: processes (default: all available cores). 1 runs in this process (no pickling; used by tests).

    Yields:
        ``(start, fn(items[start:stop]))``.
    """
    n_workers = workers(n_workers)
    with task(description, total=len(items)) as t:
        if n_workers == 1 or len(items) <= chunk_size:
            for start, stop in chunks(len(items), chunk_size):
                yield start, fn(items[start:stop])
                t.advance(stop - start)
            return
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, list(items[a:b])): (a, b) for a, b in chunks(len(items), chunk_size)}
            for fut in as_completed(futures):
                a, b = futures[fut]
                yield a, fut.result()
                t.advance(b - a)
