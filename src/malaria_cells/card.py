"""Model card: rendered from a run's metadata, its evaluation, its ONNX export and committed results files.

The card follows Google's model-card sections (model details, intended and out-of-scope uses, training and
evaluation data, metrics, failure modes, ethical considerations) under a Hugging Face metadata header (license,
tags, datasets, metrics, model-index). Every number comes from the run's own metadata or evaluation, or from a
committed results file that the card names beside it with the command that wrote it; none is typed here.
"""

from __future__ import annotations

import json
import os
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from malaria_cells import __version__
from malaria_cells import metrics as M
from malaria_cells.evaluate import REPORT_METRICS, format_ci, read_metrics
from malaria_cells.io import atomic_write_text
from malaria_cells.run import Run, RunMeta

CARD_NAME = "MODEL_CARD.md"
WORST_SHOWN = 5  # worst patients listed by name in the card
DATASET_ID = "nih-malaria-cell-images"
# Committed measurements of failure modes, relative to the repository root (``--results-root``). Benchmarks record
# the command that wrote them inside the file; the smear evaluation's command is the one docs/smear.md gives.
STAIN_SHIFT = "benchmarks/results/stain_shift.json"
STAIN_NORMALIZED = "benchmarks/results/stain_shift_normalized.json"  # the same with smear --stain-normalize
OOD_BANK = "benchmarks/results/ood_bank.json"
LOOSE_CROPS = "benchmarks/results/loose_crops.json"
SMEAR_OTHER_LAB = "results/smear/eval-given-boxes/metrics.json"
SMEAR_OTHER_LAB_COMMAND = (
    "malaria-cells smear-eval ../shared/iml-malaria/fields --annotations ../shared/iml-malaria/annotations.json "
    "--given-boxes --out results/smear/eval-given-boxes"
)
SHIPPED_ONNX = "models/default.onnx"
# Hugging Face metric ids of the metrics the model-index lists.
HF_METRICS = (
    ("accuracy", "accuracy", "Accuracy"),
    ("sensitivity", "recall", "Sensitivity (recall of Parasitized)"),
    ("specificity", "specificity", "Specificity"),
    ("roc_auc", "roc_auc", "ROC-AUC"),
    ("mcc", "matthews_correlation", "MCC"),
    ("f1", "f1", "F1"),
)
CITATION = (
    "Rajaraman S, Antani SK, Poostchi M, Silamut K, Hossain MA, Maude RJ, Jaeger S, Thoma GR. Pre-trained "
    "convolutional neural networks as feature extractors toward improved malaria parasite detection in thin blood "
    "smear images. PeerJ 6:e4568 (2018). https://doi.org/10.7717/peerj.4568"
)


