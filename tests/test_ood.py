"""Knowing when not to answer: real cells pass, inputs unlike the training cells get a flag and the label Unknown."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from malaria_cells.cli import app
from malaria_cells.ood import check, signals
from malaria_cells.predict import Classifier

IML = Path(__file__).resolve().parents[1] / ".." / "shared" / "iml-malaria"


@pytest.fixture(scope="module")
def cells(share) -> list[np.ndarray]:
    files = sorted((share / "Parasitized").glob("*.webp"))[:20:2] + sorted((share / "Uninfected").glob("*.webp"))[:20:2]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def test_real_cells_are_not_flagged(cells):
    assert [check(signals(c)) for c in cells] == [""] * len(cells)


def test_each_kind_of_unusual_input_gets_its_reason(cells):
    c = cells[0]
    h, w = c.shape[:2]
    gray = np.repeat(c.mean(2, keepdims=True), 3, 2).astype(np.uint8)
    assert check(signals(gray)) == "grayscale"
    loose = np.empty((2 * h, 2 * w, 3), np.uint8)
    loose[:] = (222, 228, 218)
    loose[h // 2 : h // 2 + h, w // 2 : w // 2 + w][c.max(2) > 20] = c[c.max(2) > 20]
    assert check(signals(loose)) == "background not black"
    small = np.zeros((2 * h, 2 * w, 3), np.uint8)  # the cell covers a quarter of the frame
    small[h // 2 : h // 2 + h, w // 2 : w // 2 + w] = c
    assert check(signals(small)) == "cell too small in frame"
    two = np.zeros((h, 2 * w + 10, 3), np.uint8)  # the same cell twice, side by side
    two[:, :w], two[:, w + 10 :] = c, c
    assert check(signals(two)) == "not a single cell"
    rng = np.random.default_rng(0)
    assert check(signals(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))) != ""
    disk = np.zeros((128, 128, 3), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    inside = (yy - 64) ** 2 + (xx - 64) ** 2 <= 50**2
    disk[inside] = rng.integers(0, 256, (int(inside.sum()), 3), dtype=np.uint8)
    assert check(signals(disk)) == "unusual colours"
    assert check(signals(np.zeros((64, 64, 3), np.uint8))) == "not a single cell"  # blank black


def test_a_field_photo_is_not_a_single_cell():
    photo = np.asarray(Image.open(IML / "fields" / "PA171690.JPG").convert("RGB"))
    assert check(signals(photo)) == "not a single cell"


def test_classifier_and_cli_label_flagged_inputs_unknown(share, tmp_path):
    cell = sorted((share / "Parasitized").glob("*.webp"))[0]
    gray = tmp_path / "gray.png"
    Image.open(cell).convert("L").save(gray)
    clf = Classifier.load()
    ok, flagged = clf.predict([cell, gray])
    assert ok.flag == "" and ok.label == ok.raw_label
    assert flagged.flag == "grayscale" and flagged.label == "Unknown" and flagged.raw_label in clf.class_names
    assert flagged.probability is not None  # a prediction and a flag, never silence
    raw = Classifier.load(unknown_when_flagged=False).predict(gray)[0]
    assert raw.label == raw.raw_label and raw.flag == "grayscale"
    out = CliRunner().invoke(app, ["predict", str(cell), str(gray), "-f", "csv"])
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["flag"] for r in rows] == ["", "grayscale"] and rows[1]["label"] == "Unknown"
    out = CliRunner().invoke(app, ["predict", str(gray), "-f", "csv", "--raw-labels"])
    (row,) = csv.DictReader(io.StringIO(out.stdout))
    assert row["label"] in ("Parasitized", "Uninfected") and row["flag"] == "grayscale"


def test_segment_puts_a_loose_crop_back_on_black(cells):
    c = cells[3]
    h, w = c.shape[:2]
    loose = np.empty((2 * h, 2 * w, 3), np.uint8)
    loose[:] = (222, 228, 218)
    loose[h // 2 : h // 2 + h, w // 2 : w // 2 + w][c.max(2) > 20] = c[c.max(2) > 20]
    auto, off = Classifier.load(segment="auto"), Classifier.load(segment="off")
    (crop,) = auto.predict(c)
    (seg,) = auto.predict(loose)
    (raw,) = off.predict(loose)
    assert crop.flag == "" and seg.flag == ""  # segmented: looks like a training cell again
    assert raw.flag == "background not black" and raw.label == "Unknown"
    assert abs(seg.probability - crop.probability) < 0.1  # and the model answers as for the NIH crop
    with pytest.raises(ValueError, match="segment"):
        Classifier.load(segment="sometimes")


def test_serve_takes_an_operating_point(share):
    from fastapi.testclient import TestClient

    from malaria_cells.serve import ServeConfig, create_app

    app = create_app(config=ServeConfig(operating_point="high_specificity"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        card = client.get("/api/v1/model").json()
        points = card["operating_points"]
        assert card["threshold_in_use"] == pytest.approx(points["high_specificity"]) != card["threshold"]
        cell = sorted((share / "Parasitized").glob("*.webp"))[0]
        body = client.post("/api/v1/predict", files=[("files", (cell.name, cell.read_bytes()))]).json()
        assert body["results"][0]["threshold"] == pytest.approx(points["high_specificity"])
