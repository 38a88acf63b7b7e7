"""Terminal rendering for the CLI: the rich console, progress bars behind the library's reporter, and log output.

Only :mod:`malaria_cells.cli` imports this module: the library reports through :mod:`malaria_cells.progress` and
:mod:`logging`, and this is where those become bars and coloured lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from malaria_cells.progress import Reporter, reporting

# stderr: standard output carries results (csv, json) that scripts read.
console = Console(stderr=True)
QUIET_ENV = "MALARIA_CELLS_QUIET"


class RichReporter(Reporter):
    """Draws the library's progress tasks as rich bars with count, percentage, elapsed time, ETA and a status."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._transient: set[TaskID] = set()

    def start(self, description: str, *, total: float | None, completed: float = 0, transient: bool = False) -> Any:
        tid = self.progress.add_task(description, total=total, completed=completed, status="")
        if transient:
            self._transient.add(tid)
        return tid

    def advance(self, handle: Any, n: float) -> None:
        self.progress.advance(handle, n)

    def update(self, handle: Any, *, completed: float | None, total: float | None, status: str | None) -> None:
        fields: dict[str, Any] = {}
        if status is not None:
            fields["status"] = status
        self.progress.update(handle, completed=completed, total=total, **fields)

    def close(self, handle: Any) -> None:
        if handle in self._transient:
            self.progress.remove_task(handle)
            self._transient.discard(handle)
        else:
            task = self.progress._tasks.get(handle)  # noqa: SLF001 - rich has no public "is finished" setter
            if task is not None and task.total is not None and not task.finished:
                self.progress.update(handle, total=task.completed)


def make_progress(*, output: Console | None = None) -> Progress:
    """A rich progress display: description, bar, count, percentage, elapsed, ETA and the task's status.

    The numbers never wrap or shorten; on a narrow terminal (80 columns) the bar is short and the description and
    status wrap at spaces onto more lines instead of being cut with "…".

    Args:
        output: the console to draw on (default: the CLI's stderr console).

    Returns:
        The (not yet started) progress display.
    """
    out = output or console
    numbers = {"table_column": Column(no_wrap=True)}
    words = {"table_column": Column(overflow="fold")}
    return Progress(
        TextColumn("[bold]{task.description}", **words),
        # A bar that may not shrink, sized to the terminal: 10 cells at 80 columns, up to 40 on wide ones.
        BarColumn(bar_width=min(40, max(10, out.width - 100)), table_column=Column(no_wrap=True)),
        MofNCompleteColumn(**numbers),
        TaskProgressColumn(**numbers),
        TimeElapsedColumn(**numbers),
        TextColumn("eta", **numbers),
        TimeRemainingColumn(**numbers),
        TextColumn("{task.fields[status]}", **words),
        console=out,
        disable=os.environ.get(QUIET_ENV) == "1",
        expand=False,
    )


@contextlib.contextmanager
def cli_session(*, verbose: bool = False) -> Iterator[None]:
    """Route the library's logging to the console and its progress to rich bars while a command runs.

    Args:
        verbose: show debug log lines too.
    """
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("malaria_cells")
    old_level, old_propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    try:
        with make_progress() as progress, reporting(RichReporter(progress)):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        root.propagate = old_propagate
