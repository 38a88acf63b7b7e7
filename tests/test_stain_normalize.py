"""Stain normalization of a photo's cells (malaria_cells.stain, smear --stain-normalize): colour maths against
scikit-image, the statistics it promises, the black background, and the smear pipeline and CLI on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab
from typer.testing import CliRunner

from malaria_cells import stain as ST
from malaria_cells.boxes import load_annotations
from malaria_cells.cli import app
from malaria_cells.smear import SmearAnalyzer

IML = Path(__file__).resolve().parents[1] / ".." / "shared" / "iml-malaria"
PHOTOS = ("PA171700.JPG", "PA171710.JPG")


@pytest.fixture(scope="module")
def iml() -> Path:
    if not (IML / "annotations.json").is_file():
        pytest.fail(f"the IML-Malaria share is missing at {IML.resolve()}")
    return IML


def _cells(rng: np.random.Generator, n: int = 12, size: int = 32, colour=(170, 110, 150)) -> np.ndarray:
    """Disks of one stain on black, each with a darker dot (a parasite's place)."""
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2 - 3) ** 2
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        c = np.clip(np.asarray(colour) + rng.normal(0, 6, (disk.sum(), 3)), 30, 255)
        out[i][disk] = c.astype(np.uint8)
        out[i, size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2] = (80, 30, 90)
    return out


def test_lab_conversions_match_scikit_image_and_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (20_000, 3), dtype=np.uint8)
    lab = ST.rgb_to_lab(rgb)
    assert np.abs(lab - rgb2lab(rgb[None] / 255.0)[0]).max() < 1e-3  # float32 (speed), scikit-image float64
    assert np.array_equal(ST.lab_to_rgb(lab), rgb)
    sk = np.clip(np.round(lab2rgb(lab[None])[0] * 255), 0, 255).astype(np.uint8)
    assert np.abs(ST.lab_to_rgb(lab).astype(int) - sk).max() <= 1


def test_normalized_cells_take_the_reference_statistics_and_keep_black_black():
    cells = _cells(np.random.default_rng(1))
    ref = ST.StainReference(mean=(62.0, 15.0, -0.5), std=(12.0, 10.0, 10.0))
    out, applied = ST.normalize_cells(cells, reference=ref)
    assert applied and out.shape == cells.shape and out.dtype == np.uint8
    fg = ST.stained(cells)
    assert np.array_equal(ST.stained(out), fg)  # no stained pixel became background, no background got stained
    assert not out[~fg].any()
    lab = ST.rgb_to_lab(out[fg])
    # Equal up to the uint8 rounding and the clipping of colours outside sRGB.
    assert np.allclose(lab.mean(0), ref.mean, atol=1.0) and np.allclose(lab.std(0), ref.std, rtol=0.1)
    # The dot stays darker than the rest of its cell: the photo's stain moved, the cells' differences did not.
    light = ST.rgb_to_lab(out[:, 16, 16])[:, 0]
    assert (light < ST.rgb_to_lab(out[:, 16, 8])[:, 0]).all()


def test_grey_cells_stay_grey():
    # Their a*, b* spread is float rounding: scaled to the reference's it became random colour (found in review).
    cells = _cells(np.random.default_rng(3))
    grey = np.repeat(cells.mean(axis=-1, keepdims=True).astype(np.uint8), 3, axis=-1)
    out, applied = ST.normalize_cells(grey)
    fg = ST.stained(grey)
    lab = ST.rgb_to_lab(out[fg])
    # One colour cast (spread from rounding and the gamut only), not noise of the reference's spread (~10).
    assert applied and lab[:, 1].std() < 3.0 and lab[:, 2].std() < 3.0
    assert lab[:, 0].std() == pytest.approx(ST.load_reference().std[0], rel=0.1)  # lightness still matched


def test_too_few_stained_pixels_are_left_alone():
    cells = _cells(np.random.default_rng(2), n=1, size=24)
    out, applied = ST.normalize_cells(cells, min_pixels=10_000)
    assert not applied and out is cells


def test_the_package_reference_comes_from_nih_cells():
    ref = ST.load_reference()
    assert ref.cells >= 1000 and "stain_reference.py" in ref.source
    assert 40 < ref.mean[0] < 90 and ref.mean[1] > 0  # NIH Giemsa: mid lightness, towards magenta (a* > 0)
    assert all(5 < s < 30 for s in ref.std)


def test_smear_pipeline_normalizes_each_photo_when_asked(iml):
    boxes = load_annotations(iml / "annotations.json")
    analyzer = SmearAnalyzer(keep_crops=True)
    photo = iml / "fields" / PHOTOS[0]
    off = analyzer.analyze(photo, boxes=boxes[PHOTOS[0]])
    on = analyzer.analyze(photo, boxes=boxes[PHOTOS[0]], stain_normalize=True)  # this photo only
    assert not off.stain_normalized and on.stain_normalized
    p_off = np.array([c.prob_parasitized for c in off.cells])
    p_on = np.array([c.prob_parasitized for c in on.cells])
    both = ~np.isnan(p_off) & ~np.isnan(p_on)
    assert both.sum() > 50 and not np.allclose(p_off[both], p_on[both], atol=1e-3)
    # The crops the model saw are the normalized ones (what the contact sheet then shows).
    fg = ST.stained(on.crops[both])
    lab = ST.rgb_to_lab(on.crops[both][fg])
    assert np.allclose(lab.mean(0), ST.load_reference().mean, atol=1.5)


def test_smear_eval_cli_flag_is_recorded(iml, tmp_path):
    out = tmp_path / "eval"
    args = ["smear-eval", str(iml / "fields"), "--annotations", str(iml / "annotations.json"), "--given-boxes"]
    res = CliRunner().invoke(
        app, [*args, "--first", PHOTOS[0], "--last", PHOTOS[0], "--stain-normalize", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["stain_normalize"] is True and metrics["n_photos"] == 1
    assert "stain-normalized" in (out / "report.md").read_text()


def test_smear_cli_flag_is_recorded_in_the_summary(iml, tmp_path):
    out = tmp_path / "out"
    photo = str(iml / "fields" / PHOTOS[1])
    res = CliRunner().invoke(app, ["smear", photo, "--out", str(out), "--no-overlays", "--stain-normalize"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["stain_normalize"] is True
