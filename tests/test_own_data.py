"""`evaluate` on any labelled folder: patient ids from NIH names, a CSV, a regex or none; skipped files named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells import data as D
from malaria_cells.cli import app
from malaria_cells.errors import EXIT_DATA, EXIT_USAGE, ConfigError


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.getbasetemp() / "deploy")


def _own_folder(tmp_path: Path, base: Path, *, name: str) -> tuple[Path, dict[str, str]]:
    """The tiny data set's cells under new names (``name.format(patient=, i=)``); returns (folder, rel -> patient)."""
    _, data, _ = tiny_run(base)
    out = tmp_path / "own"
    truth: dict[str, str] = {}
    for cls in ("Parasitized", "Uninfected"):
        (out / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((data / cls).glob("*.png"))):
            patient = D.parse_patient_id(src.name)
            rel = f"{cls}/{name.format(patient=patient, i=i)}"
            shutil.copy(src, out / rel)
            truth[rel] = patient
    return out, truth


def _evaluate(model: Path, data: Path, out: Path, *extra: str):
    args = ["evaluate", str(model), "--data", str(data), "--split", "all", "--n-boot", "50", "--out", str(out)]
    return CliRunner().invoke(app, [*args, *extra])


def test_a_folder_without_patient_ids_says_why_and_how(model: Path, tmp_path: Path) -> None:
    folder, _ = _own_folder(tmp_path, model.parent, name="cell_{i:03d}.png")
    res = _evaluate(model, folder, tmp_path / "eval")
    text = " ".join(res.output.split())
    assert res.exit_code == EXIT_DATA, res.output
    assert "no patient id in file names like cell_" in text and "--patients" in text and "--patient-regex" in text
    assert "no images to cache" not in text and "Traceback" not in text
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_patients_from_a_csv_and_unlisted_files_named(model: Path, tmp_path: Path) -> None:
    folder, truth = _own_folder(tmp_path, model.parent, name="cell_{i:03d}.png")
    rels = sorted(truth)
    left_out = rels[:2]
    table = tmp_path / "patients.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient"])
        for k, rel in enumerate(rels[2:]):
            # a relative path or, for every other row, the bare name where it is unique in the folder
            unique = sum(r.rsplit("/", 1)[-1] == rel.rsplit("/", 1)[-1] for r in rels) == 1
            w.writerow([rel.rsplit("/", 1)[-1] if k % 2 and unique else rel, f"P-{truth[rel]}"])
    res = _evaluate(model, folder, tmp_path / "eval", "--patients", str(table))
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_cells"] == len(rels) - 2
    assert m["n_patients"] == len({truth[r] for r in rels[2:]})
    assert {r["patient"] for r in m["per_patient"]} == {f"P-{truth[r]}" for r in rels[2:]}
    assert sorted(Path(s["path"]).relative_to(folder).as_posix() for s in m["skipped"]) == left_out
    skipped = next(w for w in m["warnings"] if w.startswith("skipped"))
    assert "skipped 2 of" in skipped and all(Path(r).name in skipped for r in left_out)
    assert "skipped 2 of" in " ".join(res.output.split())  # the CLI prints the library's warning
    assert "Patient ids: patients file" in (tmp_path / "eval" / "report.md").read_text()


def test_patients_from_a_regex_warns_when_they_are_few(model: Path, tmp_path: Path) -> None:
    folder, truth = _own_folder(tmp_path, model.parent, name="{patient}_cell_{i:03d}.png")
    # Three "patients" from a regex on the name: too few for a patient bootstrap, and the warning says so.
    res = _evaluate(model, folder, tmp_path / "eval", "--patient-regex", r"^C(\d)")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = {r.rsplit("/", 1)[-1][1] for r in truth}
    assert {r["patient"] for r in m["per_patient"]} == expected
    assert len(expected) < 10 and any(f"only {len(expected)} patient(s)" in w for w in m["warnings"])
    assert m["n_cells"] == len(truth) and not m["skipped"]


def test_without_patient_ids_every_file_is_its_own_group(model: Path, tmp_path: Path) -> None:
    folder, truth = _own_folder(tmp_path, model.parent, name="cell_{i:03d}.png")
    res = _evaluate(model, folder, tmp_path / "eval", "--no-patient-ids")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_cells"] == m["n_patients"] == len(truth) and m["patient_ids_kind"] == "none"
    assert any("ignore patient clustering" in w for w in m["warnings"])
    assert m["per_patient"] == []  # a table of single cells says nothing per patient
    assert "ignore patient clustering" in " ".join(res.output.split())


def test_patient_id_flags_are_exclusive_and_a_bad_regex_is_a_usage_error(model: Path, tmp_path: Path) -> None:
    folder, _ = _own_folder(tmp_path, model.parent, name="cell_{i:03d}.png")
    res = _evaluate(model, folder, tmp_path / "e1", "--patient-regex", "(x)", "--no-patient-ids")
    assert res.exit_code == EXIT_USAGE and "one of" in res.output
    res = _evaluate(model, folder, tmp_path / "e2", "--patient-regex", "cell_[0-9]+")
    assert res.exit_code == EXIT_USAGE and "no group" in res.output


def test_patients_csv_rules(tmp_path: Path) -> None:
    table = tmp_path / "p.csv"
    table.write_text("file,patient\n./Parasitized/a.png,P1\nb.png,P3\nd.png,P5\nd.png,P6\n")
    ids = D.PatientIds.from_csv(table)
    assert ids.patient("Parasitized/a.png") == "P1"
    assert ids.patient("Uninfected/a.png") is None  # a path names one file, not every file of that name
    assert ids.patient("Uninfected/b.png") == ids.patient("x/Parasitized/b.png") == "P3"  # a bare name: any folder
    assert ids.patient("Uninfected/d.png") is None  # one name, two patients: never guessed
    assert ids.patient("Uninfected/c.png") is None and "not listed" in ids.missing_reason
    bad = tmp_path / "bad.csv"
    bad.write_text("name,id\na.png,P1\n")
    with pytest.raises(D.DataError, match="file,patient") as err:
        D.PatientIds.from_csv(bad)
    assert err.value.code == "patients_file_invalid"
    with pytest.raises(ConfigError, match="no group"):
        D.PatientIds.from_regex(r"P\d+")
    with pytest.raises(ConfigError, match="not a valid regex"):
        D.PatientIds.from_regex("(P")


def test_skipped_summary_names_the_first_few_and_counts_the_rest() -> None:
    problems = [(f"/d/Uninfected/x{i}.png", "no id") for i in range(8)] + [("/d/Parasitized/r.txt", "not an image")]
    line = D.skipped_summary(problems, total=20)
    assert line.startswith("skipped 9 of 20 file(s)")
    assert "no id (8: x0.png, x1.png, x2.png, x3.png, x4.png and 3 more)" in line and "not an image (1: r.txt)" in line
    assert D.skipped_summary([]) is None
