"""End to end on real cells: train the custom CNN on a small subset of the share, evaluate on other patients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from malaria_cells.split import load_split


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MALARIA_CELLS_QUIET="1")
    return subprocess.run([sys.executable, "-m", "malaria_cells.cli", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def real_run(share, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "run"
    r = _cli("train", "--data", str(share), "--out", str(run), "--max-images", "2400", "--epochs", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_train_then_evaluate_on_test_patients(real_run, share):
    r = _cli("evaluate", str(real_run), "--data", str(share), "--n-boot", "1000")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((real_run / "eval-test" / "metrics.json").read_text())
    split = load_split(real_run / "split.csv")  # also re-checks that no patient crosses splits
    assert split.kind == "patient"
    train_patients = {
        line.split(",")[2] for line in (real_run / "split.csv").read_text().splitlines()[1:] if ",train," in line
    }
    test_patients = {row["patient"] for row in m["per_patient"]}
    assert not train_patients & test_patients  # scored on patients the model never saw
    # 4 short epochs on 1,680 training cells: clearly above chance (0.5), not a claim about the full model
    assert m["metrics"]["accuracy"]["value"] > 0.80, m["metrics"]["accuracy"]
    assert m["metrics"]["roc_auc"]["value"] > 0.88, m["metrics"]["roc_auc"]
    lo, hi = m["metrics"]["accuracy"]["low"], m["metrics"]["accuracy"]["high"]
    assert lo <= m["metrics"]["accuracy"]["value"] <= hi and hi - lo > 0  # a real patient-bootstrap interval
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["resamples"] == 1000
    for png in ("roc.png", "pr.png", "confusion.png", "reliability.png", "training_curves.png"):
        assert (real_run / "eval-test" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (real_run / "eval-test" / "report.md").read_text()
    assert "Sensitivity" in report and "Per patient" in report


def test_evaluate_all_on_a_folder_of_other_patients(real_run, share, tmp_path):
    # A folder holding only test patients' cells (symlinks): "--split all" scores every image with the run's
    # stored threshold, and finds no overlap with the training patients.
    rows = [line.split(",") for line in (real_run / "split.csv").read_text().splitlines()[1:]]
    for rel, _label, _patient, split, _kind in rows:
        if split == "test":
            dst = tmp_path / "other" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to((share / rel).resolve())
    r = _cli(
        "evaluate",
        str(real_run),
        "--data",
        str(tmp_path / "other"),
        "--split",
        "all",
        "--n-boot",
        "200",
        "--out",
        str(tmp_path / "ev"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    meta = json.loads((real_run / "metadata.json").read_text())
    assert m["threshold"] == meta["threshold"] and m["overlapping_patients"] == []
    assert m["n_cells"] == sum(1 for r in rows if r[3] == "test")


def test_evaluate_all_warns_when_patients_overlap(real_run, share, tmp_path):
    # Three training patients' cells in a folder: "--split all" still scores them, but says they were seen.
    rows = [line.split(",") for line in (real_run / "split.csv").read_text().splitlines()[1:]]
    seen = sorted({r[2] for r in rows if r[3] == "train"})[:3]
    for rel, _label, patient, _split, _kind in rows:
        if patient in seen:
            dst = tmp_path / "mixed" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to((share / rel).resolve())
    r = _cli(
        "evaluate",
        str(real_run),
        "--data",
        str(tmp_path / "mixed"),
        "--split",
        "all",
        "--n-boot",
        "50",
        "--out",
        str(tmp_path / "ev"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["overlapping_patients"] == seen
    assert "optimistic" in (tmp_path / "ev" / "report.md").read_text()
