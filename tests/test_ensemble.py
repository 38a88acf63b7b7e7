"""Test-time augmentation views and the alignment of ensemble members, with hand-checked answers."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_cells import ensemble as E


def test_dihedral_gives_the_eight_distinct_views_of_a_square() -> None:
    img = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)  # no symmetry: every view differs
    views = [E.dihedral(img, v)[0, :, :, 0] for v in range(8)]
    assert len({v.tobytes() for v in views}) == 8
    assert (views[0] == img[0, :, :, 0]).all()
    assert (views[2] == img[0, ::-1, ::-1, 0]).all()  # 180 degrees
    assert (views[4] == img[0, :, ::-1, 0]).all()  # mirror
    with pytest.raises(ValueError):
        E.dihedral(img, 8)


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
