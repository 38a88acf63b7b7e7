"""Patient-disjoint, stratified splits and the leakage check."""

from __future__ import annotations

from collections import defaultdict

import pytest

from malaria_cells.data import scan
from malaria_cells.errors import EXIT_USAGE, ConfigError, MalariaCellsError
from malaria_cells.split import LEAKY, LeakageError, describe, load_split, make_split, save_split


def _where(split, images):
    where = defaultdict(set)
    for im in images:
        where[im.patient].add(split.assignment[im.rel])
    return where


def test_share_split_is_patient_disjoint_and_stratified(share):
    images = scan(share).images
    split = make_split(images, seed=0)
    assert all(len(s) == 1 for s in _where(split, images).values())
    rows = {r["split"]: r for r in describe(split, images)}
    total = len(images)
    for name, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(rows[name]["images"] / total - frac) < 0.03, rows[name]
        # both kinds of patient in every split, roughly in proportion (38 of 150 are uninfected-only)
        assert rows[name]["infected_patients"] >= 5 and rows[name]["uninfected_only_patients"] >= 2, rows[name]
        assert 0.35 < rows[name]["parasitized"] / rows[name]["images"] < 0.65


def test_split_is_deterministic_and_seed_dependent(synthetic_data):
    images = scan(synthetic_data).images
    a = make_split(images, seed=3)
    assert make_split(images, seed=3).assignment == a.assignment
    assert any(make_split(images, seed=s).assignment != a.assignment for s in range(4, 10))


def test_split_csv_roundtrip_and_tamper_detection(tmp_path, synthetic_data):
    images = scan(synthetic_data).images
    split = make_split(images, seed=0)
    path = tmp_path / "split.csv"
    save_split(split, images, path)
    assert load_split(path, images).assignment == split.assignment
    # move one cell of a test patient into train: the file now leaks and loading must refuse it
    lines = path.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if ",test," in line)
    lines[i] = lines[i].replace(",test,", ",train,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LeakageError, match="cross splits"):
        load_split(path)


def test_leaky_split_is_labelled_and_leaks(synthetic_data, tmp_path):
    images = scan(synthetic_data).images
    split = make_split(images, kind=LEAKY, seed=0)
    assert split.kind == "image-leaky"
    assert any(len(s) > 1 for s in _where(split, images).values())  # that is the point of the audit
    save_split(split, images, tmp_path / "s.csv")
    assert "image-leaky" in (tmp_path / "s.csv").read_text()
    assert load_split(tmp_path / "s.csv").kind == LEAKY


def test_bad_fractions_rejected(synthetic_data):
    images = scan(synthetic_data).images
    for kw in ({"test_fraction": 0.6}, {"test_fraction": -0.01}, {"val_fraction": 0.5}, {"val_fraction": -0.1}):
        with pytest.raises(ValueError):  # a ConfigError: a ValueError with a code and exit code 2
            make_split(images, **kw)
    with pytest.raises(ConfigError, match="unknown split kind") as e:
        make_split(images, kind="by-slide")
    assert e.value.exit_code == EXIT_USAGE


def test_leakage_error_has_a_machine_code(tmp_path, synthetic_data):
    images = scan(synthetic_data).images
    path = tmp_path / "split.csv"
    save_split(make_split(images, seed=0), images, path)
    text = path.read_text()
    path.write_text(text.replace(",test,", ",train,", 1))
    with pytest.raises(MalariaCellsError) as e:
        load_split(path)
    assert isinstance(e.value, LeakageError) and e.value.code == "split_leaks"


def test_a_final_fit_split_puts_every_patient_in_training(synthetic_data):
    images = scan(synthetic_data).images
    assert set(make_split(images, val_fraction=0, test_fraction=0).assignment.values()) == {"train"}
    with_val = make_split(images, val_fraction=0.2, test_fraction=0)
    assert set(with_val.assignment.values()) == {"train", "val"}  # an inner validation split, no test
