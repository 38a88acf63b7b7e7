"""The smear pipeline: synthetic fields of real NIH cells on a light background (known boxes, touching cells, cells
cut by the border), real development photos end to end through the CLI, bad inputs, and the slide arithmetic."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells.boxes import load_annotations, match
from malaria_cells.errors import EXIT_NOTHING_FOUND, EXIT_OK, EXIT_SOME_INPUTS_FAILED
from malaria_cells.smear import FieldResult, SmearAnalyzer, SmearCell, analyze_smear, crop_cells, summarize

IML = Path(__file__).resolve().parents[1] / ".." / "shared" / "iml-malaria"
BACKGROUND = (222, 228, 218)  # the IML photos' pale background


@pytest.fixture(scope="module")
def iml() -> Path:
    """The IML development photos (required: a missing share fails loudly)."""
    if not (IML / "annotations.json").is_file():
        pytest.fail(f"the IML-Malaria share is missing at {IML.resolve()}")
    return IML


@pytest.fixture(scope="module")
def analyzer() -> SmearAnalyzer:
    return SmearAnalyzer(keep_crops=True)


def synthetic_field(
    share: Path, *, seed: int = 0, size: tuple[int, int] = (960, 720), cell_px: int = 80, gap: float = 1.02
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real NIH cells (their non-black pixels) placed on a light background on a jittered grid.

    ``gap`` < 1.05 makes neighbours touch; the first row and column start outside the photo, so they are cut by the
    border.

    Returns:
        (photo, boxes (N, 4) of every placed cell's visible part, labels (N,) 1 = Parasitized).
    """
    rng = np.random.default_rng(seed)
    files = sorted((share / "Uninfected").glob("*.webp"))[:150] + sorted((share / "Parasitized").glob("*.webp"))[:50]
    width, height = size
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    boxes, labels = [], []
    step = cell_px * gap
    for y in np.arange(-cell_px * 0.4, height, step):
        for x in np.arange(-cell_px * 0.4, width, step):
            if rng.random() < 0.3:
                continue
            f = files[rng.integers(len(files))]
            c = Image.open(f).convert("RGB")
            s = cell_px / max(c.size)
            c = np.asarray(c.resize((max(1, round(c.size[0] * s)), max(1, round(c.size[1] * s))), Image.BILINEAR))
            m = c.max(2) > 20
            x0, y0 = int(x + rng.uniform(-4, 4)), int(y + rng.uniform(-4, 4))
            h, w = c.shape[:2]
            X0, Y0, X1, Y1 = max(0, x0), max(0, y0), min(width, x0 + w), min(height, y0 + h)
            if X1 - X0 < 12 or Y1 - Y0 < 12:
                continue
            sub_m = m[Y0 - y0 : Y1 - y0, X0 - x0 : X1 - x0]
            if sub_m.sum() < 100:  # too little of the cell inside the photo to box
                continue
            img[Y0:Y1, X0:X1][sub_m] = c[Y0 - y0 : Y1 - y0, X0 - x0 : X1 - x0][sub_m]
            ys, xs = np.nonzero(sub_m)
            boxes.append([X0 + xs.min(), Y0 + ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
            labels.append(int(f.parent.name == "Parasitized"))
    return img, np.array(boxes, np.float64), np.array(labels)


def test_finds_the_cells_of_a_synthetic_field(share, analyzer):
    img, boxes, _ = synthetic_field(share)
    r = analyzer.analyze_array(img, name="synthetic")
    det = np.array([[c.x, c.y, c.w, c.h] for c in r.cells], float)
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    inner = (x0 > 3) & (y0 > 3) & (x1 < img.shape[1] - 3) & (y1 < img.shape[0] - 3)
    found, truth = match(det, boxes, iou=0.5)
    assert np.isin(np.nonzero(inner)[0], truth).mean() >= 0.9  # cells not cut by the border: nearly all found
    assert len(found) / max(1, len(det)) >= 0.85  # and few detections are not a placed cell
    # cells cut by the border are flagged and not counted
    flagged = {int(t) for t, f in zip(truth, found, strict=True) if r.cells[f].on_border}
    assert flagged and flagged <= set(np.nonzero(~inner)[0].tolist())
    assert r.n_cells == sum(1 for c in r.cells if not c.on_border and c.label in ("Parasitized", "Uninfected"))


def test_crops_are_in_the_training_form(share, analyzer):
    img, boxes, _ = synthetic_field(share, seed=1)
    whole = boxes[(boxes[:, 0] > 3) & (boxes[:, 1] > 3) & (boxes[:, 2] > 60) & (boxes[:, 3] > 60)][:10]
    crops, areas, ok, dark = crop_cells(img, whole, size=48)
    assert crops.shape == (10, 48, 48, 3) and ok.mean() >= 0.8
    for c in crops[ok]:
        assert c[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 20  # the background is black, like the NIH crops
        assert (c.reshape(-1, 3).max(1) > 20).mean() > 0.3  # and the cell fills the frame
    assert (areas[ok] > 0.3 * 80 * 80).all()
    assert (dark[ok] < 0.5).all()  # pink NIH cells on a pale background are no white-cell nuclei


def test_blank_and_non_blood_photos_find_no_cells(analyzer):
    blank = np.full((480, 640, 3), 235, np.uint8)
    r = analyzer.analyze_array(blank, name="blank")
    assert r.n_cells == 0 and r.warning and "0 cells" in r.warning
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert analyzer.analyze_array(noise, name="noise").n_cells <= 2


def test_unreadable_photo_is_an_error_result_not_an_exception(tmp_path, analyzer):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = analyzer.analyze(bad)
    assert r.error and "broken.jpg" in r.error and r.error_code and r.cells == []


def test_oversized_photo_is_refused_with_its_size(tmp_path, analyzer):
    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 6000), BACKGROUND).save(big)  # 48 MP > the 40 MP limit
    r = analyzer.analyze(big)
    assert r.error_code == "too_many_pixels" and "8000x6000" in r.error


def test_slide_summary_pools_fields_and_skips_failed_ones():
    def field(n: int, k: int) -> FieldResult:
        cells = [SmearCell(i, 0, 0, 9, 9, 50, False, 0.9 if i < k else 0.1, "Parasitized" if i < k else "Uninfected")
                 for i in range(n)]  # fmt: skip
        return FieldResult("f", 100, 100, cells)

    s = summarize("slide", [field(100, 4), field(100, 0), FieldResult("bad", error="unreadable")])
    d = s.to_dict()
    assert (d["photos"], d["failed_photos"], d["cells"], d["infected"]) == (3, 1, 200, 4)
    assert d["parasitemia_pct"] == 2.0 and d["ci95_pct"][0] < 2.0 < d["ci95_pct"][1]


def test_real_photos_match_their_annotations(iml, analyzer):
    truth = load_annotations(iml / "annotations.json")
    # Typical fields (PA171750 is a thick, overlapping area where the annotators boxed a quarter of the cells).
    for name in ("PA171690.JPG", "PA171730.JPG", "PA171806.JPG"):
        r = analyze_smear(iml / "fields" / name, analyzer=analyzer)
        det = np.array([[c.x, c.y, c.w, c.h] for c in r.cells], float)
        found, _ = match(det, truth[name].boxes, iou=0.5)
        assert len(found) / len(truth[name].boxes) >= 0.9, name  # detection recall on a real photo
        assert abs(r.n_cells - len(truth[name].boxes)) / len(truth[name].boxes) < 0.2


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALARIA_CELLS_QUIET": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "malaria_cells.cli", *args], capture_output=True, text=True, env=env)


def test_cli_writes_every_output_for_a_slide(iml, tmp_path):
    slide = tmp_path / "slide-1"
    slide.mkdir()
    for name in ("PA171700.JPG", "PA171701.JPG"):
        (slide / name).symlink_to((iml / "fields" / name).resolve())
    (slide / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    proc = _cli("smear", str(slide), "--out", str(out))
    assert proc.returncode == EXIT_SOME_INPUTS_FAILED, proc.stderr  # the corrupt photo: an error row, the rest go on
    cells = list(csv.DictReader((out / "cells.csv").open()))
    assert list(cells[0]) == ["image", "cell", "x", "y", "w", "h", "area", "on_border", "prob_parasitized", "label"]
    fields = {Path(r["image"]).name: r for r in csv.DictReader((out / "fields.csv").open())}
    assert fields["corrupt.jpg"]["error"] and int(fields["PA171700.JPG"]["cells"]) > 50
    for name in ("PA171700.JPG", "PA171701.JPG"):
        mine = [c for c in cells if Path(c["image"]).name == name]
        counted = [c for c in mine if c["on_border"] == "0" and c["label"] in ("Parasitized", "Uninfected")]
        assert int(fields[name]["cells"]) == len(counted)
        assert int(fields[name]["infected"]) == sum(c["label"] == "Parasitized" for c in counted)
        with Image.open(out / "overlays" / f"{Path(name).stem}.jpg") as im:
            assert im.size == (1280, 960)
    summary = json.loads((out / "summary.json").read_text())
    (s,) = summary["slides"]
    assert s["slide"] == "slide-1" and s["photos"] == 3 and s["failed_photos"] == 1
    assert s["cells"] == sum(int(fields[n]["cells"]) for n in ("PA171700.JPG", "PA171701.JPG"))
    assert s["ci95_pct"][0] <= s["parasitemia_pct"] <= s["ci95_pct"][1]
    with Image.open(out / "infected_cells.png") as im:
        assert im.width >= 8 * 90
    assert "parasitemia" in proc.stderr and "slide-1" in proc.stderr


def test_cli_with_given_boxes_classifies_exactly_those(iml, tmp_path):
    out = tmp_path / "out"
    photo = iml / "fields" / "PA171710.JPG"
    proc = _cli("smear", str(photo), "--boxes", str(iml / "annotations.json"), "--out", str(out), "--no-overlays")
    assert proc.returncode == EXIT_OK, proc.stderr
    rows = list(csv.DictReader((out / "cells.csv").open()))
    truth = load_annotations(iml / "annotations.json")["PA171710.JPG"]
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(int(x), int(y)) for x, y, _, _ in truth.boxes]
    assert not (out / "overlays").exists() or not any((out / "overlays").iterdir())


def test_cli_on_a_blank_photo_says_no_cells(tmp_path):
    photo = tmp_path / "blank.png"
    Image.new("RGB", (640, 480), (240, 240, 240)).save(photo)
    proc = _cli("smear", str(photo), "--out", str(tmp_path / "out"))
    assert proc.returncode == EXIT_NOTHING_FOUND
    assert "0 cells" in (tmp_path / "out" / "fields.csv").read_text()


def test_contact_sheet_keeps_the_most_confident_when_full(iml, tmp_path, monkeypatch, analyzer):
    import malaria_cells.smear as smear

    # Full after one cell, so the replace path runs with any model that calls two or more cells in these photos
    # (the shipped model at its high-specificity point calls 2).
    monkeypatch.setattr(smear, "SHEET_CELLS", 1)
    import malaria_cells.overlay as overlay_module

    drawn: list[list[str]] = []
    real_sheet = overlay_module.contact_sheet

    def spy(crops, captions, **kw):  # the real drawing, with a note of which cells it was given
        drawn.append(list(captions))
        return real_sheet(crops, captions, **kw)

    monkeypatch.setattr(overlay_module, "contact_sheet", spy)  # run_smear imports it when it draws
    photos = [iml / "fields" / n for n in ("PA171700.JPG", "PA171710.JPG")]
    run = smear.run_smear([("s", photos)], out=tmp_path, analyzer=analyzer, overlays=False)
    rows = list(csv.DictReader((tmp_path / "cells.csv").open()))
    called = sorted(
        ((float(r["prob_parasitized"]), r) for r in rows if r["label"] == "Parasitized"), key=lambda t: -t[0]
    )
    assert len(called) > 1 and run.photos == 2
    best = called[0][1]  # the one cell kept is the most confident of all, whichever photo it came from
    assert drawn == [[f"{Path(best['image']).stem}#{best['cell']} {float(best['prob_parasitized']):.2f}"]]
    with Image.open(tmp_path / "infected_cells.png") as im:
        assert im.height < 2 * (96 + 16) + 24  # one row: the one cell kept


def test_public_api_from_the_package_top_imports_no_torch():
    code = (
        "import sys; from malaria_cells import Classifier, analyze_smear, Run, __version__; "
        "assert callable(analyze_smear) and hasattr(Classifier, 'load') and Run; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
