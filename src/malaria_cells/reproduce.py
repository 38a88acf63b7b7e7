"""``reproduce``: train the published project's models on one patient-level split and compare them honestly.

Every row is trained on the same training patients, its threshold chosen on the same validation patients,
and scored on the same test patients, with patient-bootstrap 95 % CIs. A leakage audit trains one model
again on a split by image (cells of one patient on both sides) and reports how much that inflates accuracy,
which is how the published figures were obtained. ``results.md``, ``results.json`` and ``comparison.png`` land
in the output folder. Rows whose pretrained weights cannot be had are reported as such; nothing is trained
from random weights in their place.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malaria_cells import plots
from malaria_cells.config import TrainConfig
from malaria_cells.ensemble import evaluate_combination
from malaria_cells.evaluate import evaluate_run
from malaria_cells.io import atomic_write_json, atomic_write_text
from malaria_cells.models import build_model
from malaria_cells.run import Run
from malaria_cells.split import LEAKY, PATIENT
from malaria_cells.train import resolve_model_defaults, train
from malaria_cells.weights import WeightsUnavailable, load_pretrained

UNAVAILABLE = "ImageNet weights unavailable"
QUICK_MAX_IMAGES = 2000  # class-balanced subset for --quick (about 90 patients keep some cells)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One model of the comparison."""

    name: str
    model: str
    strategy: str
    published: float | None = None  # the published project's accuracy (%, leaky by-image split)
    init_from: str | None = None  # key of the row whose run this one starts from (finetune: the frozen row)
    epochs: int | None = None  # full run; None = the model's default
    quick_epochs: int | None = 3  # --quick; None = the model and strategy default

    @property
    def key(self) -> str:
        """Run folder name and reference for ``init_from``."""
        return f"{self.model}-{self.strategy}"


# Epochs: a frozen head trains in seconds on cached features, so it keeps the strategy's default (40, early stopping
# decides) even in --quick; fine-tuning is the expensive row (the unfrozen stages run forward and backward every
# step) and gets few.
ROWS: tuple[Row, ...] = (
    Row("Custom CNN (from scratch)", "custom-cnn", "scratch", published=93.60, quick_epochs=5),
    Row("ResNet50V2, frozen base", "resnet50v2", "frozen", published=93.41, quick_epochs=None),
    Row(
        "ResNet50V2, fine-tuned",
        "resnet50v2",
        "finetune",
        published=96.23,
        init_from="resnet50v2-frozen",
        epochs=3,
        quick_epochs=2,
    ),
    Row("EfficientNet-Lite0, frozen base", "efficientnet-lite0", "frozen", quick_epochs=None),
    Row(
        "EfficientNet-Lite0, fine-tuned",
        "efficientnet-lite0",
        "finetune",
        init_from="efficientnet-lite0-frozen",
        epochs=3,
        quick_epochs=3,
    ),
)


@dataclass(frozen=True)
class Combo:
    """A test-time combination of finished rows (see :mod:`malaria_cells.ensemble`): what beats single models."""

    name: str
    rows: tuple[str, ...]  # row keys whose runs are averaged
    tta: bool = False  # average each over the 8 dihedral views

    @property
    def key(self) -> str:
        """File name of its cached result."""
        return "+".join(self.rows) + ("-tta" if self.tta else "")


# The custom CNN is cheap enough to run 8 times per cell; the ensemble pairs the two best single models of
# different families (a 64 px CNN from scratch and an ImageNet-pretrained 128 px network), whose errors differ.
COMBOS: tuple[Combo, ...] = (
    Combo("Custom CNN + 8-view test-time augmentation", ("custom-cnn-scratch",), tta=True),
    Combo(
        "Ensemble: custom CNN + EfficientNet-Lite0 fine-tuned", ("custom-cnn-scratch", "efficientnet-lite0-finetune")
    ),
)
# The leakage audit retrains each of these rows that completed on a by-image split (or, when none did, the first row
# that did). The frozen Lite0 head is the cheapest to train again (its backbone features are cached: same cells,
# other split) but a head on fixed ImageNet features has less room to learn a patient's look; the custom CNN
# learns every layer from these cells, like the published models, so it is the audit that matters.
AUDIT_ROWS: tuple[str, ...] = ("efficientnet-lite0-frozen", "custom-cnn-scratch")
METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc", "mcc")

