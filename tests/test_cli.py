"""The command line's cheap commands, by what they do: the registry listing, ``data check`` counts and its exit code
on a corrupt file, ``data split`` never putting a patient in two splits, and the exit codes of usage and data errors
(the table in :mod:`malaria_cells.errors`). One parametrised smoke test covers every command's ``--help``.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_synthetic_dataset
from malaria_cells import __version__
from malaria_cells.cli import app
from malaria_cells.errors import EXIT_DATA, EXIT_OK, EXIT_SOME_INPUTS_FAILED, EXIT_USAGE
from malaria_cells.models import MODELS

COMMANDS = [
    [],
    ["models"],
    ["train"],
    ["evaluate"],
    ["reproduce"],
    ["predict"],
    ["explain"],
    ["export"],
    ["serve"],
    ["model-card"],
    ["data"],
    ["data", "check"],
    ["data", "split"],
    ["data", "fetch"],
]
# 2 infected patients with 2 + 2 cells and 1 uninfected-only patient with 2 cells: small enough to decode in a blink.
TINY = dict(infected_patients=2, uninfected_patients=1, cells=4)


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _row(output: str, label: str) -> str:
    """The value cell of a two-column table row, whatever box characters the table is drawn with."""
    m = re.search(rf"^\W*{re.escape(label)}\W+(\S+)\W*$", output, re.MULTILINE)
    assert m, f"no row {label!r} in:\n{output}"
    return m.group(1)


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "cells", **TINY)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(cmd: list[str]) -> None:
    r = _invoke(*cmd, "--help")
    assert r.exit_code == EXIT_OK, r.output
    assert "Usage" in r.output and len(r.output) > 200


def test_version() -> None:
    r = _invoke("--version")
    assert r.exit_code == EXIT_OK and r.output.strip() == f"malaria-cells {__version__}"


def test_models_lists_every_registry_model_with_its_defaults() -> None:
    r = _invoke("models")
    assert r.exit_code == EXIT_OK, r.output
    for name, spec in MODELS.items():
        line = next((ln for ln in r.output.splitlines() if re.search(rf"\b{re.escape(name)}\b", ln)), None)
        assert line is not None, f"{name} not listed:\n{r.output}"
        assert str(spec.input_size) in line and spec.strategy in line, line


def test_data_check_reports_counts_and_exits_zero_on_clean_data(tiny_data: Path) -> None:
    r = _invoke("data", "check", tiny_data, "--workers", "1", "--per-patient")
    assert r.exit_code == EXIT_OK, r.output
    assert _row(r.output, "Parasitized") == "4"
    assert _row(r.output, "Uninfected") == "6"
    assert _row(r.output, "patients") == "3"
    assert _row(r.output, "problems (skipped)") == "0"
    assert re.search(r"\bC201\W+2\W+0\b", r.output), r.output  # per patient: C201 has 2 uninfected, 0 parasitized


def test_data_check_names_a_corrupt_file_and_exits_one(tiny_data: Path) -> None:
    bad = sorted((tiny_data / "Parasitized").glob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    (tiny_data / "Uninfected" / "notes.txt").write_text("not an image")
    r = _invoke("data", "check", tiny_data, "--workers", "1")
    assert r.exit_code == EXIT_SOME_INPUTS_FAILED, r.output
    flat = re.sub(r"\s+", "", r.output)  # a long path may be wrapped across lines
    assert bad.name in flat and "notes.txt" in flat
    assert _row(r.output, "Parasitized") == "3"  # the corrupt cell is not counted
    assert _row(r.output, "problems (skipped)") == "2"


def test_data_check_of_a_folder_without_images_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = _invoke("data", "check", tmp_path / "empty")
    assert r.exit_code == EXIT_DATA, r.output
    assert "Parasitized" in r.output


def _read_split(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_split_never_puts_a_patient_in_two_splits(tmp_path: Path, seed: int) -> None:
    data = make_synthetic_dataset(tmp_path / "cells", infected_patients=8, uninfected_patients=4, cells=4)
    out = tmp_path / "split.csv"
    r = _invoke("data", "split", "--data", data, "--out", out, "--seed", seed)
    assert r.exit_code == EXIT_OK, r.output
    rows = _read_split(out)
    assert len(rows) == 8 * 4 + 4 * 2  # every image, once
    assert len({row["rel"] for row in rows}) == len(rows)
    where = defaultdict(set)
    for row in rows:
        where[row["patient"]].add(row["split"])
    assert all(len(s) == 1 for s in where.values()), dict(where)
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    assert {row["kind"] for row in rows} == {"patient"}


def test_the_leaky_split_does_put_patients_in_two_splits(tmp_path: Path) -> None:
    # The counterpart of the test above, so that test can fail: a by-image split mixes a patient's cells.
    data = make_synthetic_dataset(tmp_path / "cells", infected_patients=8, uninfected_patients=4, cells=4)
    out = tmp_path / "leaky.csv"
    r = _invoke("data", "split", "--data", data, "--out", out, "--by-image-leaky")
    assert r.exit_code == EXIT_OK, r.output
    rows = _read_split(out)
    where = defaultdict(set)
    for row in rows:
        where[row["patient"]].add(row["split"])
    assert any(len(s) > 1 for s in where.values())
    assert {row["kind"] for row in rows} == {"image-leaky"} and "LEAKY" in r.output


def test_data_split_rejects_bad_fractions_before_writing(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "split.csv"
    r = _invoke("data", "split", "--data", tiny_data, "--out", out, "--test-fraction", "0.9")
    assert r.exit_code == EXIT_USAGE, r.output
    assert "test_fraction" in r.output and not out.exists()


def test_missing_data_is_a_data_error_with_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MALARIA_CELLS_DATA", raising=False)
    r = _invoke("data", "split", "--out", tmp_path / "s.csv")
    assert r.exit_code == EXIT_DATA, r.output
    assert "data fetch" in r.output and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["models", "--no-such-flag"],
        ["data", "split", "--val-fraction", "a-lot"],
        ["data", "check"],  # missing argument
        ["no-such-command"],
        ["train", "--epochs", "many"],
    ],
    ids=["unknown-flag", "bad-float", "missing-argument", "unknown-command", "bad-int"],
)
def test_usage_errors_exit_two_and_say_what_is_wrong(args: list[str]) -> None:
    r = _invoke(*args)
    assert r.exit_code == EXIT_USAGE, r.output
    assert re.search(r"No such (option|command)|Invalid value|Missing argument", r.output), r.output
