"""Stain jitter: off draws nothing (old runs resume the same), on changes colours but never the black background."""

from __future__ import annotations

import torch

from malaria_cells.augment import stain_jitter
from malaria_cells.config import resolve_config


def _cells() -> torch.Tensor:
    x = torch.zeros(16, 24, 24, 3, dtype=torch.uint8)
    x[:, 6:18, 6:18] = torch.tensor([200, 120, 160], dtype=torch.uint8)
    return x


def test_off_is_the_identity_and_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    x = _cells()
    assert torch.equal(stain_jitter(x, gen, strength=0.0), x)
    assert torch.equal(gen.get_state(), state)  # a run trained without it resumes bit-identical


def test_on_changes_the_stain_and_keeps_the_background_black():
    x = _cells()
    y = stain_jitter(x, torch.Generator().manual_seed(1), strength=1.0)
    assert (y[:, :6] == 0).all() and (y[:, 18:] == 0).all()
    cell = y[:, 6:18, 6:18].float().reshape(16, -1, 3).mean(1)
    assert cell.std(0).max() > 5  # the 16 cells got different colours
    sat = (cell.max(1).values - cell.min(1).values) / (200 - 120)
    assert sat.min() < 0.9 and sat.max() > 1.2  # paler and more saturated than the original


def test_config_field_is_validated():
    assert resolve_config(overrides={"stain_jitter": 1.0}).stain_jitter == 1.0
    import pytest

    from malaria_cells.errors import ConfigError

    with pytest.raises(ConfigError, match="stain_jitter"):
        resolve_config(overrides={"stain_jitter": -1})