PUBLISHED_NOTE = (
    "Published figures: the project this tool reproduces, split by image (cells of one patient in train and "
    "test), which inflates accuracy by several points (Rajaraman et al., PeerJ 2018: 98.6 % by image vs 95.9 % "
    "by patient for the same model). They are shown beside, not compared with, the patient-level numbers; the "
    "leakage audit measures the inflation on this data."
)


def check_weights(model: str, source: str) -> None:
    """Load a model's pretrained weights once, to learn before any training whether they can be had.

    Args:
        model: registry name of a timm model.
        source: "imagenet" or a file.

    Raises:
        WeightsUnavailable: with the reason and what to pass instead.
    """
    load_pretrained(build_model(model).backbone, name=model, source=source)


def reproduce(
    *,
    data_dir: Path,
    out_dir: Path,
    quick: bool = False,
    strict: bool = False,
    seed: int = 0,
    n_boot: int = 1000,
    resume: bool = True,
    rows: tuple[Row, ...] | None = None,
    audit: bool = True,
    weights: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    combos: tuple[Combo, ...] | None = None,
) -> dict:
    """Train and evaluate every row on one patient-level split, run the leakage audit, write the results.

    Args:
        data_dir: folder or zip archive of cell images.
        out_dir: output folder (one run folder per row inside, plus the results).
        quick: a class-balanced subset and few epochs (the README's demo; minutes, not an hour).
        strict: stop before training anything when a row's pretrained weights cannot be had.
        seed: split, subset and training seed (the same for every row, so rows share patients).
        n_boot: patient-bootstrap resamples.
        resume: reuse finished runs in ``out_dir`` and resume interrupted ones.
        rows: the models to compare (default :data:`ROWS`).
        audit: run the by-image leakage audit.
        weights: pretrained weights per model name ("imagenet" or a file); default "imagenet".
        overrides: config fields applied to every row (e.g. ``input_size``, ``max_images`` in tests).
        combos: test-time combinations of finished rows (default :data:`COMBOS`; those whose rows did not
            run are left out).

    Returns:
        The results dict (also written to ``results.json``); ``unavailable`` lists the rows without weights.

    Raises:
        WeightsUnavailable: ``strict`` and some row's weights cannot be had (raised before any training).
    """
    rows = ROWS if rows is None else rows
    weights = weights or {}
    out_dir = Path(out_dir)
    t_all = time.perf_counter()
    missing: dict[str, str] = {}
    for model in dict.fromkeys(r.model for r in rows if r.strategy != "scratch"):
        try:
            check_weights(model, weights.get(model, "imagenet"))
        except WeightsUnavailable as e:
            missing[model] = str(e)
    if missing and strict:
        raise WeightsUnavailable("; ".join(f"{m}: {msg}" for m, msg in missing.items()))
    for model, msg in missing.items():
        log.warning("%s: %s; its rows are reported as such. %s", model, UNAVAILABLE, msg)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: list[dict] = []
    runs: dict[str, Path] = {}
    reused = 0  # finished runs found in out_dir and not trained again
    for i, row in enumerate(rows, 1):
        log.info("row %d/%d: %s", i, len(rows), row.name)
        reason = missing.get(row.model)
        if reason is None and row.init_from and row.init_from not in runs:
            reason = f"starts from row {row.init_from}, which did not run"
        if reason is not None:
            results.append(_unavailable(row, reason))
            continue
        config = row_config(row, quick=quick, seed=seed, runs=runs, weights=weights, overrides=overrides)
        run_dir = out_dir / row.key
        t0 = time.perf_counter()
        reused += train_or_reuse(config, data_dir=data_dir, run_dir=run_dir, resume=resume)
        runs[row.key] = run_dir
        results.append(_evaluate(row, run_dir, data_dir=data_dir, n_boot=n_boot, seed=seed, t0=t0))
    same = _same_test_cells([Path(r["run"]) for r in results if r["status"] == "ok"])
    for combo in COMBOS if combos is None else combos:
        if all(k in runs for k in combo.rows):
            log.info("combination: %s", combo.name)
            results.append(
                _combination(combo, runs, results, out_dir=out_dir, data_dir=data_dir, n_boot=n_boot, seed=seed)
            )

    audits: list[dict] = []
    keys = [k for k in AUDIT_ROWS if k in runs] or list(runs)[:1]
    for key in keys if audit else []:
        row = next(r for r in rows if r.key == key)
        log.info("leakage audit: %s on a LEAKY by-image split", row.name)
        config = row_config(row, quick=quick, seed=seed, runs=runs, weights=weights, overrides=overrides, split=LEAKY)
        run_dir = out_dir / f"audit-{LEAKY}-{row.key}"
        t0 = time.perf_counter()
        reused += train_or_reuse(config, data_dir=data_dir, run_dir=run_dir, resume=resume)
        leaky = _evaluate(row, run_dir, data_dir=data_dir, n_boot=n_boot, seed=seed, t0=t0)
        honest = next(r for r in results if r["status"] == "ok" and r["run"] == str(runs[row.key]))
        audits.append(
            {
                "row": row.name,
                "split": LEAKY,
                "leaky": leaky,
                "patient_accuracy": honest["metrics"]["accuracy"],
                "inflation_points": 100
                * (leaky["metrics"]["accuracy"]["value"] - honest["metrics"]["accuracy"]["value"]),
            }
        )

    previous = out_dir / "results.json"
    first_wall = None  # the wall time of the first invocation, which trained the runs this one reused
    before = _read_result(previous) if reused else None
    if before is not None:
        first_wall = before.get("full_run_wall_s") or (before["wall_s"] if not before.get("reused_runs") else None)
    command = " ".join(
        ["malaria-cells reproduce", f"--data {data_dir}", f"--out {out_dir}"]
        + (["--quick"] if quick else [])
        + ([f"--seed {seed}"] if seed else [])
        + ([f"--n-boot {n_boot}"] if n_boot != 1000 else [])
        + [f"--weights {m}={w}" for m, w in weights.items()]
    )
    out = {
        "command": command,
        "quick": quick,
        "seed": seed,
        "data": str(data_dir),
        "split": PATIENT,
        "same_test_cells": same,
        "date": dt.date.today().isoformat(),
        "wall_s": time.perf_counter() - t_all,
        "reused_runs": reused,
        "full_run_wall_s": first_wall,
        "rows": results,
        "unavailable": [r["name"] for r in results if r["status"] != "ok"],
        "leakage_audits": audits,
        "overrides": overrides or {},
    }
    atomic_write_json(out_dir / "results.json", out)
    _plot(out, out_dir / "comparison.png")
    atomic_write_text(out_dir / "results.md", render_results(out))
    log.info("wrote %s", out_dir / "results.md")
    if out["unavailable"]:
        log.warning(
            "%d row(s) without results: %s (%s; --strict makes this an error)",
            len(out["unavailable"]),
            ", ".join(out["unavailable"]),
            UNAVAILABLE,
        )
    return out


