"""Model card: rendered from a run's metadata, its test evaluation and its ONNX export, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from malaria_cells.evaluate import REPORT_METRICS, format_ci
from malaria_cells.io import atomic_write_text
from malaria_cells.run import Run


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


def render_model_card(*, run_dir: Path, eval_json: Path, onnx_paths: list[Path], commands: list[str]) -> str:
    """Render ``MODEL_CARD.md``.

    Args:
        run_dir: the run the shipped model was exported from.
        eval_json: that run's ``metrics.json`` on its test patients.
        onnx_paths: the shipped ONNX files (fp32 first); their metadata gives size, parity and int8 drop.
        commands: the commands that made the model, shown verbatim so anyone can rerun them.

    Returns:
        Markdown text.

    Raises:
        RunError: ``run_dir`` is not a finished run, or its metadata is broken.
    """
    meta = Run.open(run_dir).meta
    ev = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    prep = meta.preprocessing
    counts = {r["split"]: r for r in meta.split_counts}
    test_patients = [r["patient"] for r in ev["per_patient"]]
    lines = [
        f"# Model card: malaria-cells default model ({meta.model})",
        "",
        "> **Intended use: research and teaching only. Not a medical device; not for diagnosis or any clinical",
        "> decision.** A cell-level classifier: it says whether one segmented red blood cell image looks",
        "> Parasitized or Uninfected. It does not find cells on a slide, count parasitaemia or identify species.",
        "",
        "## Model",
        "",
        f"- Architecture: `{meta.model}` ({meta.strategy}, weights: {meta.weights}), "
        f"{meta.parameters:,} parameters; one logit, sigmoid = P(Parasitized).",
        f"- Input: RGB letterboxed to {prep.input_size}×{prep.input_size} px (aspect kept, black padding), "
        f"scaled to [0, 1], then (x − {list(prep.mean)}) / {list(prep.std)}; the ONNX graph takes uint8 pixels and "
        "normalises inside.",
        f"- Decision threshold: **{meta.threshold:.4f}** on P(Parasitized), chosen on the validation patients "
        f"({meta.threshold_method}); stored in the model file.",
        f"- Trained {meta.epochs_run} epochs (best: {meta.best_epoch}; {meta.stopped}), "
        f"{meta.train_time_s / 60:.1f} min wall time on this project's 2-core CPU machine ({meta.precision}; "
        "wall time includes any other load the machine carried during training).",
        "",
        "## Data",
        "",
        "- NIH / NLM malaria cell images (Rajaraman et al., PeerJ 2018): Giemsa-stained thin blood smears from "
        "Chittagong Medical College Hospital, Bangladesh; cells labelled by an expert slide reader.",
        f"- This project's development share: 150 of the 200 patients (data manifest sha256 "
        f"`{meta.data_manifest_sha256[:16]}…`). 50 patients are withheld for independent judging.",
        f"- Split: **by patient** ({meta.split_kind}), seeded, stratified by infected / uninfected-only "
        "patients; no patient's cells are in two splits.",
        "",
        "| Split | Images | Parasitized | Uninfected | Patients | Infected patients | Uninfected-only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("train", "val", "test"):
        r = counts[name]
        lines.append(
            f"| {name} | {r['images']:,} | {r['parasitized']:,} | {r['uninfected']:,} | {r['patients']} | "
            f"{r['infected_patients']} | {r['uninfected_only_patients']} |"
        )
    lines += [
        "",
        f"Test patients: {', '.join(test_patients)}.",
        "",
        f"## Performance on the {ev['n_patients']} test patients ({ev['n_cells']:,} cells)",
        "",
        "95 % confidence intervals from 1,000 bootstrap resamples of **patients**. Positive class: Parasitized.",
        "",
        "| Metric | Value (95 % CI) |",
        "|---|---|",
    ]
    lines += [f"| {label} | {format_ci(ev['metrics'][key])} |" for key, label in REPORT_METRICS]
    cm = ev["confusion"]
    lines += [
        "",
        f"Confusion at the threshold: TP {cm['tp']}, FN {cm['fn']}, TN {cm['tn']}, FP {cm['fp']}.",
        "",
        "## Shipped files",
        "",
        "| File | Precision | Size | Check |",
        "|---|---|---:|---|",
    ]
    for path in onnx_paths:
        props = _onnx_props(path)
        q = props.get("quantization") or {}
        if q.get("precision") == "int8":
            check = (
                f"test accuracy {q['accuracy_fp32_test'] * 100:.2f} % fp32 → {q['accuracy_int8_test'] * 100:.2f} % "
                f"int8 (drop {q['accuracy_drop_points']:.2f} points, {q['test_images']:,} cells)"
            )
        else:
            check = f"max abs difference in P vs torch {props.get('parity_max_abs_diff_prob', float('nan')):.1e}"
        if props.get("warning"):
            check += f"; warning: {props['warning']}"
        lines.append(f"| `{path.name}` | {q.get('precision', 'fp32')} | {path.stat().st_size / 1e6:.2f} MB | {check} |")
    lines += [
        "",
        "## Limitations",
        "",
        "- Trained on one hospital, one staining protocol (Giemsa), one kind of smear (thin), one species "
        "(*P. falciparum*), smartphone-microscope photographs. On another lab's cells (IML-Malaria: other "
        "microscope, stain batch, *P. vivax*) it ranks well but over-calls at its threshold, which multiplies a "
        "low parasitemia; adapt it to the lab (`malaria-cells adapt`). Measured figures: docs/trust.md, "
        "docs/smear.md, docs/adapt.md.",
        "- Input must be one segmented cell on a black background, as in the NIH set. Inputs unlike that (field "
        "photos, loose crops, grayscale, non-cells) get a flag and the label Unknown (docs/trust.md); loose crops "
        "are put on black first (`--segment auto`); field photos go through `malaria-cells smear`.",
        "- Labels come from one expert reader; some cells in the public set are known to be mislabelled.",
        "- Cell-level metrics; a patient-level decision needs many cells and a clinical protocol.",
        "",
        "## How this model was made (rerun these)",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(*, run_dir: Path, eval_json: Path, onnx_paths: list[Path], commands: list[str], out: Path) -> Path:
    """Render the model card and write it atomically.

    Args:
        run_dir: see :func:`render_model_card`.
        eval_json: see :func:`render_model_card`.
        onnx_paths: see :func:`render_model_card`.
        commands: see :func:`render_model_card`.
        out: destination (e.g. ``models/MODEL_CARD.md``).

    Returns:
        ``out``.
    """
    return atomic_write_text(
        out, render_model_card(run_dir=run_dir, eval_json=eval_json, onnx_paths=onnx_paths, commands=commands)
    )
