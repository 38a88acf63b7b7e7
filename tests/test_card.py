"""The model card is rendered from a run, its test evaluation and its ONNX file: every number traceable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from deploy_helpers import tiny_onnx, tiny_run
from malaria_cells.cli import app
from malaria_cells.evaluate import evaluate_run
from malaria_cells.run import Run


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


REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## Model details",
    "## Intended use",
    "## Out-of-scope uses",
    "## Training data and split",
    "## Evaluation data",
    "## Metrics",
    "### PPV and NPV at other prevalences",
    "## Per-patient results",
    "### Subgroups",
    "## Measured failure modes",
    "## Ethical considerations",
    "## Licence and data terms",
    "## Citation",
)


def _copy_of_tiny_run(tmp_path_factory, tmp_path, name: str = "tiny-cnn-run") -> tuple[Path, Path, Path]:
    run, data, cache = tiny_run(tmp_path_factory.getbasetemp() / "deploy")
    copy = tmp_path / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval-*", "MODEL_CARD.md"))
    return copy, data, cache


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_goes_into_the_run_and_never_touches_the_shipped_card(tmp_path_factory, tmp_path):
    run, data, cache = _copy_of_tiny_run(tmp_path_factory, tmp_path)
    evaluate_run(model=run, data_dir=data, split="test", n_boot=200, cache_dir=str(cache))
    shipped = REPO / "models" / "MODEL_CARD.md"
    before = (shipped.read_bytes(), shipped.stat().st_mtime_ns)
    r = CliRunner().invoke(app, ["model-card", str(run), "--results-root", str(REPO)])
    assert r.exit_code == 0, r.output
    assert (shipped.read_bytes(), shipped.stat().st_mtime_ns) == before
    card = (run / "MODEL_CARD.md").read_text()
    ev = json.loads((run / "eval-test" / "metrics.json").read_text())

    head = _header(card)
    assert head["license"] == "mit" and head["datasets"] and "malaria" in head["tags"]
    (entry,) = head["model-index"]
    assert entry["name"] == "tiny-cnn-run"
    got = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert got["accuracy"] == round(ev["metrics"]["accuracy"]["value"], 4)
    assert got["recall"] == round(ev["metrics"]["sensitivity"]["value"], 4)

    assert "# Model card: tiny-cnn-run (custom-cnn" in card and "default model" not in card
    assert all(s in card for s in SECTIONS), [s for s in SECTIONS if s not in card]
    for q in ("0.01", "0.05", "0.5"):  # PPV at 1 %, 5 %, 50 % from the evaluation
        assert f"| {float(q):.0%} | {ev['at_prevalence'][q]['ppv']:.3f} |" in card
    worst = max(ev["per_patient"], key=lambda r: r["errors"] / r["cells"])
    assert f"| {worst['patient']} | {worst['cells']} |" in card
    # Failure modes: figures and commands read from the committed results files named beside them.
    stain = json.loads((REPO / "benchmarks/results/stain_shift.json").read_text())
    ood = json.loads((REPO / "benchmarks/results/ood_bank.json").read_text())
    assert stain["command"] in card and "benchmarks/results/stain_shift.json" in card
    # The high-specificity point, as is and with --stain-normalize (a tiny run has no entry: the shipped model's).
    normalized = json.loads((REPO / "benchmarks/results/stain_shift_normalized.json").read_text())
    pale = normalized["results"]["models/default.onnx"]["pale"]["high_specificity"]
    assert f"| pale, each photo's cells stain-normalized | {pale['threshold']:.3f} |" in card
    assert normalized["command"] in card
    assert f"**{ood['results']['bank_total']['flagged']} / {ood['results']['bank_total']['inputs']}**" in card
    assert "grayscale" in card and "Loose crops" in card and "malaria-cells smear" in card
    assert "MIT" in card and "public domain" in card and "10.7717/peerj.4568" in card


def test_model_card_without_results_files_says_they_were_not_measured(tmp_path_factory, tmp_path):
    run, data, cache = _copy_of_tiny_run(tmp_path_factory, tmp_path)
    evaluate_run(model=run, data_dir=data, split="test", n_boot=50, cache_dir=str(cache))
    out = tmp_path / "card.md"
    r = CliRunner().invoke(app, ["model-card", str(run), "--out", str(out), "--results-root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    card = out.read_text()
    assert card.count("Not measured here") == 3 and not (run / "MODEL_CARD.md").exists()


def test_model_card_of_a_final_fit_shows_the_cross_validation_estimate(tmp_path_factory, tmp_path):
    run, _, _ = _copy_of_tiny_run(tmp_path_factory, tmp_path, name="final")
    r = Run(run)
    meta = r.meta.to_dict()
    meta["split_counts"] = [{**c, **({"images": 0} if c["split"] == "test" else {})} for c in meta["split_counts"]]
    pooled = {k: {"value": v, "low": v - 0.01, "high": v + 0.005} for k, v in (("accuracy", 0.9512), ("mcc", 0.9))}
    meta |= {
        "final_fit": True,
        "cv_estimate": {"command": "malaria-cells reproduce --cv 5", "folds": 5, "pooled": pooled},
    }
    r.save_meta(meta)
    res = CliRunner().invoke(app, ["model-card", str(run), "--results-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    card = (run / "MODEL_CARD.md").read_text()
    assert "Final fit: no test patients; estimate from cross-validation" in card
    assert "malaria-cells reproduce --cv 5" in card and "| Accuracy | 0.9512 (0.9412–0.9562) |" in card
    got = {m["type"]: m["value"] for m in _header(card)["model-index"][0]["results"][0]["metrics"]}
    assert got == {"accuracy": 0.9512, "matthews_correlation": 0.9}
