"""`reproduce` on a tiny subset of the real share: the table, an "ImageNet weights unavailable" row, the leakage
audit, a second run that reuses everything, and the exit codes with and without --strict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
from typer.testing import CliRunner

from malaria_cells import reproduce as R
from malaria_cells.cli import app
from malaria_cells.errors import EXIT_UNAVAILABLE

TINY = dict(max_images=120, input_size=32, epochs=2, threads=1, batch_size=16)
ROW_KEYS = ("custom-cnn-scratch", "resnet50v2-frozen", "resnet50v2-finetune", "efficientnet-lite0-frozen")


@pytest.fixture(autouse=True)
def _no_resnet_weights(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # ResNet50V2's ImageNet weights come from the HF hub: offline with an empty cache, they cannot be had.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf")))


def test_results_with_an_unavailable_row_and_the_leakage_audit(tmp_path: Path, share: Path) -> None:
    rows = tuple(r for r in R.ROWS if r.key in ROW_KEYS)
    combos = (
        R.Combo("CNN + TTA", ("custom-cnn-scratch",), tta=True),
        R.Combo("CNN + Lite0", ("custom-cnn-scratch", "efficientnet-lite0-frozen")),
        R.Combo("needs a row that did not run", ("resnet50v2-frozen",)),
    )
    kw = dict(data_dir=share, out_dir=tmp_path, quick=True, rows=rows, n_boot=50, overrides=TINY, combos=combos)
    out = R.reproduce(**kw)
    assert out["unavailable"] == ["ResNet50V2, frozen base", "ResNet50V2, fine-tuned"]
    assert out["same_test_cells"] is True
    by_name = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert by_name["ResNet50V2, fine-tuned"]["status"] == "unavailable"
    assert by_name["ResNet50V2, fine-tuned"]["published_accuracy_leaky"] == 96.23
    lite0 = by_name["EfficientNet-Lite0, frozen base"]
    cnn = by_name["Custom CNN (from scratch)"]
    for r in (lite0, cnn):
        assert r["status"] == "ok" and r["split_kind"] == "patient"
        for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "mcc"):
            assert r["metrics"][k]["low"] <= r["metrics"][k]["value"] <= r["metrics"][k]["high"]
        assert r["parameters"] > 0 and r["weights_mb"] > 0 and r["inference_cells_per_s"] > 0
    assert lite0["n_test_patients"] == cnn["n_test_patients"] and lite0["n_test_cells"] == cnn["n_test_cells"]
    assert not (tmp_path / "resnet50v2-frozen").exists()  # nothing trained from random weights in its place

    # Combinations: scored on the same test cells, threshold from val, absent when a part did not run.
    assert "needs a row that did not run" not in by_name
    for name in ("CNN + TTA", "CNN + Lite0"):
        c = by_name[name]
        assert c["kind"] == "combination" and c["n_test_cells"] == cnn["n_test_cells"]
        assert c["metrics"]["accuracy"]["low"] <= c["metrics"]["accuracy"]["value"] <= c["metrics"]["accuracy"]["high"]
    assert by_name["CNN + Lite0"]["parameters"] == cnn["parameters"] + lite0["parameters"]

    audits = {a["row"]: a for a in out["leakage_audits"]}
    assert list(audits) == ["EfficientNet-Lite0, frozen base", "Custom CNN (from scratch)"]
    for audit, honest in zip(audits.values(), (lite0, cnn), strict=True):
        assert audit["leaky"]["split_kind"] == "image-leaky"
        expected = 100 * (audit["leaky"]["metrics"]["accuracy"]["value"] - honest["metrics"]["accuracy"]["value"])
        assert audit["inflation_points"] == pytest.approx(expected)

    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ResNet50V2, frozen base |")][0]
    assert "ImageNet weights unavailable" in table and "93.41" in table
    assert "93.60" in md and "LEAKY" in md and "inflation" in md
    assert (tmp_path / "comparison.png").stat().st_size > 0

    # A second run reuses the finished runs: nothing trains again.
    again = R.reproduce(**kw)
    assert [r.get("train_time_s") for r in again["rows"]] == [r.get("train_time_s") for r in out["rows"]]
    assert [r["metrics"] for r in again["rows"] if r["status"] == "ok"] == [
        r["metrics"] for r in out["rows"] if r["status"] == "ok"
    ]
    assert again["reused_runs"] == 4 and "reusing 4 finished run(s)" in (tmp_path / "results.md").read_text()
    assert f"malaria-cells reproduce --data {share} --out {tmp_path} --quick --n-boot 50" in md
    assert again["full_run_wall_s"] == pytest.approx(out["wall_s"])


def test_strict_fails_before_training_and_default_exits_zero(
    tmp_path: Path, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    strict = runner.invoke(
        app, ["reproduce", "--data", str(share), "--out", str(tmp_path / "s"), "--quick", "--strict"]
    )
    assert strict.exit_code == EXIT_UNAVAILABLE  # the errors.py table: pretrained weights unavailable
    assert "resnet50v2" in strict.output and "could not be downloaded" in strict.output
    assert not (tmp_path / "s" / "custom-cnn-scratch").exists()  # failed before training anything

    cnn = next(r for r in R.ROWS if r.key == "custom-cnn-scratch")
    rows = (R.Row(cnn.name, cnn.model, cnn.strategy, cnn.published, quick_epochs=1), R.ROWS[1])
    monkeypatch.setattr(R, "ROWS", rows)
    monkeypatch.setattr(R, "QUICK_MAX_IMAGES", 120)
    ok = runner.invoke(
        app, ["reproduce", "--data", str(share), "--out", str(tmp_path / "d"), "--quick", "--n-boot", "50"]
    )
    assert ok.exit_code == 0, ok.output
    # the library logs a warning (the CLI renders it; a long line may wrap) naming the row and why
    assert re.search(r"warning\b.*resnet50v2:\s+ImageNet\s+weights\s+unavailable", ok.output, re.IGNORECASE | re.DOTALL)
    assert "ImageNet weights unavailable" in (tmp_path / "d" / "results.md").read_text()