def _onnx_props(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {}
    for p in model.metadata_props:
        try:
            props[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            props[p.key] = p.value
    return props


def _licence() -> str:
    """The package's licence (the weights are released under it), from its installed metadata."""
    try:
        md = importlib_metadata.metadata("malaria-cells")
    except importlib_metadata.PackageNotFoundError:
        return "MIT"
    return md.get("License-Expression") or md.get("License") or "MIT"


def _read_result(root: Path, rel: str) -> dict | None:
    """A committed results file, or None when it is not there (the card then says it was not measured)."""
    try:
        return json.loads((root / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_final_fit(meta: RunMeta) -> bool:
    """Whether the run was fitted on every patient (no test patients: its figures come from cross-validation).

    Args:
        meta: the run's metadata.

    Returns:
        True for a final fit.
    """
    extra = meta.to_dict()
    if extra.get("final_fit"):
        return True
    test = next((r for r in meta.split_counts if r.get("split") == "test"), None)
    return test is not None and not test.get("images")


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.{digits}f} %"


def _metric_value(d: Any) -> float | None:
    v = d.get("value") if isinstance(d, dict) else d
    return None if v is None or v != v else float(v)


def _header(name: str, meta: RunMeta, metrics: dict, *, dataset: str, split: str) -> list[str]:
    """The Hugging Face metadata block (YAML between --- lines)."""
    values = [
        {"type": hf, "value": round(v, 4), "name": label}
        for key, hf, label in HF_METRICS
        if key in metrics and (v := _metric_value(metrics[key])) is not None
    ]
    head: dict[str, Any] = {
        "license": _licence().lower(),
        "library_name": "malaria-cells",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "malaria", "microscopy", "thin-blood-smear", "medical-imaging", "onnx"],
        "datasets": [DATASET_ID],
        "metrics": [hf for _, hf, _ in HF_METRICS],
        "model-index": [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Red blood cell: Parasitized vs Uninfected"},
                        "dataset": {"type": DATASET_ID, "name": dataset, "split": split},
                        "metrics": values,
                    }
                ],
            }
        ],
    }
    return ["---", yaml.safe_dump(head, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def _split_table(meta: RunMeta) -> list[str]:
    lines = [
        "| Split | Images | Parasitized | Uninfected | Patients | Infected patients | Uninfected-only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in meta.split_counts:
        lines.append(
            f"| {r['split']} | {r['images']:,} | {r['parasitized']:,} | {r['uninfected']:,} | {r['patients']} | "
            f"{r['infected_patients']} | {r['uninfected_only_patients']} |"
        )
    return lines


def _at_prevalence(metrics: dict, ev: dict | None) -> list[str]:
    """PPV and NPV at 1 %, 5 % and 50 % infected cells, from the evaluation's sensitivity and specificity."""
    sens, spec = _metric_value(metrics.get("sensitivity")), _metric_value(metrics.get("specificity"))
    if sens is None or spec is None:
        return ["Sensitivity or specificity undefined: no predictive values."]
    table = (ev or {}).get("at_prevalence") or {f"{q:g}": M.predictive_values(sens, spec, q) for q in M.PREVALENCES}
    lines = [
        f"From sensitivity {sens:.4f} and specificity {spec:.4f} above. Real smears are at 1-5 % infected cells or "
        "less, where most positive calls are false unless specificity is very high.",
        "",
        "| share of infected cells | PPV | NPV |",
        "|---|---|---|",
    ]
    lines += [f"| {float(q):.0%} | {v['ppv']:.3f} | {v['npv']:.4f} |" for q, v in table.items()]
    return lines


def _per_patient(rows: list[dict]) -> list[str]:
    """The worst patients by share of misclassified cells, and infected vs uninfected-only patients."""
    if not rows:
        return ["No per-patient table (the evaluation had no patient ids)."]
    worst = sorted(rows, key=lambda r: (-r["errors"] / max(1, r["cells"]), -r["errors"], r["patient"]))[:WORST_SHOWN]
    lines = [
        f"Worst {len(worst)} of {len(rows)} patients by share of misclassified cells (the whole table: the "
        "evaluation's report.md):",
        "",
        "| Patient | Cells | True infected fraction | Predicted infected fraction | Misclassified |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['patient']} | {r['cells']} | {r['true_infected_frac']:.3f} | {r['pred_infected_frac']:.3f} | "
        f"{r['errors']:g} ({r['errors'] / max(1, r['cells']):.1%}) |"
        for r in worst
    ]
    lines += [
        "",
        "### Subgroups",
        "",
        "Patients with parasitized cells vs patients with uninfected cells only (pooled over their cells):",
        "",
        "| Subgroup | Patients | Cells | Misclassified | Called infected | Truly infected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, group in (
        ("infected patients", [r for r in rows if r["true_infected_frac"] > 0]),
        ("uninfected-only patients", [r for r in rows if r["true_infected_frac"] == 0]),
    ):
        cells = sum(r["cells"] for r in group)
        if not cells:
            lines.append(f"| {name} | 0 | 0 | — | — | — |")
            continue
        called = sum(r["pred_infected_frac"] * r["cells"] for r in group)
        true = sum(r["true_infected_frac"] * r["cells"] for r in group)
        errors = sum(r["errors"] for r in group)
        lines.append(
            f"| {name} | {len(group)} | {cells:,} | {errors / cells:.1%} | {called / cells:.1%} | {true / cells:.1%} |"
        )
    return lines


def _stain_entry(results: dict, run_dir: Path, onnx_paths: list[Path], root: Path) -> tuple[str, dict] | None:
    """The stain-shift entry of this model (by its ONNX files or run folder), else the shipped model's.

    The file's keys are paths relative to the folder the benchmark ran in (``root``).
    """
    by_key = results.get("results", {})

    def forms(path: Path) -> set[str]:
        rel = os.path.relpath(Path(path).resolve(), root.resolve())
        return {Path(path).as_posix(), Path(rel).as_posix()}

    names = set().union(*(forms(p) for p in onnx_paths)) if onnx_paths else set()
    runs = tuple(f.rstrip("/") + "/" for f in forms(run_dir))
    for key, entry in by_key.items():
        if key in names or key.startswith(runs):
            return key, entry
    return (SHIPPED_ONNX, by_key[SHIPPED_ONNX]) if SHIPPED_ONNX in by_key else None


def _failure_modes(root: Path, run_dir: Path, onnx_paths: list[Path]) -> list[str]:
    """Measured failure modes, each read from a committed results file named with its command."""
    lines = [
        f"Measured outside this run, on the models each results file names (the files under `{root}`; where the file "
        f"does not name a model it is the shipped `{SHIPPED_ONNX}`). For another model, rerun the commands with its "
        "ONNX export to measure it.",
        "",
    ]
    stain = _read_result(root, STAIN_SHIFT)
    entry = _stain_entry(stain, run_dir, onnx_paths, root) if stain else None
    lines += ["### Other labs' stains (another lab's cells, zero-shot)", ""]
    if entry is None:
        lines += [f"Not measured here (`{STAIN_SHIFT}` not found).", ""]
    else:
        key, e = entry
        lines += [
            f"`{key}` on another lab's annotated cells (IML-Malaria development photos), as photographed and with the "
            f"photos' stain shifted, at its own threshold {e['threshold']:.3f}: `{stain['command']}` "
            f"(`{STAIN_SHIFT}`).",
            "",
            "| condition | cells | ROC-AUC (95 % CI) | sensitivity | specificity | called infected | truly infected |",
            "|---|---:|---|---|---|---:|---:|",
        ]
        for cond, c in e.items():
            if not isinstance(c, dict) or "called_infected_pct" not in c:
                continue
            lines.append(
                f"| {cond} | {c['cells']:,} | {format_ci(c.get('roc_auc') or {}, 3)} | "
                f"{format_ci(c.get('sensitivity') or {}, 3)} | {format_ci(c.get('specificity') or {}, 3)} | "
                f"{c['called_infected_pct']:.2f} % | "
                f"{c['true_infected_pct']:.2f} % |"
            )
        lines += [""]
        normalized = _read_result(root, STAIN_NORMALIZED)
        norm_entry = _stain_entry(normalized, run_dir, onnx_paths, root) if normalized else None
        if norm_entry and norm_entry[0] != key:
            norm_entry = None  # that file measured another model (the fallback to the shipped one): not this card's
        rows = [("", e)]
        if norm_entry:
            rows.append(("each photo's cells stain-normalized", norm_entry[1]))
        hs_rows = [
            f"| {cond}{', ' + how if how else ''} | {hs['threshold']:.3f} | {format_ci(hs['sensitivity'], 3)} | "
            f"{format_ci(hs['specificity'], 3)} | {hs['called_infected_pct']:.2f} % | {c['true_infected_pct']:.2f} % |"
            for how, entry_ in rows
            for cond, c in entry_.items()
            if isinstance(c, dict) and (hs := c.get("high_specificity"))
        ]
        if hs_rows:
            lines += [
                "At the model's high-specificity operating point (the one `smear` screens with)"
                + (
                    f", and with `smear --stain-normalize` (`{normalized['command']}`, `{STAIN_NORMALIZED}`)"
                    if norm_entry
                    else ""
                )
                + ":",
                "",
                "| condition | threshold | sensitivity | specificity | called infected | truly infected |",
                "|---|---:|---|---|---:|---:|",
                *hs_rows,
                "",
            ]
        lines += [
            "At low parasitemia a small loss of specificity multiplies the called parasitemia: adapt the model to "
            "the lab (`malaria-cells adapt`) before counting its smears.",
            "",
        ]
    smear = _read_result(root, SMEAR_OTHER_LAB)
    if smear is not None and "classification" in smear:
        c, par = smear["classification"], smear.get("parasitemia", {})
        model = smear.get("model", {})
        lines += [
            f"Smear pipeline on the same lab's {smear.get('n_photos', '?')} photos with the annotated boxes "
            f"(classifier `{Path(str(model.get('classifier', '?'))).name}` at threshold "
            f"{model.get('threshold', float('nan')):.3f}): sensitivity {format_ci(c['sensitivity'], 3)}, "
            f"specificity {format_ci(c['specificity'], 3)}, ROC-AUC {format_ci(c['roc_auc'], 3)}; parasitemia "
            f"called {_metric_value(par.get('called_pooled_pct')) or float('nan'):.2f} % against "
            f"{_metric_value(par.get('true_pooled_pct')) or float('nan'):.2f} % annotated: "
            f"`{SMEAR_OTHER_LAB_COMMAND}` (`{SMEAR_OTHER_LAB}`).",
            "",
        ]
    ood = _read_result(root, OOD_BANK)
    lines += ["### Grayscale, non-cells and other out-of-distribution inputs", ""]
    if ood is None:
        lines += [f"Not measured here (`{OOD_BANK}` not found).", ""]
    else:
        r = ood["results"]
        nih = r["nih_validation"]
        lines += [
            "Inputs unlike the training cells get a flag and the label `Unknown` (`predict`, the API, the web page); "
            f"how often, on a bank of such inputs: `{ood['command']}` (`{OOD_BANK}`).",
            "",
            "| inputs | flagged |",
            "|---|---:|",
            f"| NIH validation patients' cells (should not be flagged) | {nih['flagged']:,} / {nih['cells']:,} |",
        ]
        lines += [f"| {kind} | {b['flagged']} / {b['inputs']} |" for kind, b in r["bank"].items()]
        tot = r["bank_total"]
        lines += [
            f"| **all out-of-distribution inputs** | **{tot['flagged']} / {tot['inputs']}** |",
            "",
            "The flag reads the image, not the model: a cell-shaped object in cell-like colours on black passes, and "
            "so does another lab's cell cut onto black (see the stain table).",
            "",
        ]
    loose = _read_result(root, LOOSE_CROPS)
    lines += ["### Loose crops", ""]
    if loose is None:
        lines += [f"Not measured here (`{LOOSE_CROPS}` not found).", ""]
    else:
        lines += [
            f"Cells of validation patients framed with a light margin, classified with `predict --segment off` and "
            f"`--segment auto` (the default, which puts the cell back on black): `{loose['command']}` "
            f"(`{LOOSE_CROPS}`)."
            + (
                " The model is a final fit, trained on these patients too: the table shows what the framing and "
                "the segmentation change, not accuracy on new patients."
                if loose.get("params", {}).get("seen_in_training")
                else ""
            ),
            "",
            "| framing, segmentation | cells | accuracy | specificity | sensitivity | flagged |",
            "|---|---:|---|---|---|---:|",
        ]
        lines += [
            f"| {k} | {v['cells']:,} | {_pct(v['accuracy'])} | {_pct(v['specificity'])} | {_pct(v['sensitivity'])} "
            f"| {_pct(v['flagged'], 0)} |"
            for k, v in loose["results"].items()
        ]
        lines += [""]
    lines += [
        "### Whole field photos",
        "",
        "A field photo through `predict` is one image of many cells: it is flagged `not a single cell` and its "
        "label is meaningless. Field photos go through `malaria-cells smear`, which finds and cuts out every cell "
        "first (docs/smear.md).",
        "",
    ]
    return lines


def render_model_card(
    *,
    run_dir: Path,
    eval_json: Path | None,
    onnx_paths: list[Path] | None = None,
    commands: list[str] | None = None,
    results_root: Path | None = None,
) -> str:
    """Render a run's ``MODEL_CARD.md``.

    Args:
        run_dir: the run (its metadata gives the model, the threshold, the split and the training).
        eval_json: the run's evaluation (``RUN/eval-test/metrics.json``); ``None`` for a final fit, whose figures
            are the cross-validation estimate stored in its metadata.
        onnx_paths: the run's ONNX files (fp32 first); their metadata gives size, parity and int8 drop.
        commands: the commands that made the model, shown verbatim so anyone can rerun them.
        results_root: the folder holding ``benchmarks/results`` and ``results/smear`` (default: the current one).

    Returns:
        Markdown text with a Hugging Face metadata header.

    Raises:
        RunError: ``run_dir`` is not a finished run, its metadata is broken, or the evaluation is unreadable.
    """
    onnx_paths = list(onnx_paths or [])
    root = Path(results_root) if results_root is not None else Path(".")
    run = Run.open(run_dir)
    meta = run.meta
    extra = meta.to_dict()
    prep = meta.preprocessing
    name = run.path.resolve().name
    final = is_final_fit(meta)
    ev = read_metrics(eval_json) if eval_json is not None else None
    cv = extra.get("cv_estimate") or {}
    if ev is not None:
        metrics, dataset = ev["metrics"], f"NIH malaria cell images, {ev['split']} patients of this run's split"
        split_name = ev["split"]
    else:
        metrics, dataset, split_name = cv.get("pooled") or {}, "NIH malaria cell images, cross-validation", "cv"
    counts = {r["split"]: r for r in meta.split_counts}
    n_images = sum(r["images"] for r in meta.split_counts)
    n_patients = sum(r["patients"] for r in meta.split_counts)
    version = (extra.get("packages") or {}).get("malaria-cells", __version__)

    lines = _header(name, meta, metrics, dataset=dataset, split=split_name)
    lines += [
        f"# Model card: {name} ({meta.model}, {meta.strategy or 'scratch'})",
        "",
        "> **Intended use: research and teaching only. Not a medical device; not for diagnosis or any clinical",
        "> decision.** A cell-level classifier: it says whether one segmented red blood cell image looks",
        "> Parasitized or Uninfected. It does not find cells on a slide, count parasitaemia or identify species.",
        "",
        "## Model details",
        "",
        f"- Run: `{run.path}`, made by malaria-cells {version} on {extra.get('created', 'an unrecorded date')}.",
        f"- Architecture: `{meta.model}` ({meta.strategy}, weights: {meta.weights}), "
        f"{meta.parameters or 0:,} parameters; one logit, sigmoid = P(Parasitized).",
        f"- Input: RGB letterboxed to {prep.input_size}×{prep.input_size} px (aspect kept, black padding), "
        f"scaled to [0, 1], then (x − {list(prep.mean)}) / {list(prep.std)}; the ONNX graph takes uint8 pixels and "
        "normalises inside.",
        f"- Decision threshold: **{meta.threshold:.4f}** on P(Parasitized), chosen "
        + (f"by {meta.threshold_method}" if final else f"on the validation patients ({meta.threshold_method})")
        + "; stored in the model file.",
    ]
    ops = extra.get("operating_points")
    if ops:
        lines.append(
            "- Operating points: "
            + ", ".join(f"{k} {v:.4f}" for k, v in ops.items())
            + f" ({extra.get('operating_points_chosen_on', 'chosen on validation patients')})."
        )
    lines += [
        f"- Trained {meta.epochs_run} epochs (best: {meta.best_epoch}; stopped: {meta.stopped}), "
        f"{(meta.train_time_s or 0) / 60:.1f} min wall time ({meta.precision}; wall time includes any other load "
        "the machine carried during training).",
        f"- Licence of the weights: {_licence()}, as the malaria-cells project. Training data: see below.",
        "",
        "## Intended use",
        "",
        "- Research and teaching: classifying single, segmented red blood cell images from Giemsa-stained thin "
        "blood smears as Parasitized or Uninfected; comparing models on patient-disjoint splits; teaching how "
        "patient-level evaluation differs from image-level evaluation.",
        "- Users: researchers, students and developers of microscopy software, who review its output.",
        "",
        "## Out-of-scope uses",
        "",
        "- **Diagnosis, screening of patients or any clinical decision.** It is not a medical device and was not "
        "validated as one.",
        "- Other stains, microscopes, labs or species without adapting it first (`malaria-cells adapt` with the "
        "lab's own boxed cells): see the measured failure modes below.",
        "- Whole field photos through `predict`: use `malaria-cells smear`, which finds and cuts out the cells.",
        "- Thick smears, species identification, and parasitaemia from `predict` on uncounted crops.",
        "",
        "## Training data and split",
        "",
        f"- Data: `{meta.data_root}` — {n_images:,} images of {n_patients} patients (manifest sha256 "
        f"`{(meta.data_manifest_sha256 or '')[:16]}…`). The NIH / NLM malaria cell images (Rajaraman et al., PeerJ "
        "2018) are Giemsa-stained thin blood smears from Chittagong Medical College Hospital, Bangladesh, "
        "photographed through a smartphone microscope, cells labelled by an expert slide reader.",
        f"- Split: **by patient** ({meta.split_kind}), seeded, stratified by infected / uninfected-only "
        "patients; no patient's cells are in two splits.",
        "",
        *_split_table(meta),
        "",
    ]
    if final:
        lines += [
            "**Final fit: no test patients; estimate from cross-validation.** The run was trained on every patient; "
            "its figures below are the cross-validation estimate of the same recipe"
            + (f" (`{cv['command']}`, {cv.get('folds')} folds, row {cv.get('row')})" if cv.get("command") else "")
            + ".",
            "",
        ]
    lines += ["## Evaluation data", ""]
    if ev is not None:
        patients = [r["patient"] for r in ev.get("per_patient", [])]
        lines += [
            f"- `{ev['data']}`, the run's **{ev['split']}** split: {ev['n_cells']:,} cells of {ev['n_patients']} "
            f"patients (patient ids: {ev.get('patient_ids', 'NIH file names')}); "
            f"`{Path(eval_json).as_posix()}`.",
        ]
        if ev["split"] == "test" and "test" in counts:
            lines.append("- Test patients: " + (", ".join(patients) or "(not listed)") + ".")
        for w in ev.get("warnings", []):
            lines.append(f"- Warning: {w}")
    elif cv:
        lines += [
            f"- Pooled out-of-fold predictions of {cv.get('folds')}-fold patient-level cross-validation: every cell "
            "scored by the fold model that never saw its patient.",
        ]
    else:
        lines += ["- No evaluation: this card has no measured figures."]
    boot = (ev or {}).get("bootstrap", {}).get("resamples")
    lines += [
        "",
        "## Metrics",
        "",
        "95 % confidence intervals from "
        + (f"{boot:,} bootstrap resamples of **patients**" if boot else "a bootstrap over **patients**")
        + ". Positive class: Parasitized.",
        "",
        "| Metric | Value (95 % CI) |",
        "|---|---|",
    ]
    lines += [f"| {label} | {format_ci(metrics[key])} |" for key, label in REPORT_METRICS if key in metrics]
    if ev is not None:
        cm = ev["confusion"]
        lines += ["", f"Confusion at the threshold: TP {cm['tp']}, FN {cm['fn']}, TN {cm['tn']}, FP {cm['fp']}."]
    lines += ["", "### PPV and NPV at other prevalences", "", *_at_prevalence(metrics, ev), ""]
    lines += ["## Per-patient results", ""]
    lines += _per_patient(ev.get("per_patient", [])) if ev is not None else ["None: a final fit has no test patients."]
    lines += ["", "## Measured failure modes", "", *_failure_modes(root, run.path, onnx_paths)]
    sens = _metric_value(metrics.get("sensitivity"))
    fn = (ev or {}).get("confusion", {}).get("fn")
    lines += [
        "## Ethical considerations",
        "",
        "- **False negatives**: a missed infected cell is a missed infection if anyone relied on it"
        + (f"; sensitivity here is {sens:.4f}" if sens is not None else "")
        + (f" ({fn} infected cells called uninfected)" if fn is not None else "")
        + ". Not for diagnosis: a smear is read by a trained microscopist under a clinical protocol.",
        "- **Automation bias**: a confident score invites trust. Inputs unlike the training cells are labelled "
        "`Unknown`, smear results come with a contact sheet of the cells called infected to check by eye, and "
        "at low prevalence most positive calls are false (the PPV table above).",
        "- **Data**: de-identified public images; patient ids are slide codes. Labels come from one expert reader "
        "and some cells of the public set are known to be mislabelled.",
        "- Cell-level figures; a patient-level decision needs many cells and a clinical protocol.",
        "",
        "## Licence and data terms",
        "",
        f"- Weights and code: {_licence()} licence (the malaria-cells project's).",
        "- Training data: the NIH / NLM malaria cell images, a U.S. Government work in the public domain; cite the "
        "paper below when you use them.",
        "",
        "## Citation",
        "",
        f"- Data: {CITATION}",
        f"- Software: malaria-cells {version}, model `{name}`.",
        "",
    ]
    if onnx_paths:
        lines += ["## Files", "", "| File | Precision | Size | Check |", "|---|---|---:|---|"]
        for path in onnx_paths:
            props = _onnx_props(path)
            q = props.get("quantization") or {}
            if q.get("precision") == "int8":
                on = "test" if q.get("check_images", "test split") == "test split" else "training-cell"
                check = (
                    f"{on} accuracy {q['accuracy_fp32_test'] * 100:.2f} % fp32 → {q['accuracy_int8_test'] * 100:.2f} "
                    f"% int8 (drop {q['accuracy_drop_points']:.2f} points, {q['test_images']:,} cells"
                    + ("" if on == "test" else ", seen in training: a fidelity check, not an accuracy estimate")
                    + ")"
                )
            else:
                check = f"max abs difference in P vs torch {props.get('parity_max_abs_diff_prob', float('nan')):.1e}"
            if props.get("warning"):
                check += f"; warning: {props['warning']}"
            lines.append(
                f"| `{path.name}` | {q.get('precision', 'fp32')} | {path.stat().st_size / 1e6:.2f} MB | {check} |"
            )
        lines.append("")
    if commands:
        lines += ["## How this model was made (rerun these)", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def write_model_card(
    *,
    run_dir: Path,
    eval_json: Path | None,
    onnx_paths: list[Path] | None = None,
    commands: list[str] | None = None,
    out: Path | None = None,
    results_root: Path | None = None,
) -> Path:
    """Render the model card and write it atomically.

    Args:
        run_dir: see :func:`render_model_card`.
        eval_json: see :func:`render_model_card`.
        onnx_paths: see :func:`render_model_card`.
        commands: see :func:`render_model_card`.
        out: destination (default ``RUN/MODEL_CARD.md``; the shipped ``models/MODEL_CARD.md`` only when named).
        results_root: see :func:`render_model_card`.

    Returns:
        The path written.
    """
    text = render_model_card(
        run_dir=run_dir, eval_json=eval_json, onnx_paths=onnx_paths, commands=commands, results_root=results_root
    )
    return atomic_write_text(Path(out) if out is not None else Path(run_dir) / CARD_NAME, text)
