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
    # PPV at real smears' prevalence, from the same sensitivity and specificity (Bayes' rule)
    sens, spec = m["metrics"]["sensitivity"]["value"], m["metrics"]["specificity"]["value"]
    at1 = m["at_prevalence"]["0.01"]
    assert abs(at1["ppv"] - sens * 0.01 / (sens * 0.01 + (1 - spec) * 0.99)) < 1e-9
    assert at1["ppv"] < m["at_prevalence"]["0.5"]["ppv"] and "| 1% |" in report


def _split_rows(run: Path) -> list[list[str]]:
    return [line.split(",") for line in (run / "split.csv").read_text().splitlines()[1:]]


def _evaluate_subset(run: Path, share: Path, rows: list[list[str]], folder: Path, n_boot: int) -> dict:
    """Symlink the given split.csv rows' images into a folder and evaluate it with "--split all"."""
    for rel, *_ in rows:
        dst = folder / "cells" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((share / rel).resolve())
    r = _cli(
        "evaluate",
        str(run),
        "--data",
        str(folder / "cells"),
        "--split",
        "all",
        "--n-boot",
        str(n_boot),
        "--out",
        str(folder / "ev"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((folder / "ev" / "metrics.json").read_text())


def test_evaluate_all_on_a_folder_of_other_patients(real_run, share, tmp_path):
    # Only test patients' cells: "--split all" scores every image with the run's stored threshold and finds no
    # overlap with the patients the run trained or validated on.
    test_rows = [r for r in _split_rows(real_run) if r[3] == "test"]
    m = _evaluate_subset(real_run, share, test_rows, tmp_path, n_boot=200)
    meta = json.loads((real_run / "metadata.json").read_text())
    assert m["threshold"] == meta["threshold"] and m["overlapping_patients"] == []
    assert m["n_cells"] == len(test_rows)


def test_evaluate_all_warns_when_patients_overlap(real_run, share, tmp_path):
    # Three training patients' cells: "--split all" still scores them, but says they were seen.
    rows = _split_rows(real_run)
    seen = sorted({r[2] for r in rows if r[3] == "train"})[:3]
    m = _evaluate_subset(real_run, share, [r for r in rows if r[2] in seen], tmp_path, n_boot=50)
    assert m["overlapping_patients"] == seen
    assert "optimistic" in (tmp_path / "ev" / "report.md").read_text()
