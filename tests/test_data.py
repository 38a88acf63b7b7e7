"""Data layer: patient ids, scanning folders and archives, data check, data location."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_cells import data as D

# Every name shape of the share's README, plus ones that must not parse.
NAME_CASES = [
    ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100"),
    ("C12NThinF_IMG_20150614_124212_cell_164.png", "C12"),
    ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
    ("C3thin_original_IMG_20150608_162922_cell_141.png", "C3"),
    ("C37BP2_thinF_IMG_20150620_133205a_cell_87.png", "C37"),
    ("C47P8thin_Original_Motic_IMG_20150629_131521_cell_13.png", "C47"),
    ("C47P8thinOriginalOlympusCX21_IMG_20150630_105022_cell_3.png", "C47"),
    ("C201ThinF_IMG_20151029_110604_cell_15.webp", "C201"),
    ("C62P23N_ThinF_IMG_20150818_132453_cell_24.png", "C62"),
    ("C007P1ThinF_IMG_1_cell_1.png", "C7"),  # leading zeros do not make another patient
    ("Thumbs.db", None),
    ("IMG_20150918_144104_cell_162.png", None),
    ("CP61ThinF_IMG_1_cell_1.png", None),
    ("c100P61ThinF_IMG_1_cell_1.png", None),  # lower-case c is not the NIH convention; reported, not guessed
    ("C100.png", None),
]


@pytest.mark.parametrize(("name", "patient"), NAME_CASES)
def test_parse_patient_id(name, patient):
    assert D.parse_patient_id(name) == patient


def test_share_names_all_parse(share):
    # Every file of the real share has a patient id, and C47's two prefixes are one patient.
    found = D.scan(share)
    assert not found.problems
    assert len({im.patient for im in found.images}) == 150
    prefixes = {D.slide_prefix(Path(im.rel).name) for im in found.images if im.patient == "C47"}
    assert prefixes == {"C47P8thin_Original_Motic", "C47P8thinOriginalOlympusCX21"}


def test_scan_folder_any_case_and_formats(tmp_path, synthetic_data):
    root = tmp_path / "mixed"
    (root / "PARASITIZED").mkdir(parents=True)
    (root / "uninfected").mkdir()
    img = Image.new("RGB", (30, 30), (200, 100, 100))
    img.save(root / "PARASITIZED" / "C1P1ThinF_IMG_1_cell_1.webp", lossless=True)
    img.save(root / "PARASITIZED" / "C1P1ThinF_IMG_1_cell_2.jpg")
    img.save(root / "uninfected" / "C1P1ThinF_IMG_1_cell_3.png")
    (root / "uninfected" / "Thumbs.db").write_bytes(b"junk")
    (root / "uninfected" / "notes_IMG_1.png").write_bytes(b"x")
    found = D.scan(root)
    assert [(Path(i.rel).suffix, i.label, i.patient) for i in found.images] == [
        (".webp", 1, "C1"),
        (".jpg", 1, "C1"),
        (".png", 0, "C1"),
    ]
    reasons = dict(found.problems)
    assert "not an image" in reasons[str(root / "uninfected" / "Thumbs.db")]
    assert "no patient id" in reasons[str(root / "uninfected" / "notes_IMG_1.png")]


def test_scan_official_zip_layout(tmp_path, synthetic_data):
    archive = tmp_path / "cell_images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(synthetic_data.rglob("*.png")):
            zf.write(p, f"cell_images/{p.parent.name}/{p.name}")
        zf.writestr("cell_images/Parasitized/Thumbs.db", b"junk")
    from_zip = D.scan(archive)
    from_dir = D.scan(synthetic_data)
    assert len(from_zip.images) == len(from_dir.images) == 120
    assert sorted((Path(i.rel).name, i.label) for i in from_zip.images) == sorted(
        (Path(i.rel).name, i.label) for i in from_dir.images
    )
    assert from_zip.images[0].path.startswith(f"{archive}::cell_images/")
    assert (
        D.read_bytes(from_zip.images[0].path)
        == Path(synthetic_data / from_zip.images[0].rel.split("/", 1)[1]).read_bytes()
    )


def _png_bytes(size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (180, 90, 120)).save(buf, "PNG")
    return buf.getvalue()


def test_check_reports_bad_files_and_duplicates(tmp_path):
    root = tmp_path / "d"
    par, uni = root / "Parasitized", root / "Uninfected"
    par.mkdir(parents=True)
    uni.mkdir()
    good = _png_bytes()
    (par / "C1P1ThinF_IMG_1_cell_1.png").write_bytes(good)
    (uni / "C1P1ThinF_IMG_1_cell_2.png").write_bytes(good)  # duplicate content across classes
    (uni / "C2NThinF_IMG_1_cell_1.png").write_bytes(_png_bytes((50, 30)))
    (par / "C1P1ThinF_IMG_1_cell_3.png").write_bytes(b"")  # zero bytes
    (par / "C1P1ThinF_IMG_1_cell_4.png").write_bytes(good[: len(good) // 2])  # truncated
    (par / "C1P1ThinF_IMG_1_cell_5.png").write_bytes(b"this is text, not a picture")  # not an image
    report = D.check(root, n_workers=1)
    reasons = {Path(p).name: r for p, r in report.problems}
    assert "empty" in reasons["C1P1ThinF_IMG_1_cell_3.png"]
    assert "truncated" in reasons["C1P1ThinF_IMG_1_cell_4.png"]
    assert "not an image" in reasons["C1P1ThinF_IMG_1_cell_5.png"]
    assert report.ok == 3
    assert report.summary["classes"] == {"Uninfected": 2, "Parasitized": 1}
    assert report.summary["n_infected_patients"] == 1 and report.summary["n_uninfected_only_patients"] == 1
    assert report.width_range == (40, 50) and report.height_range == (30, 40)
    assert [[Path(p).name for p in g] for g in report.duplicates] == [
        ["C1P1ThinF_IMG_1_cell_1.png", "C1P1ThinF_IMG_1_cell_2.png"]
    ]


def test_check_cli_exit_code(tmp_path, synthetic_data):
    from typer.testing import CliRunner

    from malaria_cells.cli import app

    ok = CliRunner().invoke(app, ["data", "check", str(synthetic_data), "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    (synthetic_data / "Parasitized" / "C101P1ThinF_IMG_9_cell_99.png").write_bytes(b"")
    bad = CliRunner().invoke(app, ["data", "check", str(synthetic_data), "--workers", "1"])
    assert bad.exit_code == 1
    assert "C101P1ThinF_IMG_9_cell_99.png" in bad.output.replace("\n", "")


def test_resolve_data_dir_order(tmp_path, monkeypatch, synthetic_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    assert D.resolve_data_dir(synthetic_data) == synthetic_data  # --data wins
    monkeypatch.setenv(D.DATA_ENV, str(synthetic_data))
    assert D.resolve_data_dir(None) == synthetic_data  # then the environment variable
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="does not exist"):
        D.resolve_data_dir(None)
    monkeypatch.delenv(D.DATA_ENV)
    (tmp_path / "data" / "cell_images").mkdir(parents=True)
    assert D.resolve_data_dir(None) == Path("data/cell_images")  # then ./data/cell_images
    (tmp_path / "data" / "cell_images").rmdir()
    with pytest.raises(D.DataError, match="data fetch"):  # nothing: say how to get the data
        D.resolve_data_dir(None)


def test_manifest_hash_changes_with_content(synthetic_data):
    h1 = D.scan(synthetic_data).manifest_hash
    assert D.scan(synthetic_data).manifest_hash == h1
    f = next((synthetic_data / "Uninfected").glob("*.png"))
    Image.fromarray(np.zeros((10, 90, 3), np.uint8)).save(f)
    assert D.scan(synthetic_data).manifest_hash != h1


def test_read_bytes_of_files_and_zip_members(tmp_path):
    from malaria_cells import io as mio

    assert D.read_bytes is mio.read_bytes and D.ZIP_SEP == mio.ZIP_SEP == "::"  # one reader, used below data too
    (tmp_path / "a.bin").write_bytes(b"abc")
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dir/m.png", b"member")
    assert D.read_bytes(str(tmp_path / "a.bin")) == b"abc"
    assert D.read_bytes(f"{archive}::dir/m.png") == b"member"
    for missing in (f"{archive}::dir/none.png", f"{tmp_path / 'none.zip'}::m.png", str(tmp_path / "none.bin")):
        with pytest.raises(OSError):
            D.read_bytes(missing)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(OSError):
        D.read_bytes(f"{tmp_path / 'broken.zip'}::m.png")
