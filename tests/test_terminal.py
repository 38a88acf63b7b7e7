"""The command line's terminal output at 80 columns (a default terminal): progress bars keep their counts and ETA,
and the tables keep every name and number whole (long text wraps at spaces, nothing is cut with "…")."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from malaria_cells.evaluate import REPORT_METRICS
from malaria_cells.models import MODELS
from malaria_cells.predict import Prediction
from malaria_cells.render import (
    adapt_table,
    evaluation_table,
    models_table,
    parasitemia_table,
    render_predictions,
    split_table,
)
from malaria_cells.terminal import make_progress

WIDTH = 80
STATUS = "loss 0.1234  val AUC 0.9912  acc 0.9634  *"  # what train.py shows per epoch


def _render(*renderables) -> str:
    console = Console(width=WIDTH, record=True, color_system=None, file=io.StringIO())
    for r in renderables:
        console.print(r)
    text = console.export_text()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    return text


def _words(text: str) -> set[str]:
    return set(text.split())


@pytest.mark.parametrize("description", ["epochs", "cutting out the cells of 24 photos"])
def test_progress_keeps_counts_eta_and_status_whole_at_80_columns(description: str) -> None:
    progress = make_progress(output=Console(width=WIDTH, color_system=None, file=io.StringIO()))
    now = [0.0]
    progress.get_time = lambda: now[0]  # a clock the test moves: the ETA is known and not "-:--:--"
    epochs = progress.add_task(description, total=30, status="")
    steps = progress.add_task("epoch 4", total=1000, status="")
    for i in range(3):
        now[0] += 9
        progress.update(epochs, completed=i + 1, status=STATUS)
        progress.update(steps, completed=100 * (i + 1), status="loss 0.2345")
    text = _render(progress.make_tasks_table(progress.tasks))
    first = text.splitlines()[0]
    assert re.search(r"\b3/30\s+10%\s+0:00:27 eta 0:04:03\b", first), text
    assert re.search(r"\b300/1000\s+30%\s+0:00:27 eta 0:01:03\b", text), text
    assert _words(STATUS) | _words(description) <= _words(text), text  # wrapped at spaces, every word whole


def test_models_table_at_80_columns() -> None:
    text = _render(models_table(MODELS))
    words = _words(text)
    for name, spec in MODELS.items():
        line = next(ln for ln in text.splitlines() if re.match(rf"{re.escape(name)}\b", ln))
        assert str(spec.input_size) in line and f"{spec.strategy}*" in line, line  # the default, starred, first
        assert set(spec.strategies) <= {w.strip(",*") for w in words}
        assert _words(spec.description) <= words, spec.description


def test_split_table_at_80_columns() -> None:
    rows = [
        {
            "split": which,
            "images": 19_290,
            "parasitized": 9_645,
            "uninfected": 9_645,
            "patients": 105,
            "infected_patients": 70,
            "uninfected_only_patients": 35,
        }
        for which in ("train", "val", "test")
    ]
    text = _render(split_table(rows, title="patient split -> runs/split.csv"))
    assert re.search(r"^train\s+19,290\s+9,645\s+9,645\s+105\s+70\s+35$", text, re.M), text
    assert {"parasitized", "uninfected", "infected", "only", "patients"} <= _words(text)


def test_adapt_table_at_80_columns() -> None:
    ci = {"value": 0.983, "low": 0.970, "high": 0.990}
    scores = {
        "roc_auc": ci,
        "sensitivity": ci,
        "specificity": ci,
        "threshold": 0.873,
        "parasitemia_called_pct": 1.25,
        "parasitemia_true_pct": 1.43,
    }
    names = ["before, its own threshold", "after, high-specificity point chosen on lab val"]
    text = _render(adapt_table(dict.fromkeys(names, scores)))
    assert text.count("(0.970–0.990)") == 3 * len(names) and text.count("1.25 / 1.43") == len(names)
    for name in names:
        assert _words(f"{name} (0.873)") <= _words(text), name


def test_parasitemia_table_at_80_columns() -> None:
    class Slide:  # what parasitemia_table reads of smear.SlideSummary
        slide = "2024-03-15_patient_0042_thin_smear_slide_A_field_photos"

        def to_dict(self) -> dict:
            return {"photos": 24, "cells": 3119, "infected": 45, "parasitemia_pct": 1.4428, "ci95_pct": [1.05, 1.92]}

    text = _render(parasitemia_table([Slide()], boxes="detected"))
    assert re.search(r"\b24\s+3,119\s+45\s+1\.44\s+1\.05–1\.92\b", text), text
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("slide"))
    width = lines[header].index("photos")  # the slide column ends where the next one's header starts
    assert "".join(ln[:width].strip() for ln in lines[header + 2 :]) == Slide.slide, text  # folded, never cut


def test_evaluation_and_prediction_tables_at_80_columns() -> None:
    result = {
        "model": "custom-cnn",
        "split": "test",
        "n_cells": 4123,
        "n_patients": 23,
        "leaky": False,
        "metrics": {k: {"value": 0.9612, "low": 0.9501, "high": 0.9712} for k, _ in REPORT_METRICS},
    }
    text = _render(evaluation_table(result))
    assert text.count("0.9612 (0.9501–0.9712)") == len(REPORT_METRICS)
    source = "nih-cell-images/Parasitized/C100P61ThinF_IMG_20150918_144104_cell_162.webp"
    preds = [
        Prediction(source, "Parasitized", 0.98765, 0.62),
        Prediction("notes.png", None, None, 0.62, error="notes.png: not an image (no known image format)"),
    ]
    table = "".join(render_predictions(preds, fmt="table", width=WIDTH))
    assert "…" not in table and "0.9877" in table
    first_column = [ln.split("│")[1].strip() for ln in table.splitlines() if ln.startswith("│")]
    assert "".join(first_column).startswith(source + "notes.png"), table  # folded, never cut
    assert _words("not an image (no known image format)") <= _words(table)