def row_config(
    row: Row,
    *,
    quick: bool,
    seed: int,
    runs: dict[str, Path],
    weights: dict[str, str],
    overrides: dict[str, Any] | None,
    split: str = PATIENT,
) -> TrainConfig:
    """The resolved training config of a row.

    Args:
        row: the row.
        quick: subset and quick epochs.
        seed: the shared seed.
        runs: finished run folders by row key (for ``init_from``).
        weights: pretrained weights per model name.
        overrides: fields applied last.
        split: "patient" or "image-leaky" (the audit).

    Returns:
        The config.
    """
    values: dict[str, Any] = {"model": row.model, "strategy": row.strategy, "seed": seed, "split": split}
    if row.strategy != "scratch":
        values["weights"] = weights.get(row.model, "imagenet")
    epochs = row.quick_epochs if quick else row.epochs
    if epochs is not None:
        values["epochs"] = epochs
    if quick:
        values["max_images"] = QUICK_MAX_IMAGES
    if row.init_from:
        values["init_from"] = str(runs[row.init_from])
    values.update(overrides or {})
    return resolve_model_defaults(TrainConfig(**values))


def train_or_reuse(config: TrainConfig, *, data_dir: Path, run_dir: Path, resume: bool) -> bool:
    """Train the run, resume it, or reuse it when finished; True when reused."""
    run = Run(run_dir)
    if resume and run.config_path.exists():
        if run.config() != config:
            raise ValueError(
                f"{run_dir} holds a run with another config; pass another --out (or delete it) to train this one"
            )
        if run.finished:
            log.info("reusing finished run %s", run_dir)
            return True
        train(config=config, data_dir=data_dir, run_dir=run_dir, resume=True)
        return False
    train(config=config, data_dir=data_dir, run_dir=run_dir)
    return False


