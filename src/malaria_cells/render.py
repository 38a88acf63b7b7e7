"""How the command line shows results: ``predict``'s table, CSV, JSON lines or JSON, and ``evaluate``'s metrics table.

Part of the command line (only :mod:`malaria_cells.cli` imports it): the library returns
:class:`~malaria_cells.predict.Prediction` objects and evaluation dicts and never formats them for a terminal.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from malaria_cells.evaluate import REPORT_METRICS, format_ci
from malaria_cells.predict import Prediction

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.table import Table

FORMATS = ("table", "csv", "jsonl", "json")
# The CSV's columns: a stable interface for scripts (the machine-readable error code is in jsonl/json).
CSV_HEADER = ("source", "label", "prob_parasitized", "threshold", "flag", "error")


def render_predictions(
    predictions: Iterable[Prediction], *, fmt: str, card: dict | None = None, width: int = 160, header: bool = True
) -> Iterator[str]:
    """Render predictions piece by piece, so a stream of millions is written without holding it.

    "csv" and "jsonl" yield one line per prediction (shards of one input concatenate: ``jsonl`` with ``cat``,
    ``csv`` with the header of the first); "json" streams one document ``{"model": card, "predictions": [...]}``;
    "table" collects every row first.

    Args:
        predictions: the results, consumed lazily.
        fmt: one of :data:`FORMATS`.
        card: the model card (JSON only).
        width: table width in characters.
        header: the CSV header line.

    Yields:
        Pieces of text; together they end with a newline.

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "json":
        yield '{"model": ' + json.dumps(card or {}, indent=2) + ', "predictions": ['
        sep = "\n"
        for p in predictions:
            yield sep + json.dumps(p.to_dict())
            sep = ",\n"
        yield "\n]}\n"
    elif fmt == "jsonl":
        for p in predictions:
            yield json.dumps(p.to_dict()) + "\n"
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        rows = (
            [
                p.source,
                p.label or "",
                "" if p.probability is None else f"{p.probability:.6f}",
                f"{p.threshold:.6f}",
                p.flag,
                p.error or "",
            ]
            for p in predictions
        )
        for row in itertools.chain([CSV_HEADER] if header else [], rows):
            w.writerow(row)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        rows = list(predictions)
        threshold = f"; Parasitized when P >= {rows[0].threshold:.4f}" if rows else ""
        t = Table(title=f"{len(rows)} image(s){threshold}", title_justify="left")
        for col, just in (("source", "left"), ("label", "left"), ("P(Parasitized)", "right"), ("note", "left")):
            t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
        for p in rows:
            prob = "" if p.probability is None else f"{p.probability:.4f}"
            reason = (p.error or "").removeprefix(f"{p.source}: ")  # the source is in its own column
            t.add_row(
                p.source, p.label or "error", prob, reason or (f"{p.flag} (model: {p.raw_label})" if p.flag else "")
            )
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None).print(t)
        yield buf.getvalue()
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def evaluation_table(result: dict) -> Table:
    """The metrics table of one evaluation (``evaluate``'s summary on the terminal).

    Args:
        result: the ``metrics.json`` content of :func:`malaria_cells.evaluate.evaluate_run`.

    Returns:
        A rich table.
    """
    from rich.table import Table

    leaky = " [red](LEAKY by-image split)[/]" if result["leaky"] else ""
    t = Table(
        title=f"{result['model']} on {result['split']}: {result['n_cells']:,} cells, "
        f"{result['n_patients']} patients{leaky}"
    )
    t.add_column("metric")
    t.add_column("value (95% CI, patient bootstrap)", justify="right")
    for key, label in REPORT_METRICS:
        t.add_row(label, format_ci(result["metrics"][key]))
    return t
