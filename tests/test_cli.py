"""Every command and subcommand has working, non-empty help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from malaria_cells.cli import app

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


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(cmd):
    r = CliRunner().invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output) > 200


def test_models_lists_the_registry():
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0
    for name in ("custom-cnn", "resnet50v2", "efficientnet-lite0"):
        assert name in r.output


def test_missing_data_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MALARIA_CELLS_DATA", raising=False)
    r = CliRunner().invoke(app, ["data", "split", "--out", str(tmp_path / "s.csv")])
    assert r.exit_code == 2
    assert "data fetch" in r.output