def _unavailable(row: Row, reason: str) -> dict:
    return {
        "name": row.name,
        "model": row.model,
        "strategy": row.strategy,
        "status": "unavailable",
        "reason": reason,
        "published_accuracy_leaky": row.published,
    }


def _evaluate(row: Row, run_dir: Path, *, data_dir: Path, n_boot: int, seed: int, t0: float) -> dict:
    run = Run.open(run_dir)
    done = run_dir / "eval-test" / "metrics.json"
    ev = _read_result(done)
    # A finished evaluation of these very weights (written after them) with the same bootstrap is reused.
    if (
        ev is None
        or ev["data"] != str(data_dir)
        or ev["bootstrap"]["resamples"] != n_boot
        or ev["bootstrap"]["seed"] != seed
        or done.stat().st_mtime < run.weights_path("best").stat().st_mtime
    ):
        ev = evaluate_run(run_dir=run_dir, data_dir=data_dir, split="test", n_boot=n_boot, seed=seed)
    meta = run.meta.to_dict()  # the typed fields plus what the trainer adds (transfer, weights_mb, speeds)
    transfer = meta.get("transfer") or {}
    extraction = transfer.get("extraction") or {}
    return {
        "name": row.name,
        "model": row.model,
        "strategy": row.strategy,
        "status": "ok",
        "run": str(run_dir),
        "split_kind": run.meta.split_kind,
        "published_accuracy_leaky": row.published,
        "metrics": {k: ev["metrics"][k] for k in METRICS},
        "threshold": ev["threshold"],
        "parameters": meta["parameters"],
        "trainable_parameters": meta.get("trainable_parameters"),
        "weights_mb": meta["weights_mb"],
        "weights": meta.get("weights"),
        "input_size": run.meta.preprocessing.input_size,
        "epochs_run": meta["epochs_run"],
        "best_epoch": meta["best_epoch"],
        "train_time_s": meta["train_time_s"],
        "feature_extraction": extraction or None,
        "frozen_part": transfer.get("frozen_part"),
        "train_images_per_s": meta["train_images_per_s_median"],
        "inference_cells_per_s": ev["inference_cells_per_s"],
        "n_test_cells": ev["n_cells"],
        "n_test_patients": ev["n_patients"],
        "wall_s": time.perf_counter() - t0,
    }


def _combination(
    combo: Combo, runs: dict[str, Path], results: list[dict], *, out_dir: Path, data_dir: Path, n_boot: int, seed: int
) -> dict:
    """Score a combination of finished rows (reusing its saved result when no run changed since)."""
    t0 = time.perf_counter()
    run_dirs = [runs[k] for k in combo.rows]
    path = out_dir / "combinations" / f"{combo.key}.json"
    ev = _read_result(path)
    if (
        ev is None
        or ev["data"] != str(data_dir)
        or (ev["n_boot"], ev["seed"]) != (n_boot, seed)
        or any(path.stat().st_mtime < Run(r).weights_path("best").stat().st_mtime for r in run_dirs)
    ):
        ev = evaluate_combination(
            run_dirs=run_dirs,
            data_dir=data_dir,
            tta=combo.tta,
            n_boot=n_boot,
            seed=seed,
            out_csv=out_dir / "combinations" / f"{combo.key}-test.csv",
        )
        ev.update(data=str(data_dir), n_boot=n_boot, seed=seed)
        atomic_write_json(path, ev)
    parts = [next(r for r in results if r.get("run") == str(d)) for d in run_dirs]
    return {
        "name": combo.name,
        "model": " + ".join(p["model"] for p in parts),
        "strategy": "combination",
        "kind": "combination",
        "status": "ok",
        "run": None,
        "rows": [p["name"] for p in parts],
        "tta": combo.tta,
        "published_accuracy_leaky": None,
        "metrics": {k: ev["metrics"][k] for k in METRICS},
        "threshold": ev["threshold"],
        "parameters": sum(p["parameters"] for p in parts),
        "weights_mb": sum(p["weights_mb"] for p in parts),
        "train_time_s": sum(p["train_time_s"] for p in parts),
        "inference_cells_per_s": ev["inference_cells_per_s"],
        "n_test_cells": ev["n_cells"],
        "n_test_patients": ev["n_patients"],
        "wall_s": time.perf_counter() - t0,
    }


