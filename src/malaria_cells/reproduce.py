"""``reproduce``: train the published project's models on one patient-level split and compare them honestly.

Every row is trained on the same training patients, its threshold chosen on the same validation patients,
and scored on the same test patients, with patient-bootstrap 95 % CIs. ``results.md``, ``results.json`` and
``comparison.png`` land in the output folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from malaria_cells import plots
from malaria_cells.config import TrainConfig
from malaria_cells.evaluate import evaluate_run
from malaria_cells.io import atomic_write_json, atomic_write_text
from malaria_cells.progress import console
from malaria_cells.train import train


@dataclass(frozen=True)
class Row:
    """One model of the comparison."""

    name: str
    model: str
    strategy: str
    published: float | None = None  # the published project's accuracy (%, leaky by-image split)
    quick_epochs: int = 4
    quick_max_images: int = 4000


ROWS: tuple[Row, ...] = (Row("Custom CNN (from scratch)", "custom-cnn", "scratch", published=93.60, quick_epochs=5),)

PUBLISHED_NOTE = (
    "Published figures: the project this tool reproduces, split by image (cells of one patient in train and "
    "test), which inflates accuracy by several points (Rajaraman et al., PeerJ 2018: 98.6 % by image vs 95.9 % "
    "by patient for the same model)."
)


def reproduce(
    *,
    data_dir: Path,
    out_dir: Path,
    quick: bool = False,
    seed: int = 0,
    n_boot: int = 1000,
    resume: bool = True,
    rows: tuple[Row, ...] = ROWS,
) -> dict:
    """Train and evaluate every row on one patient-level split; write results.md/json and a comparison plot.

    Args:
        data_dir: folder or zip archive of cell images.
        out_dir: output folder (one run folder per row inside, plus the results).
        quick: a class-balanced subset and few epochs (the README's demo; minutes, not an hour).
        seed: split, subset and training seed (the same for every row, so rows share patients).
        n_boot: patient-bootstrap resamples.
        resume: reuse finished runs in ``out_dir`` and resume interrupted ones.
        rows: the models to compare.

    Returns:
        The results dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    t_all = time.perf_counter()
    for row in rows:
        slug = row.name.lower().split(" (")[0].replace(" ", "-")
        run_dir = out_dir / f"{slug}-{row.strategy}"
        overrides = {"model": row.model, "strategy": row.strategy, "seed": seed}
        if quick:
            overrides.update(epochs=row.quick_epochs, max_images=row.quick_max_images)
        config = TrainConfig(**overrides)
        console.rule(f"[bold]{row.name}")
        t0 = time.perf_counter()
        if (run_dir / "metadata.json").exists() and resume:
            console.print(f"reusing finished run {run_dir}")
        else:
            train(config=config, data_dir=data_dir, run_dir=run_dir, resume=resume and (run_dir / "state.pt").exists())
        ev = evaluate_run(run_dir=run_dir, data_dir=data_dir, split="test", n_boot=n_boot, seed=seed)
        import json

        meta = json.loads((run_dir / "metadata.json").read_text())
        results.append(
            {
                "name": row.name,
                "model": row.model,
                "strategy": row.strategy,
                "run": str(run_dir),
                "published_accuracy_leaky": row.published,
                "metrics": {k: ev["metrics"][k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "mcc")},
                "threshold": ev["threshold"],
                "parameters": meta["parameters"],
                "weights_mb": meta["weights_mb"],
                "train_time_s": meta["train_time_s"],
                "train_images_per_s": meta["train_images_per_s_median"],
                "inference_cells_per_s": ev["inference_cells_per_s"],
                "n_test_cells": ev["n_cells"],
                "n_test_patients": ev["n_patients"],
                "wall_s": time.perf_counter() - t0,
            }
        )
    out = {
        "quick": quick,
        "seed": seed,
        "data": str(data_dir),
        "split": "patient",
        "date": dt.date.today().isoformat(),
        "wall_s": time.perf_counter() - t_all,
        "rows": results,
    }
    atomic_write_json(out_dir / "results.json", out)
    plots.plot_comparison(
        [
            {
                "name": r["name"],
                "value": r["metrics"]["accuracy"]["value"],
                "low": r["metrics"]["accuracy"]["low"],
                "high": r["metrics"]["accuracy"]["high"],
                "published": r["published_accuracy_leaky"] / 100 if r["published_accuracy_leaky"] else None,
            }
            for r in results
        ],
        out_dir / "comparison.png",
        metric="accuracy",
    )
    atomic_write_text(out_dir / "results.md", render_results(out))
    console.print(f"[green]wrote[/] {out_dir / 'results.md'}")
    return out


def _ci(d: dict, pct: bool = True) -> str:
    f = 100 if pct else 1
    digits = 2 if pct else 3
    if d["value"] is None or d["value"] != d["value"]:
        return "n/a"
    return f"{d['value'] * f:.{digits}f} ({d['low'] * f:.{digits}f}–{d['high'] * f:.{digits}f})"


def render_results(out: dict) -> str:
    """The comparison table as Markdown."""
    mode = "quick (subset, few epochs: a smoke test, not the reported result)" if out["quick"] else "full"
    lines = [
        "# malaria-cells: model comparison on patient-disjoint test patients",
        "",
        f"- Mode: {mode}; date {out['date']}; data `{out['data']}`; seed {out['seed']}; wall time "
        f"{out['wall_s'] / 60:.1f} min",
        "- Accuracy, sensitivity, specificity in %; 95 % CIs from a bootstrap over test **patients**;"
        " threshold chosen on validation patients.",
        "",
        "| Model | Accuracy | Sensitivity | Specificity | ROC-AUC | MCC | Published (leaky) | Params | Size MB |"
        " Train min | Train img/s | Infer cells/s |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        m = r["metrics"]
        pub = f"{r['published_accuracy_leaky']:.2f}" if r["published_accuracy_leaky"] else "—"
        lines.append(
            f"| {r['name']} | {_ci(m['accuracy'])} | {_ci(m['sensitivity'])} | {_ci(m['specificity'])} | "
            f"{_ci(m['roc_auc'], pct=False)} | {_ci(m['mcc'], pct=False)} | {pub} | {r['parameters']:,} | "
            f"{r['weights_mb']:.2f} | {r['train_time_s'] / 60:.1f} | {r['train_images_per_s']:.0f} | "
            f"{r['inference_cells_per_s']:.0f} |"
        )
    lines += ["", PUBLISHED_NOTE, "", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def row_names() -> list[str]:
    """Names of the default rows."""
    return [dataclasses.asdict(r)["name"] for r in ROWS]
