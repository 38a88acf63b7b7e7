"""The model card is rendered from a run, its test evaluation and its ONNX file: every number traceable."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells.cli import app
from malaria_cells.evaluate import evaluate_run


def test_model_card_from_run_eval_and_onnx(tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp() / "deploy"
    run, data, cache = tiny_run(base)
    onnx = tiny_onnx(base)
    evaluate_run(run_dir=run, data_dir=data, split="test", n_boot=200, cache_dir=str(cache))
    out = tmp_path / "MODEL_CARD.md"
    r = CliRunner().invoke(
        app, ["model-card", str(run), "--onnx", str(onnx), "--out", str(out), "--command", "malaria-cells train X"]
    )
    assert r.exit_code == 0, r.output
    card = out.read_text()
    meta = json.loads((run / "metadata.json").read_text())
    ev = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert "research and teaching only" in card and "not for diagnosis" in card
    assert f"**{meta['threshold']:.4f}**" in card
    assert f"| Accuracy | {ev['metrics']['accuracy']['value']:.4f} (" in card
    assert all(p["patient"] in card for p in ev["per_patient"])  # the test patients are named
    assert "by patient" in card and "malaria-cells train X" in card
    assert "| `tiny.onnx` | fp32 |" in card


def test_model_card_needs_an_evaluation(tmp_path_factory, tmp_path):
    run, _, _ = tiny_run(tmp_path_factory.getbasetemp() / "deploy")
    r = CliRunner().invoke(app, ["model-card", str(run), "--onnx", "x.onnx", "--eval-json", str(tmp_path / "no.json")])
    assert r.exit_code == 2 and "evaluate" in r.output
