"""Time to reach a given validation accuracy, per trained run, from its own training log.

Reads each run folder's ``metrics.jsonl`` (one row per epoch: validation accuracy at threshold 0.5 on the
validation patients, and ``elapsed_s``: wall seconds since the run began, backbone feature extraction included)
and ``metadata.json``; for every target accuracy it reports the first epoch that reached it and the time it took.
No training happens here: the numbers are those of the runs as they were trained (``malaria-cells reproduce`` or
``malaria-cells train``), on whatever load the machine had then (each run's median train images/s is shown).
A frozen or fine-tuned run whose backbone outputs came from the feature cache says so: its time excludes the
extraction, whose measured seconds per cell (from the cache's record) are given beside it.

Run: .venv/bin/python benchmarks/time_to_accuracy.py --runs RUN [RUN ...] [--targets 0.90 0.93 0.95 0.96]
Writes benchmarks/results/time_to_accuracy.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import command_line, first_reached, machine_info, save_result
from rich.console import Console
from rich.table import Table

from malaria_cells.errors import RunError
from malaria_cells.run import Run


def run_row(run: Run, targets: list[float]) -> dict:
    """Targets reached, with epoch and seconds, and how the run was set up."""
    meta = run.meta.to_dict()
    history = run.history()
    transfer = meta.get("transfer") or {}
    extraction = transfer.get("extraction") or {}
    store = transfer.get("pooled_store") or transfer.get("activation_store") or {}
    features = None
    if run.meta.strategy != "scratch":
        computed = extraction.get("computed", 0)
        features = (
            f"extracted in this run: {computed:,} cell-views in {extraction.get('seconds', 0):.0f} s"
            if computed
            else "from the feature cache (extraction not in the times)"
        )
        if not computed and store.get("file"):
            rec = Path(store["file"]).with_suffix(".json")  # the feature cache's own record (not a run file)
            if rec.exists():
                per = json.loads(rec.read_text()).get("seconds_per_item")
                if per:
                    features += f"; the cache's last extraction ran at {1 / per:,.0f} cell-views/s"
    return {
        "run": str(run.path),
        "model": run.meta.model,
        "strategy": run.meta.strategy,
        "input_size": run.meta.preprocessing.input_size,
        "epochs_run": len(history),
        "best_val_accuracy_at_0_5": max((r.get("val_accuracy", 0) for r in history), default=None),
        "train_images_per_s_median": meta.get("train_images_per_s_median"),
        "setup_s": meta.get("setup_s"),
        "features": features,
        "reached": first_reached(history, targets),
        "val_cells": run.meta.val_metrics_at_threshold.get("n"),
    }


def finished(path: str) -> Run | None:
    """The finished run in ``path``, or None (an unfinished or broken run is skipped with a note)."""
    try:
        return Run.open(path)
    except RunError as e:
        print(f"skipped: {e}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.93, 0.95, 0.96])
    ap.add_argument("--out", default="benchmarks/results/time_to_accuracy.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "torch", "timm"])
    rows = [run_row(run, args.targets) for run in map(finished, args.runs) if run]
    table = Table(title="Time to a validation accuracy (threshold 0.5, validation patients), from each run's log")
    table.add_column("run")
    table.add_column("strategy")
    for t in args.targets:
        table.add_column(f">= {100 * t:.0f} %", justify="right")
    table.add_column("train img/s", justify="right")
    for r in rows:
        cells = []
        for t in args.targets:
            hit = r["reached"][f"{t:.2f}"]
            cells.append(f"{hit['elapsed_s']:,.0f} s (ep {hit['epoch']})" if hit else "not reached")
        ips = r["train_images_per_s_median"]
        table.add_row(r["run"], r["strategy"], *cells, f"{ips:,.0f}" if ips else "—")
    Console().print(table)
    params = {"runs": args.runs, "targets": args.targets}
    save_result(
        args.out,
        name="time_to_accuracy",
        command=command_line(),
        params=params,
        results={"rows": rows},
        machine=machine,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