def _same_test_cells(run_dirs: list[Path]) -> bool:
    """Whether every run's split.csv puts the same cells in test (so every row is scored on the same patients)."""
    sets = {frozenset(rel for rel, which in Run(d).split().assignment.items() if which == "test") for d in run_dirs}
    same = len(sets) <= 1
    if not same:
        log.warning("the rows were not tested on the same cells; compare them with care")
    return same


def _read_result(path: Path) -> dict | None:
    """A result this module wrote earlier (``results.json``, a combination's JSON) or an evaluation's
    ``metrics.json``: the one place reproduce reads JSON; ``None`` when the file is absent.

    Run folders themselves (metadata, config, split) are read through :class:`~malaria_cells.run.Run`.
    """
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _plot(out: dict, path: Path) -> None:
    bars = [
        {
            "name": r["name"],
            "value": r["metrics"]["accuracy"]["value"],
            "low": r["metrics"]["accuracy"]["low"],
            "high": r["metrics"]["accuracy"]["high"],
            "published": r["published_accuracy_leaky"] / 100 if r["published_accuracy_leaky"] else None,
        }
        for r in out["rows"]
        if r["status"] == "ok"
    ]
    for audit in out["leakage_audits"]:
        acc = audit["leaky"]["metrics"]["accuracy"]
        name = f"LEAKY by-image split (audit only):\n{audit['row']}"
        bars.append({"name": name, "value": acc["value"], "low": acc["low"], "high": acc["high"], "published": None})
    plots.plot_comparison(bars, path, metric="accuracy")


