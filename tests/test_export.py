"""Tests for malaria_cells.export: fp32 parity with torch, metadata inside the file, int8 quantization, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells import export as E
from malaria_cells.backends import CARD_KEYS, ONNX_FORMAT, ONNX_INPUT, OnnxBackend, TorchBackend, probabilities
from malaria_cells.cli import app
from malaria_cells.predict import Classifier
from malaria_cells.preprocess import Preprocessing
from malaria_cells.run import Run


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy"


def _metadata(path: Path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_fp32_export_parity_metadata_and_dynamic_batch(base: Path, tmp_path: Path) -> None:
    run, data, cache = tiny_run(base)
    report = E.export_run(run_dir=run, out=tmp_path / "m.onnx", data_dir=data, cache_dir=str(cache))
    assert report.precision == "fp32" and report.parity_source == "test split"
    assert report.parity_max_abs_diff_prob <= 1e-4
    meta = _metadata(tmp_path / "m.onnx")
    run_meta = json.loads((run / "metadata.json").read_text())
    assert meta["format"] == ONNX_FORMAT and set(meta) <= set(CARD_KEYS)
    for key in ("class_names", "preprocessing", "threshold", "model", "data_manifest_sha256"):
        assert meta[key] == run_meta[key], key
    assert meta["package_version"] and meta["created"] and meta["quantization"] == {"precision": "fp32"}
    assert run_meta.get("temperature") is None and meta["temperature"] == 1.0  # no fit: written as T = 1 for clients
    assert meta["parity_max_abs_diff_prob"] == pytest.approx(report.parity_max_abs_diff_prob)
    # uint8 NHWC input with a dynamic batch axis, as documented
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = run_meta["preprocessing"]["input_size"]
    assert inp.name == ONNX_INPUT and inp.type == "tensor(uint8)" and inp.shape[1:] == [size, size, 3]
    images = E.synthetic_cells(7, size)
    ref = probabilities(TorchBackend(run, device="cpu"), images)
    for n in (1, 7):
        logit, prob = sess.run(None, {ONNX_INPUT: images[:n]})
        assert logit.shape == (n,) and prob.shape == (n,)
        assert np.max(np.abs(prob - ref[:n])) <= 1e-4
        assert np.allclose(prob, 1 / (1 + np.exp(-logit)), atol=1e-6)


def test_export_parity_with_a_stored_temperature(base: Path, tmp_path: Path) -> None:
    run, data, cache = tiny_run(base)
    warm = tmp_path / "run"
    shutil.copytree(run, warm, ignore=shutil.ignore_patterns("*.onnx"))
    meta = Run.open(warm).meta.to_dict()
    meta["temperature"] = 2.5
    Run(warm).save_meta(meta)
    report = E.export_run(run_dir=warm, out=tmp_path / "m.onnx", data_dir=data, cache_dir=str(cache))
    assert report.parity_max_abs_diff_prob <= 1e-4  # torch and ONNX both divide by T
    stamped = _metadata(tmp_path / "m.onnx")
    assert stamped["temperature"] == 2.5 and "logit / temperature" in stamped["output"]
    images = E.synthetic_cells(16, meta["preprocessing"]["input_size"], seed=2)
    onnx_backend, torch_backend = OnnxBackend(tmp_path / "m.onnx"), TorchBackend(warm, device="cpu")
    assert onnx_backend.temperature == torch_backend.temperature == 2.5
    p_onnx, p_torch = probabilities(onnx_backend, images), probabilities(torch_backend, images)
    assert np.abs(p_onnx - p_torch).max() <= 1e-4
    # the graph's own outputs stay raw; the backend's probability is sigmoid(logit / T)
    logit, graph_prob = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {ONNX_INPUT: images}
    )
    assert np.allclose(graph_prob, 1 / (1 + np.exp(-logit)), atol=1e-6)
    assert np.allclose(p_onnx, 1 / (1 + np.exp(-logit.astype(np.float64) / 2.5)), atol=1e-6)


def test_uint8_wrapper_matches_the_training_normalisation() -> None:
    from malaria_cells.models import CustomCNN, to_input

    torch.manual_seed(0)
    model = CustomCNN().eval()
    prep = Preprocessing(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.from_numpy(E.synthetic_cells(4, 32))
    with torch.no_grad():
        a = E.UInt8Input(model, prep)(x)[0]
        b = model(to_input(x, prep))
    assert torch.allclose(a, b, atol=1e-4)


def test_parity_failure_writes_nothing(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, data, cache = tiny_run(base)
    monkeypatch.setattr(E, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(E.ExportError, match="differs from torch"):
        E.export_run(run_dir=run, out=tmp_path / "x.onnx", data_dir=data, cache_dir=str(cache))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_int8_export(base: Path, tmp_path: Path, quant_format: str) -> None:
    run, data, cache = tiny_run(base)
    out = tmp_path / f"int8-{quant_format}.onnx"
    report = E.export_run(
        run_dir=run,
        out=out,
        int8=True,
        data_dir=data,
        cache_dir=str(cache),
        quant_format=quant_format,
        calibration_images=64,
    )
    q = report.quantization
    assert report.precision == "int8" and q["format"] == quant_format.upper()
    assert q["test_images"] > 0 and 0 <= q["accuracy_int8_test"] <= 1
    assert q["accuracy_drop_points"] == pytest.approx((q["accuracy_fp32_test"] - q["accuracy_int8_test"]) * 100)
    assert (report.warning is not None) == (q["accuracy_drop_points"] > E.INT8_MAX_DROP_POINTS)
    meta = _metadata(out)
    assert meta["quantization"]["precision"] == "int8"
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QuantizeLinear" in ops) if quant_format == "qdq" else ("QLinearConv" in ops)
    clf = Classifier.load(out)
    preds = clf.predict([np.asarray(E.synthetic_cells(1, 64)[0])])
    assert preds[0].ok and clf.card["quantization"]["precision"] == "int8"


def test_int8_drop_over_limit_warns_and_marks_metadata(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, data, cache = tiny_run(base)
    monkeypatch.setattr(E, "INT8_MAX_DROP_POINTS", -101.0)  # any drop counts as too much
    out = tmp_path / "int8.onnx"
    report = E.export_run(run_dir=run, out=out, int8=True, data_dir=data, cache_dir=str(cache), calibration_images=32)
    assert report.warning and "points below fp32" in report.warning
    assert _metadata(out)["warning"] == report.warning
    assert "warning" in Classifier.load(out).card


def test_without_data_parity_uses_synthetic_cells_and_int8_refuses(base: Path, tmp_path: Path) -> None:
    run, _, cache = tiny_run(base)
    lonely = tmp_path / "run"
    lonely.mkdir()
    for name in ("metadata.json", "best.safetensors"):
        shutil.copy(run / name, lonely / name)
    meta = json.loads((lonely / "metadata.json").read_text())
    meta["data_root"] = str(tmp_path / "gone")
    (lonely / "metadata.json").write_text(json.dumps(meta))
    report = E.export_run(run_dir=lonely, data_dir=tmp_path / "gone", cache_dir=str(cache))
    assert report.parity_source == "synthetic" and report.parity_max_abs_diff_prob <= 1e-4
    assert Path(report.path) == lonely / "model.onnx"
    with pytest.raises(E.ExportError, match="needs the run's images"):
        E.export_run(run_dir=lonely, int8=True, data_dir=tmp_path / "gone", cache_dir=str(cache))


def test_timm_model_exports_with_parity(base: Path, tmp_path: Path) -> None:
    """A timm backbone (random weights, no download) exports through the same path and matches torch."""
    from malaria_cells.models import build_model

    run, _, cache = tiny_run(base)
    torch.manual_seed(0)
    model = build_model("efficientnet-lite0").eval()
    fake = tmp_path / "lite0"
    fake.mkdir()
    Run(fake).save_weights(model, "best")
    meta = json.loads((run / "metadata.json").read_text())
    meta.update(
        model="efficientnet-lite0",
        preprocessing={"input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "letterbox"},
        data_root=str(tmp_path / "gone"),
    )
    (fake / "metadata.json").write_text(json.dumps(meta))
    report = E.export_run(run_dir=fake, data_dir=tmp_path / "gone", parity_images=16, cache_dir=str(cache))
    assert report.parity_max_abs_diff_prob <= 1e-4
    from malaria_cells.explain import explain

    expl = explain(Classifier.load(fake), E.synthetic_cells(1, 64)[0])
    assert expl.heatmap.std() > 0.01


def test_cli_export(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, data, cache = tiny_run(base)
    monkeypatch.setenv("MALARIA_CELLS_CACHE", str(cache))
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(
        app, ["export", str(run), "--format", "onnx", "--out", str(out), "--data", str(data)], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    assert "max |Δprob|" in res.output and out.exists()
    res = CliRunner().invoke(app, ["export", str(run), "--format", "tflite"])
    assert res.exit_code == 2 and "only onnx" in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path)])
    assert res.exit_code == 2 and "metadata.json" in res.output


def test_shared_onnx_fixture_is_an_fp32_export(base: Path) -> None:
    assert _metadata(tiny_onnx(base))["quantization"] == {"precision": "fp32"}


def test_int8_export_of_a_final_fit_checks_on_uncalibrated_training_cells(base: Path, tmp_path: Path) -> None:
    # A final fit has no test split: int8 export once refused it ("needs the run's images"). It now checks on
    # training cells outside the calibration sample, and the file and the card say so.
    run, data, cache = tiny_run(base)
    final = tmp_path / "final"
    shutil.copytree(run, final)
    split_csv = final / "split.csv"
    split_csv.write_text(split_csv.read_text().replace(",test,", ",train,").replace(",val,", ",train,"))
    assert "test" not in Run.open(final).split().assignment.values()
    report = E.export_run(
        run_dir=final, out=tmp_path / "q.onnx", int8=True, data_dir=data, cache_dir=str(cache), calibration_images=16
    )
    q = report.quantization
    assert report.parity_source == q["check_images"] == "training cells (final fit: no test split)"
    n_train = len(Run.open(final).split().assignment)
    assert q["test_images"] == min(E.FINAL_FIT_CHECK_IMAGES, n_train - 16) > 0
    assert _metadata(tmp_path / "q.onnx")["quantization"]["check_images"].startswith("training cells")
    # the check cells are not the calibration cells: no image is in both (pixels compared, as the export sees them)
    meta = Run.open(final).meta.to_dict()
    sd = E._split_images(run_dir=final, meta=meta, data_dir=data, need_calibration=16, cache_dir=str(cache))
    assert sd.calibration is not None and sd.test is not None and len(sd.calibration) == 16
    calibrated = {im.tobytes() for im in sd.calibration}
    assert len(calibrated) == 16 and not calibrated & {im.tobytes() for im in sd.test}
    with pytest.raises(E.ExportError, match="none left to check"):  # every training cell went to calibration
        E.export_run(run_dir=final, out=tmp_path / "x.onnx", int8=True, data_dir=data, cache_dir=str(cache),
                     calibration_images=10**6)  # fmt: skip
    assert not (tmp_path / "x.onnx").exists()
