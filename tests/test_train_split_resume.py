"""`train --split-file` takes the split.csv of `data split`; `train --resume RUN --epochs N` trains a run on."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from malaria_cells import data as D
from malaria_cells.cli import app
from malaria_cells.config import resolve_config
from malaria_cells.errors import EXIT_USAGE, ConfigError
from malaria_cells.run import Run
from malaria_cells.split import SPLITS, LeakageError, make_split
from malaria_cells.train import train

FAST = dict(model="custom-cnn", input_size=32, batch_size=16, patience=100, threads=1, precision="fp32")


def _real_subset(share: Path, out: Path, *, infected: int = 8, uninfected: int = 4, per_class: int = 8) -> Path:
    """A few real patients of the share (``per_class`` cells of each of their classes), copied to ``out``."""
    by_patient: dict[str, list[D.CellImage]] = defaultdict(list)
    for im in D.scan(share).images:
        by_patient[im.patient].append(im)
    patients = sorted(by_patient, key=D.patient_sort_key)
    inf = [p for p in patients if any(im.label for im in by_patient[p])][:infected]
    clean = [p for p in patients if not any(im.label for im in by_patient[p])][:uninfected]
    for p in inf + clean:
        for label in (0, 1):
            for im in [im for im in by_patient[p] if im.label == label][:per_class]:
                dest = out / im.rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(im.path, dest)
    return out


def _split_rows(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as f:
        return {r["rel"]: (r["split"], r["patient"]) for r in csv.DictReader(f)}


def _patients_by_split(rows: dict[str, tuple[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for s, p in rows.values():
        out[s].add(p)
    return dict(out)


def test_train_takes_the_split_file_of_data_split(share: Path, tmp_path: Path) -> None:
    data = _real_subset(share, tmp_path / "cells")
    split_csv = tmp_path / "split.csv"
    res = CliRunner().invoke(app, ["data", "split", "--data", str(data), "--out", str(split_csv), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "--split-file" in res.output  # data split says how to use its file
    made = _split_rows(split_csv)
    # The file's split differs from the one train would make itself (seed 0), so using it is visible.
    found = D.scan(data).images
    own = make_split(found, seed=0)
    assert {w: set(own.patients(found, w)) for w in SPLITS} != _patients_by_split(made)
    run = tmp_path / "run"
    n_images = len(made)
    args = ["train", "--data", str(data), "--out", str(run), "--split-file", str(split_csv), "--epochs", "1"]
    args += ["--max-images", str(n_images * 3 // 4)]  # a quick subset of the file's images, not of the folder's
    args += ["--input-size", "32", "--batch-size", "16", "--threads", "1", "--precision", "fp32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    used = _split_rows(run / "split.csv")
    assert len(used) < n_images  # max_images subsampled the file's images
    assert all(made[rel][0] == s for rel, (s, _) in used.items())  # every image in the file's split
    assert _patients_by_split(used) == _patients_by_split(made)  # exactly the file's patients in each split
    assert Run(run).config().split_file == str(split_csv)
    assert json.loads((run / "metadata.json").read_text())["epochs_run"] == 1


def test_a_split_file_that_is_missing_or_leaks_stops_before_training(tmp_path: Path, synthetic_data: Path) -> None:
    cfg = resolve_config(overrides={**FAST, "epochs": 1, "split_file": str(tmp_path / "none.csv")})
    with pytest.raises(ConfigError, match="data split"):
        train(config=cfg, data_dir=synthetic_data, run_dir=tmp_path / "r1")
    leaky = tmp_path / "leaky.csv"
    leaky.write_text("rel,label,patient,split,kind\nA/x.png,0,C1,train,patient\nA/y.png,0,C1,test,patient\n")
    with pytest.raises(LeakageError, match="cross splits"):
        train(config=cfg.replace(split_file=str(leaky)), data_dir=synthetic_data, run_dir=tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def _history(run: Path) -> list[dict]:
    return Run(run).history()


def test_resume_with_more_epochs_trains_a_finished_run_on(tmp_path: Path, synthetic_data: Path) -> None:
    run = train(config=resolve_config(overrides={**FAST, "epochs": 2}), data_dir=synthetic_data, run_dir=tmp_path / "r")
    before = _history(run)
    data = ["--data", str(synthetic_data)]

    res = CliRunner().invoke(app, ["train", "--resume", str(run), *data])
    assert res.exit_code == EXIT_USAGE and "already finished after 2 epoch(s)" in res.output
    assert "--epochs" in res.output
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2", *data])
    assert res.exit_code == EXIT_USAGE and "adds none" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "4", "--lr", "0.1", *data])
    assert res.exit_code == EXIT_USAGE and "--lr" in res.output  # the run's config decides everything else
    assert _history(run) == before  # none of the refusals touched the run

    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "4", *data])
    assert res.exit_code == 0, res.output
    after = _history(run)
    assert [r["epoch"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before  # the first two epochs are the finished run's, not retrained
    meta = Run.open(run).meta
    assert meta.epochs_run == 4 and Run(run).config().epochs == 4


def test_resume_refuses_to_extend_a_run_that_stopped_early(tmp_path: Path, synthetic_data: Path) -> None:
    run = train(config=resolve_config(overrides={**FAST, "epochs": 1}), data_dir=synthetic_data, run_dir=tmp_path / "r")
    r = Run(run)
    r.save_meta({**r.meta.to_dict(), "stopped": "early stop (no better val AUC for 5 epochs)"})
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "3", "--data", str(synthetic_data)])
    assert res.exit_code == EXIT_USAGE and "stopped by itself" in " ".join(res.output.split())
    assert len(_history(run)) == 1 and Run(run).finished


def test_a_one_class_validation_split_stops_before_training(tmp_path: Path, synthetic_data: Path) -> None:
    # Its val AUC (which picks the best epoch and the threshold) is undefined: once this trained to the end and then
    # failed on best.safetensors, which no epoch had written.
    images = D.scan(synthetic_data).images
    healthy = sorted({im.patient for im in images} - {im.patient for im in images if im.label == 1})
    infected = sorted({im.patient for im in images if im.label == 1})
    which = {healthy[0]: "val", infected[0]: "test"}
    split_csv = tmp_path / "split.csv"
    with split_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rel", "label", "patient", "split", "kind"])
        for im in images:
            w.writerow([im.rel, im.label, im.patient, which.get(im.patient, "train"), "patient"])
    cfg = resolve_config(overrides={**FAST, "epochs": 1, "split_file": str(split_csv)})
    with pytest.raises(ConfigError, match="val split holds only Uninfected cells") as e:
        train(config=cfg, data_dir=synthetic_data, run_dir=tmp_path / "run")
    assert e.value.code == "split_one_class"
    assert not (tmp_path / "run").exists()
