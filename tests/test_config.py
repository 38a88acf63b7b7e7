"""Config precedence: defaults < YAML < flags; unknown fields are errors; saved config round-trips."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from malaria_cells.config import TrainConfig, load_config, resolve_config, save_config
from malaria_cells.errors import EXIT_USAGE, ConfigError


def test_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\nbatch-size: 32\nlr: 0.01\n")
    cfg = resolve_config(yaml_path=y, overrides={"lr": 0.002, "epochs": None})
    assert cfg.epochs == 7  # YAML over default; an unset flag (None) does not erase it
    assert cfg.batch_size == 32  # dashes accepted in YAML
    assert cfg.lr == 0.002  # flag over YAML
    assert cfg.patience == TrainConfig().patience  # default


def test_unknown_field_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config field"):
        resolve_config(overrides={"epoch": 3})


def test_config_is_frozen_and_roundtrips(tmp_path):
    cfg = resolve_config(overrides={"model": "custom-cnn", "input_size": 48})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.epochs = 3  # type: ignore[misc]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_yaml_strings_are_coerced_and_bad_values_refused(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3e-3\n")  # PyYAML reads this as the string '3e-3'
    assert resolve_config(yaml_path=y).lr == 0.003
    for text, field in (("epochs: two\n", "epochs"), ("batch_size: 32.5\n", "batch_size"), ("lr: -1\n", "lr")):
        y.write_text(text)
        with pytest.raises(ConfigError, match=field) as err:
            resolve_config(yaml_path=y)
        assert err.value.code == "config_invalid" and str(y) in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"precision": "fp16"}, "precision"),
        ({"strategy": "magic"}, "strategy"),
        ({"split": "random"}, "split"),
        ({"feature_views": 9}, "feature_views"),
        ({"val_fraction": 0.5}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
    ],
)
def test_out_of_range_values_are_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve_config(overrides=overrides)


def test_bad_config_stops_the_cli_before_anything_is_written(tmp_path):
    import os
    import subprocess
    import sys

    y = tmp_path / "c.yaml"
    y.write_text("epochs: two\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "malaria_cells.cli", "train", "-c", str(y), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == EXIT_USAGE
    assert "epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_every_field_has_a_train_flag_with_its_help():
    from typer.testing import CliRunner

    from malaria_cells.cli import app

    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    for name, field in TrainConfig.model_fields.items():
        flag = "--time-budget" if name == "time_budget_s" else "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert field.description.split()[0] in help_text
    assert "(default 64)" in help_text  # batch size's default, from the config model
