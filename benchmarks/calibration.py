"""Temperature scaling of a run: calibration on its test patients before and after, and the reliability diagram.

Scores the run's validation and test patients through a backend (the run's torch weights, or ``--model`` an ONNX
file of it, int8 included) once, as raw logits; fits the temperature T on the validation patients exactly as
``malaria-cells operating-points RUN`` does (:func:`malaria_cells.calibrate.fit_temperature`); then reports ECE
(15 equal-width bins), Brier score, NLL and ROC-AUC on the test patients at T = 1 (before) and at the fitted T
(after), with 95 % intervals from a bootstrap over patients. Target: ECE <= 0.02 on the test patients.

Writes ``docs/images/reliability.png`` (before/after on the test patients) and ``results/calibration/<run>.json``.
It stores nothing in the run: ``malaria-cells operating-points RUN`` does that.

    python benchmarks/calibration.py --run runs/custom-cnn-48-stain
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from harness import ROOT, command_line, machine_info, save_result

from malaria_cells import metrics as M
from malaria_cells.backends import OnnxBackend, TorchBackend, probability_from_logit
from malaria_cells.calibrate import SplitLogits, calibration_scores, fit_temperature, rescale_threshold, split_logits
from malaria_cells.data import resolve_data_dir
from malaria_cells.run import Run

TARGET_ECE = 0.02


def _scores(split: SplitLogits, temperature: float, threshold: float, n_boot: int) -> dict[str, Any]:
    """Calibration of one split at one temperature, with patient-bootstrap intervals of ECE and Brier score."""
    out: dict[str, Any] = calibration_scores(split.labels, split.logits, temperature)
    p = probability_from_logit(split.logits, temperature).astype(np.float64)
    ci = M.bootstrap_ci(split.labels, p, split.patients, threshold=threshold, n_boot=n_boot, seed=0)
    out["ece_ci"] = [ci["ece"]["low"], ci["ece"]["high"]]
    out["brier_ci"] = [ci["brier"]["low"], ci["brier"]["high"]]
    out["patients"] = len(set(split.patients.tolist()))
    out["temperature"] = temperature
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run folder (its split says which patients)")
    ap.add_argument("--model", type=Path, default=None, help="an ONNX file of the run to score instead of its weights")
    ap.add_argument("--data", type=Path, default=None, help="the NIH images (default: the run's data root)")
    ap.add_argument("--image", type=Path, default=ROOT / "docs" / "images" / "reliability.png")
    ap.add_argument("--out", type=Path, default=None, help="default: results/calibration/<run name>.json")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of patients")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    machine = machine_info(["torch", "onnxruntime", "numpy"])

    run = Run.open(args.run)
    data = args.data
    if data is None and run.meta.data_root and Path(run.meta.data_root).exists():
        data = Path(run.meta.data_root)
    data = resolve_data_dir(data)
    if args.model is not None:
        backend: OnnxBackend | TorchBackend = OnnxBackend(args.model, threads=args.threads)
    else:
        backend = TorchBackend(run, threads=args.threads, precision="fp32")
    val = split_logits(backend, run_dir=run.path, data_dir=data, split="val")
    test = split_logits(backend, run_dir=run.path, data_dir=data, split="test")
    fit = fit_temperature(val.logits, val.labels)
    t = fit.temperature
    # The run's default threshold on each scale (only the bootstrap's threshold metrics use it; ECE does not).
    stored_t = run.meta.temperature or 1.0
    raw_threshold = rescale_threshold(run.meta.threshold, from_temperature=stored_t, to_temperature=1.0)
    cal_threshold = rescale_threshold(raw_threshold, from_temperature=1.0, to_temperature=t)
    results = {
        "temperature": t,
        "fit": fit.to_dict(),
        "stored_temperature": run.meta.temperature,
        "target_ece": TARGET_ECE,
        "test": {
            "before": _scores(test, 1.0, raw_threshold, args.n_boot),
            "after": _scores(test, t, cal_threshold, args.n_boot),
        },
        "val": {
            "before": calibration_scores(val.labels, val.logits, 1.0),
            "after": calibration_scores(val.labels, val.logits, t),
        },
        "backend": backend.name,
        "model": str(args.model) if args.model else str(run.path),
        "image": str(args.image),
    }
    results["meets_target"] = bool(results["test"]["after"]["ece"] <= TARGET_ECE)

    from malaria_cells.plots import plot_reliability_comparison

    n_patients = results["test"]["after"]["patients"]
    plot_reliability_comparison(
        test.labels,
        {
            "before (T = 1)": probability_from_logit(test.logits, 1.0),
            f"after (T = {t:.3f}, fitted on validation)": probability_from_logit(test.logits, t),
        },
        args.image,
        title=f"{run.path.name}: {len(test.labels):,} cells of {n_patients} test patients",
    )
    out = args.out or ROOT / "results" / "calibration" / f"{run.path.name}.json"
    params = {"run": str(args.run), "model": str(args.model) if args.model else None, "data": str(data)}
    save_result(
        out,
        name="calibration",
        command=command_line(),
        params={**params, "n_boot": args.n_boot},
        results=results,
        machine=machine,
    )
    for when in ("before", "after"):
        s = results["test"][when]
        print(
            f"test {when:6s} T={s['temperature']:.4f}  ECE {s['ece']:.4f} ({s['ece_ci'][0]:.4f}-{s['ece_ci'][1]:.4f})"
            f"  Brier {s['brier']:.4f}  NLL {s['nll']:.4f}  ROC-AUC {s['roc_auc']:.4f}"
        )
    print(f"wrote {out} and {args.image}")


if __name__ == "__main__":
    main()
