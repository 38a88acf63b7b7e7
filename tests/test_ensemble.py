"""Test-time augmentation views and the alignment of ensemble members, with hand-checked answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from malaria_cells import ensemble as E
from malaria_cells.augment import DIHEDRAL, MAX_VIEWS, dihedral_view, view


def test_tta_gives_the_eight_distinct_views_of_a_square() -> None:
    img = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)  # no symmetry: every view differs
    views = [f(img)[0, :, :, 0] for f in E.tta_views()]
    assert len(views) == 8 and len({v.tobytes() for v in views}) == 8
    assert (views[0] == img[0, :, :, 0]).all()
    assert (views[2] == img[0, ::-1, ::-1, 0]).all()  # 180 degrees
    assert (views[5] == img[0, :, ::-1, 0]).all()  # mirror (left-right)
    # a quarter turn then a mirror: the reflection across the anti-diagonal
    assert (views[1] == img[0, ::-1, ::-1, 0].T).all()
    with pytest.raises(ValueError):
        dihedral_view(img, 8)
    with pytest.raises(ValueError):
        dihedral_view(img, -1)


@pytest.mark.parametrize("k", range(MAX_VIEWS))
def test_view_k_is_the_same_transform_for_tta_and_the_feature_stores(k: int) -> None:
    # TTA (numpy, ensemble) and the frozen-backbone feature stores (torch, augment.view) number the views once.
    rng = np.random.default_rng(k)
    batch = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    tta = E.tta_views()[k](batch)
    stored = view(torch.from_numpy(batch), k, None).numpy()
    assert np.array_equal(tta, stored)
    turns, mirror = DIHEDRAL[k]
    expected = np.rot90(batch, turns, axes=(1, 2))
    assert np.array_equal(tta, expected[:, :, ::-1] if mirror else expected)


@pytest.mark.parametrize(
    ("keys_b", "prob_b", "expected_keys", "expected_prob"),
    [
        (["a", "b", "c"], [0.0, 0.5, 1.0], ["a", "b", "c"], [0.1, 0.5, 0.95]),
        (["c", "a", "b"], [1.0, 0.0, 0.5], ["a", "b", "c"], [0.1, 0.5, 0.95]),  # other order: aligned by key
        (["c", "a"], [1.0, 0.0], ["a", "c"], [0.1, 0.95]),  # a cell one member could not read is left out
    ],
)
def test_average_aligns_members_by_image(keys_b, prob_b, expected_keys, expected_prob) -> None:
    a = E.Probabilities(
        ["a", "b", "c"], np.array([0, 1, 1]), np.array(["p", "p", "q"]), np.array([0.2, 0.5, 0.9]), 100.0
    )
    idx = {"a": 0, "b": 1, "c": 2}
    b = E.Probabilities(
        keys_b,
        a.y[[idx[k] for k in keys_b]],
        a.groups[[idx[k] for k in keys_b]],
        np.array(prob_b),
        300.0,
    )
    m = E.average([a, b])
    assert m.keys == expected_keys
    assert m.prob == pytest.approx(expected_prob)
    assert list(m.y) == [a.y[idx[k]] for k in expected_keys]
    assert m.cells_per_s == pytest.approx(75.0)  # 1 / (1/100 + 1/300): every member runs on every cell