def _ci(d: dict, pct: bool = True) -> str:
    f = 100 if pct else 1
    digits = 2 if pct else 3
    if d["value"] is None or d["value"] != d["value"]:
        return "n/a"
    if d.get("low") is None or d.get("high") is None:
        return f"{d['value'] * f:.{digits}f}"
    return f"{d['value'] * f:.{digits}f} ({d['low'] * f:.{digits}f}–{d['high'] * f:.{digits}f})"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def render_results(out: dict) -> str:
    """The comparison table, the leakage audit and the notes, as Markdown."""
    mode = "quick (subset, few epochs: a smoke test, not the reported result)" if out["quick"] else "full"
    first = next((r for r in out["rows"] if r["status"] == "ok"), None)
    cells = f"{first['n_test_cells']:,} cells of {first['n_test_patients']} patients" if first else "no rows ran"
    lines = [
        "# malaria-cells: model comparison on patient-disjoint test patients",
        "",
        f"- Mode: {mode}; date {out['date']}; data `{out['data']}`; seed {out['seed']}; wall time "
        f"{out['wall_s'] / 60:.1f} min"
        + (
            f" (reusing {out['reused_runs']} finished run(s) of an earlier invocation"
            + (f", which took {out['full_run_wall_s'] / 60:.1f} min" if out.get("full_run_wall_s") else "")
            + ")"
            if out.get("reused_runs")
            else ""
        ),
        f"- Command: `{out.get('command', 'malaria-cells reproduce')}`",
        f"- Test set: {cells}, the same for every row: {'yes' if out['same_test_cells'] else '**NO**'}. "
        "Accuracy, sensitivity, specificity in %; 95 % CIs from a bootstrap over test **patients**; threshold "
        "chosen on validation patients.",
        "",
        "| Model | Accuracy | Sensitivity | Specificity | ROC-AUC | MCC | Published accuracy (leaky split) | Params |"
        " Size MB | Train min | Infer cells/s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        pub = f"{r['published_accuracy_leaky']:.2f}" if r["published_accuracy_leaky"] else "—"
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | **{UNAVAILABLE}** | — | — | — | — | {pub} | — | — | — | — |")
            continue
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {_ci(m['accuracy'])} | {_ci(m['sensitivity'])} | {_ci(m['specificity'])} | "
            f"{_ci(m['roc_auc'], pct=False)} | {_ci(m['mcc'], pct=False)} | {pub} | {r['parameters']:,} | "
            f"{r['weights_mb']:.2f} | {r['train_time_s'] / 60:.2f} | {_num(r['inference_cells_per_s'], '.0f')} |"
        )
    if out["leakage_audits"]:
        lines += [
            "",
            "## Leakage audit — LEAKY by-image split (not a result)",
            "",
            "The same training as the named row, but split **by image**: cells of one patient sit in train and test, "
            "as in the published project. These numbers are inflated and exist only to show by how much.",
            "",
            "| Row retrained on a by-image split | Test accuracy %, by image (**LEAKY**) | by patient (honest, table "
            "above) | **Inflation** (leaky − patient) |",
            "|---|---|---|---|",
        ]
        for audit in out["leakage_audits"]:
            lines.append(
                f"| {audit['row']} | {_ci(audit['leaky']['metrics']['accuracy'])} | {_ci(audit['patient_accuracy'])} "
                f"| **{audit['inflation_points']:+.2f} points** |"
            )
    lines += [
        "",
        "## How each row was trained",
        "",
        "| Model | Input px | Weights | Trainable params | Epochs (best) | Train images/s | Frozen-backbone "
        "features | Fine-tuning input |",
        "|---|---:|---|---:|---|---:|---|---|",
    ]
    for r in out["rows"]:
        if r.get("kind") == "combination":
            continue  # listed below the table
        if r["status"] != "ok":
            why = r["reason"].split(" (")[0]
            lines.append(
                f"| {r['name']} | — | {UNAVAILABLE}: {why}; pass `--weights {r['model']}=FILE` | — | — | — | — | — |"
            )
            continue
        ext = r.get("feature_extraction") or {}
        feats = (
            f"{ext['computed']:,} computed at {_num(ext.get('images_per_s'), '.0f')} img/s, {ext['reused']:,} reused"
            if ext
            else "—"
        )
        lines.append(
            f"| {r['name']} | {r['input_size']} | {r['weights'] or 'none'} | {_num(r['trainable_parameters'], ',')} | "
            f"{r['epochs_run']} ({r['best_epoch']}) | {_num(r.get('train_images_per_s'), ',.0f')} | {feats} | "
            f"{r.get('frozen_part') or '—'} |"
        )
    combos = [r for r in out["rows"] if r.get("kind") == "combination"]
    lines += [""] if combos else []
    for r in combos:
        how = "mean P(Parasitized) over the 8 rotations/reflections of each cell" if r["tta"] else "mean P(Parasitized)"
        lines.append(
            f"- *{r['name']}*: {how} of {', '.join(r['rows'])}; threshold {r['threshold']:.3f} chosen on the "
            "validation patients; params, size and train time are the sums of its parts; evaluation-time only "
            "(`predict`/`export` serve one run)."
        )
    lines += [
        "",
        "- Train min: this row's own training, feature extraction included; a fine-tuned row starts from its "
        "frozen row's head and cached activations, whose time is in the frozen row.",
        "- Infer cells/s: the whole model on the test cells, this machine, batch 256.",
        "- Train images/s: median over epochs of training images per second; a frozen row's head trains on cached "
        "backbone features (the extraction's own speed is in the next column).",
        f"- {PUBLISHED_NOTE}",
        "- EfficientNet-Lite0 rows have no published counterpart: they are this tool's additions.",
    ]
    if out["unavailable"]:
        lines.append(
            f"- {UNAVAILABLE}: those rows were not trained (never from random weights in their place). Provide the "
            "weights (see the reason above) and run again; finished rows are reused."
        )
    lines += ["", "![comparison](comparison.png)", ""]
    return "\n".join(lines)
