"""Temperature scaling: ECE by hand, the fit recovers a known temperature, thresholds keep their decisions, and a
stored temperature reaches the probabilities of both backends (changing them, not their ranking) through the
operating-points step and the export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy_helpers import tiny_run
from malaria_cells import metrics as M
from malaria_cells.adapt import operating_points, store_operating_points
from malaria_cells.backends import OnnxBackend, TorchBackend, probabilities, probability_from_logit, temperature_of
from malaria_cells.calibrate import calibration_scores, fit_temperature, nll, rescale_threshold, split_logits
from malaria_cells.errors import ConfigError, ModelError
from malaria_cells.export import export_run, synthetic_cells
from malaria_cells.run import Run


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


def _copy_run(base: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    run, data, cache = tiny_run(base)
    dest = tmp_path / "run"
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.onnx"))
    return dest, data, cache


# -- ECE ------------------------------------------------------------------------------------------------------------
def test_ece_by_hand() -> None:
    # 15 bins of width 1/15: 0.1 -> bin 1, 0.5 -> bin 7, 0.9 -> bin 13.
    y = [0, 1, 1, 1, 0]
    p = [0.1, 0.1, 0.9, 0.9, 0.5]
    # bin 1: 2 cells, observed 1/2, mean 0.1 -> 2/5 * 0.4; bin 13: observed 1, mean 0.9 -> 2/5 * 0.1;
    # bin 7: observed 0, mean 0.5 -> 1/5 * 0.5.  Total 0.16 + 0.04 + 0.10 = 0.30.
    assert M.expected_calibration_error(y, p) == pytest.approx(0.30)
    assert M.binary_metrics(y, p)["ece"] == pytest.approx(0.30)
    # two bins [0, 0.5) and [0.5, 1]: 1.0 joins the last bin. |0.5 - 0.3| * 2/4 + |1 - 0.8| * 2/4 = 0.2
    assert M.expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.6, 1.0], n_bins=2) == pytest.approx(0.2)
    assert M.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0  # perfectly confident and right
    assert math.isnan(M.expected_calibration_error([], []))
    with pytest.raises(ValueError):
        M.expected_calibration_error([0, 1], [0.2, 1.2])


def test_ece_function_matches_binary_metrics_on_random_data() -> None:
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 2, 500), rng.random(500)
    assert M.expected_calibration_error(y, p) == pytest.approx(M.binary_metrics(y, p)["ece"], abs=1e-12)


# -- the fit --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(t_true: float) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 40_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)  # labels drawn from sigmoid(z): calibrated at T
    logits = z * t_true  # over- (T > 1) or under-confident (T < 1) by t_true
    fit = fit_temperature(logits, y)
    assert fit.temperature == pytest.approx(t_true, rel=0.05)
    assert not fit.at_bound and fit.cells == z.size
    assert fit.nll_after < fit.nll_before
    assert fit.nll_after == pytest.approx(nll(logits, y, fit.temperature))
    # the fit is a minimum: nudging T either way does not lower the NLL
    for factor in (0.98, 1.02):
        assert nll(logits, y, fit.temperature * factor) >= fit.nll_after
    # and it calibrates: ECE drops to the level of the data's own noise
    before, after = calibration_scores(y, logits), calibration_scores(y, logits, fit.temperature)
    assert after["ece"] < 0.02 < before["ece"]
    assert after["roc_auc"] == pytest.approx(before["roc_auc"])


def test_fit_refuses_one_class_and_reports_a_bound() -> None:
    with pytest.raises(ConfigError, match="both classes"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError):
        fit_temperature(np.array([1.0, np.inf]), np.array([0, 1]))
    # separable cells: sharper is always better, the search ends at its lower bound
    fit = fit_temperature(np.array([-1.0, -0.5, 0.5, 1.0]), np.array([0, 0, 1, 1]))
    assert fit.at_bound and fit.temperature == pytest.approx(math.exp(-3))


def test_rescaled_threshold_makes_the_same_decisions() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, 5000)
    raw = probability_from_logit(z, 1.0).astype(np.float64)
    for t in (0.4, 1.0, 3.0):
        cal = probability_from_logit(z, t).astype(np.float64)
        for thr in (0.05, 0.3, 0.5, 0.8, 0.97):
            moved = rescale_threshold(thr, from_temperature=1.0, to_temperature=t)
            far = np.abs(z - math.log(thr / (1 - thr))) > 1e-4  # away from float ties at the threshold itself
            assert np.array_equal((raw >= thr)[far], (cal >= moved)[far])
            back = rescale_threshold(moved, from_temperature=t, to_temperature=1.0)
            assert back == pytest.approx(thr, rel=1e-9)
    assert rescale_threshold(0.5, from_temperature=1.0, to_temperature=7.0) == pytest.approx(0.5)
    assert rescale_threshold(1.0, from_temperature=1.0, to_temperature=2.0) == 1.0
    assert rescale_threshold(0.0, from_temperature=1.0, to_temperature=2.0) == 0.0
    assert rescale_threshold(0.9, from_temperature=1.0, to_temperature=2.0) < 0.9  # softer: pulled towards 1/2


def test_temperature_of_metadata() -> None:
    assert temperature_of({}) == 1.0 and temperature_of({"temperature": None}) == 1.0
    assert temperature_of({"temperature": 2.5}) == 2.5
    for bad in (0, -1.0, "warm", float("nan")):
        with pytest.raises(ModelError, match="temperature"):
            temperature_of({"temperature": bad})


# -- a stored temperature in the backends ---------------------------------------------------------------------------
def test_stored_temperature_changes_probabilities_not_ranking(base: Path, tmp_path: Path) -> None:
    run, _, _ = _copy_run(base, tmp_path)
    images = synthetic_cells(64, Run.open(run).meta.prep.input_size, seed=3)
    plain = TorchBackend(run, device="cpu")
    assert plain.temperature == 1.0
    z = plain.logits(images)
    p1 = probabilities(plain, images).astype(np.float64)
    meta = Run.open(run).meta.to_dict()
    meta["temperature"] = 3.0
    Run(run).save_meta(meta)
    warm = TorchBackend(run, device="cpu")
    p3 = probabilities(warm, images).astype(np.float64)
    assert warm.temperature == 3.0
    assert np.allclose(p3, 1 / (1 + np.exp(-z / 3.0)), atol=1e-6)
    assert np.abs(p3 - p1).max() > 0.01  # the probabilities moved ...
    order = np.argsort(z, kind="stable")
    assert (np.diff(p1[order]) >= 0).all() and (np.diff(p3[order]) >= 0).all()  # ... their order did not
    y = (z > np.median(z)).astype(int)
    assert M.binary_metrics(y, p3)["roc_auc"] == pytest.approx(M.binary_metrics(y, p1)["roc_auc"])


def test_operating_points_step_fits_stores_and_exports_the_temperature(base: Path, tmp_path: Path) -> None:
    run, data, cache = _copy_run(base, tmp_path)
    before = Run.open(run).meta
    val = split_logits(TorchBackend(run, device="cpu"), run_dir=run, data_dir=data, split="val", cache_dir=str(cache))
    raw = probability_from_logit(val.logits, 1.0)
    stored = store_operating_points(run=run, data=data, cache_dir=str(cache), specificity=0.9, sensitivity=0.9)
    meta = Run.open(run).meta
    t = stored.temperature
    assert t is not None and meta.temperature == pytest.approx(t) and stored.fit.temperature == t
    assert stored.fit.nll_after <= stored.fit.nll_before
    assert "validation cells" in meta.to_dict()["temperature_fitted_on"]
    cal = probability_from_logit(val.logits, t)
    # the default threshold moved to the calibrated scale and decides every validation cell as before
    assert meta.threshold == pytest.approx(stored.threshold)
    assert np.array_equal(raw >= before.threshold, cal >= meta.threshold)
    # the named points are those chosen on the calibrated probabilities
    assert meta.to_dict()["operating_points"] == pytest.approx(
        operating_points(val.labels, cal, specificity=0.9, sensitivity=0.9)
    )
    assert meta.val_metrics_at_threshold["ece"] == pytest.approx(M.expected_calibration_error(val.labels, cal))
    # the backends now return the calibrated probabilities ...
    images = synthetic_cells(16, meta.prep.input_size, seed=4)
    torch_backend = TorchBackend(run, device="cpu")
    assert np.allclose(probabilities(torch_backend, images), probability_from_logit(torch_backend.logits(images), t))
    # ... and the ONNX file carries the temperature with thresholds on its scale
    onnx = Path(export_run(run_dir=run, data_dir=data, cache_dir=str(cache)).path)
    ob = OnnxBackend(onnx)
    assert ob.temperature == pytest.approx(t) and ob.meta["threshold"] == pytest.approx(meta.threshold)
    assert np.abs(probabilities(ob, images) - probabilities(torch_backend, images)).max() <= 1e-4
    # --no-temperature: raw probabilities again, the threshold back where it was
    plain = store_operating_points(run=run, data=data, cache_dir=str(cache), temperature=False)
    meta = Run.open(run).meta
    assert plain.temperature is None and meta.temperature is None and "temperature_fitted_on" not in meta.to_dict()
    assert meta.threshold == pytest.approx(before.threshold, rel=1e-9)
    assert TorchBackend(run, device="cpu").temperature == 1.0


def test_cli_operating_points_stores_a_temperature(base: Path, tmp_path: Path, monkeypatch) -> None:
    from malaria_cells.cli import app

    run, data, cache = _copy_run(base, tmp_path)
    monkeypatch.setenv("MALARIA_CELLS_CACHE", str(cache))
    result = CliRunner().invoke(app, ["operating-points", str(run), "--data", str(data)])
    assert result.exit_code == 0, result.output
    t = Run.open(run).meta.temperature
    assert t is not None and f"temperature       {t:.4f}" in result.output
    result = CliRunner().invoke(app, ["operating-points", str(run), "--data", str(data), "--no-temperature"])
    assert result.exit_code == 0, result.output
    assert Run.open(run).meta.temperature is None and "none (raw probabilities)" in result.output


def test_calibration_benchmark_on_a_tiny_run(base: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    run, data, cache = tiny_run(base)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"
    out, image = tmp_path / "cal.json", tmp_path / "rel.png"
    env = {**os.environ, "MALARIA_CELLS_CACHE": str(cache)}
    cmd = [sys.executable, str(script), "--run", str(run), "--data", str(data), "--out", str(out)]
    proc = subprocess.run([*cmd, "--image", str(image), "--n-boot", "20"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert doc["benchmark"] == "calibration" and doc["command"].startswith("python benchmarks/calibration.py --run")
    val = split_logits(TorchBackend(run, device="cpu"), run_dir=run, data_dir=data, split="val", cache_dir=str(cache))
    assert res["temperature"] == pytest.approx(fit_temperature(val.logits, val.labels).temperature)
    test = split_logits(TorchBackend(run, device="cpu"), run_dir=run, data_dir=data, split="test", cache_dir=str(cache))
    for when, t in (("before", 1.0), ("after", res["temperature"])):
        s = res["test"][when]
        assert s["ece"] == pytest.approx(
            M.expected_calibration_error(test.labels, probability_from_logit(test.logits, t))
        )
        assert s["cells"] == len(test.labels) and s["ece_ci"][0] <= s["ece"] + 1e-12
    assert res["test"]["before"]["roc_auc"] == pytest.approx(res["test"]["after"]["roc_auc"])  # ranking kept
    assert res["meets_target"] == (res["test"]["after"]["ece"] <= 0.02)
    assert image.read_bytes().startswith(b"\x89PNG")


def test_a_run_with_tta_thresholds_refuses_a_new_temperature(base: Path, tmp_path: Path) -> None:
    run, data, cache = _copy_run(base, tmp_path)
    meta = Run.open(run).meta.to_dict()
    meta["tta_threshold"] = 0.5
    Run(run).save_meta(meta)
    with pytest.raises(ConfigError, match="TTA thresholds"):
        store_operating_points(run=run, data=data, cache_dir=str(cache))
    assert Run.open(run).meta.temperature is None  # nothing stored
    # without a temperature nothing changes scale: the named points are chosen as before
    assert store_operating_points(run=run, data=data, cache_dir=str(cache), temperature=False).temperature is None
