"""Tests for malaria_cells.evaluate's model loading: a run folder or an exported ONNX file, through one Backend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells import evaluate as EV
from malaria_cells.cli import app
from malaria_cells.errors import ModelError


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


def _probs(folder: Path) -> dict[str, float]:
    with open(folder / "predictions.csv", newline="") as f:
        return {row["rel"]: float(row["prob_parasitized"]) for row in csv.DictReader(f)}


def test_cli_evaluates_an_onnx_file_on_all_images(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, data, cache = tiny_run(base)
    monkeypatch.setenv("MALARIA_CELLS_CACHE", str(cache))
    model = tiny_onnx(base)
    args = ["--data", str(data), "--split", "all", "--n-boot", "50"]
    res = CliRunner().invoke(app, ["evaluate", str(model), *args, "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    n_images = sum(1 for _ in data.rglob("*.png"))
    assert m["backend"] == "onnx" and m["model"] == "custom-cnn" and m["n_cells"] == n_images
    assert m["overlap_checked"] is False and m["overlapping_patients"] == []  # no split.csv inside an ONNX file
    assert m["threshold"] == pytest.approx(json.loads((run / "metadata.json").read_text())["threshold"])
    report = (tmp_path / "onnx" / "report.md").read_text()
    assert "exported ONNX" in report and "could not be checked" in report
    # The same cells through the run folder: the same model, so (nearly) the same probabilities. The run is scored
    # at precision "auto" (bf16 on CPUs that have it), hence the tolerance.
    res = CliRunner().invoke(app, ["evaluate", str(run), *args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert r["backend"] == "torch" and r["overlap_checked"] is True and r["n_cells"] == m["n_cells"]
    a, b = _probs(tmp_path / "onnx"), _probs(tmp_path / "run")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 0.02


def test_onnx_default_out_dir_sits_beside_the_file(tmp_path: Path) -> None:
    assert EV.default_out_dir(tmp_path / "m.onnx", "all") == tmp_path / "m-eval-all"
    assert EV.default_out_dir(tmp_path, "test") == tmp_path / "eval-test"


def test_onnx_file_refuses_a_run_split(base: Path, tmp_path: Path) -> None:
    _, data, _ = tiny_run(base)
    res = CliRunner().invoke(app, ["evaluate", str(tiny_onnx(base)), "--data", str(data), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--split all" in res.output.replace("\n", " "), res.output
    assert "Traceback" not in res.output
    with pytest.raises(ModelError, match="split"):
        EV.predict_split(model=tiny_onnx(base), data_dir=data, split="test")


def test_views_average_with_either_backend(base: Path) -> None:
    # Test-time augmentation is a transform of the uint8 batch, so the ONNX backend runs it as the torch one does.
    run, data, cache = tiny_run(base)
    views = [lambda x: x, lambda x: x[:, :, ::-1]]
    for model in (tiny_onnx(base), run):
        plain = EV.predict_split(model=model, data_dir=data, split="all", cache_dir=str(cache))
        flipped = EV.predict_split(model=model, data_dir=data, split="all", views=views[1:], cache_dir=str(cache))
        both = EV.predict_split(model=model, data_dir=data, split="all", views=views, cache_dir=str(cache))
        assert both.prob == pytest.approx((plain.prob + flipped.prob) / 2, abs=1e-5)
        assert not np.allclose(plain.prob, flipped.prob)  # the view changed something
    old_name = EV.predict_split(run_dir=run, data_dir=data, split="test", cache_dir=str(cache))  # ensemble's call
    assert old_name.backend == "torch" and old_name.overlap == [] and len(old_name.images) > 0
