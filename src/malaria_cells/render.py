"""How the command line shows results: ``predict``'s table, CSV, JSON lines or JSON, ``evaluate``'s metrics table,
and the tables of ``models``, ``data split`` and ``adapt``.

Part of the command line (only :mod:`malaria_cells.cli` imports it): the library returns
:class:`~malaria_cells.predict.Prediction` objects and evaluation dicts and never formats them for a terminal.
Every table stays readable in an 80-column terminal: numbers and names never wrap, long headers and free text wrap
at spaces, and nothing is cut with "…".
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

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


def _table(title: str, **kwargs: Any) -> Table:
    """A table without outer edges or edge padding: four more columns for the content at 80 columns."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, **kwargs)


def models_table(models: Mapping[str, Any]) -> Table:
    """The model registry (``models``): name, input size, strategies (the default first, starred), weights.

    Args:
        models: :data:`malaria_cells.models.MODELS`.

    Returns:
        A rich table.
    """
    t = _table("models", caption="* the default strategy", caption_justify="left")
    t.add_column("name", no_wrap=True)  # names are what users copy; never break them
    t.add_column("input\npx", justify="right", no_wrap=True)
    t.add_column("strategies", max_width=10)  # one per line at 80 columns
    t.add_column("weights", no_wrap=True)
    t.add_column("description", overflow="fold")
    for name, s in models.items():
        ordered = [s.strategy, *(x for x in s.strategies if x != s.strategy)]
        strategies = ", ".join(f"{x}*" if x == s.strategy else x for x in ordered)
        t.add_row(name, str(s.input_size), strategies, s.weights, s.description)
    return t


def split_table(rows: list[dict], *, title: str) -> Table:
    """Images, classes and patients per split (``data split``).

    Args:
        rows: :func:`malaria_cells.split.describe` output, one dict per split.
        title: the table's title.

    Returns:
        A rich table.
    """
    t = _table(title)
    for key in rows[0] if rows else ():
        header = key.replace("_", " ")
        t.add_column(header, justify="right" if key != "split" else "left", no_wrap=" " not in header)
    for r in rows:
        t.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()))
    return t


def parasitemia_table(slides: Iterable[Any], *, boxes: str) -> Table:
    """Parasitemia per slide (``smear``): photos, cells, infected, parasitemia and its 95 % interval.

    Args:
        slides: :class:`malaria_cells.smear.SlideSummary` objects.
        boxes: where the cell boxes came from (the run's ``model["boxes"]``), for the title.

    Returns:
        A rich table.
    """
    t = _table(f"parasitemia ({boxes} cells; border cells not counted)")
    t.add_column("slide", overflow="fold")  # a folder name: folded if it must be, never cut
    for col in ("photos", "cells", "infected", "parasitemia %", "95 % CI"):
        t.add_column(col, justify="right", no_wrap=col != "parasitemia %")
    for s in slides:
        d = s.to_dict()
        pct = "—" if d["parasitemia_pct"] is None else f"{d['parasitemia_pct']:.2f}"
        ci = "—" if d["ci95_pct"][0] is None else f"{d['ci95_pct'][0]:.2f}–{d['ci95_pct'][1]:.2f}"
        t.add_row(s.slide, f"{d['photos']:,}", f"{d['cells']:,}", f"{d['infected']:,}", pct, ci)
    return t


def adapt_table(test: Mapping[str, Mapping[str, Any]]) -> Table:
    """The lab's test photos before and after ``adapt``: ROC-AUC, sensitivity, specificity and parasitemia.

    Args:
        test: the ``test`` part of :attr:`malaria_cells.adapt.AdaptResult.report`: scores by model and threshold.

    Returns:
        A rich table; each value with its 95 % interval (over photos) under it.
    """
    t = _table("the lab's test photos (95 % CI over photos)")
    t.add_column("model, threshold", overflow="fold")
    for col in ("ROC-AUC", "sensitivity", "specificity"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("parasitemia % called / true", justify="right", max_width=11)  # "1.25 / 1.43"

    def ci(d: Mapping[str, float]) -> str:
        return f"{d['value']:.3f}\n({d['low']:.3f}–{d['high']:.3f})"

    for name, m in test.items():
        t.add_row(
            f"{name} ({m['threshold']:.3f})",
            ci(m["roc_auc"]),
            ci(m["sensitivity"]),
            ci(m["specificity"]),
            f"{m['parasitemia_called_pct']:.2f} / {m['parasitemia_true_pct']:.2f}",
            end_section=True,
        )
    return t
