"""Config precedence: defaults < YAML < flags; unknown fields are errors; saved config round-trips."""

from __future__ import annotations

import pytest

from malaria_cells.config import TrainConfig, load_config, resolve_config, save_config


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
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
