"""Rebuild the benchmark tables of docs/benchmarks.md from benchmarks/results/*.json (the last step of ``make bench``).

Reads the results that exist (inference_matrix, scaling, train_speed_*, transfer_strategies, emfet, inference_speed,
onnx_path, load_test; a missing one gets a line saying how to make it) and replaces the text between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in docs/benchmarks.md; nothing else in that file changes. Every
table says where its numbers come from: machine, date and git commit as the JSON records them (for older files that do
not, the last commit of the JSON file itself), and the command that reruns it. Files are read with
:func:`harness.load_result`, which gives old (flat) and new (``malaria-cells-bench/1``) files one shape: ``machine``,
``params``, ``results``; ``result[key]`` finds a key in ``results`` or ``params``.

Run: .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--doc docs/benchmarks.md] [--check]
``--check`` writes nothing and exits 1 when the document's section differs from what the JSON files give.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from harness import ROOT, Result, git, load_result

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
DOC = ROOT / "docs" / "benchmarks.md"  # where the tables live (the README links it)
MODEL_NAMES = {
    "custom-cnn": "custom CNN",
    "efficientnet-lite0": "EfficientNet-Lite0",
    "resnet50v2": "ResNet50V2",
    "shipped": "shipped default",
}


# --------------------------------------------------------------------------------------------- formatting


def rate(x: float | None) -> str:
    """A throughput with as many digits as it deserves: 1,480 / 64.2 / 2.35."""
    if x is None or x != x:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ms(x: float | None) -> str:
    """Milliseconds, 3 significant digits or so."""
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def num(x: float | None, digits: int = 1) -> str:
    """A plain number, or n/a."""
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 thread`` / ``2 threads``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one character per column: l or r (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def provenance(r: Result) -> str:
    """Machine, date and commit of a result file, from its own record where it has one."""
    m = r.machine
    cpu = m.get("cpu_model")
    cores = m.get("cpus_usable") or m.get("cpu_count")
    parts = []
    if cpu or cores:
        parts.append(", ".join(str(p) for p in (cpu, f"{cores} cores" if cores else None) if p))
    if "native_bf16" in m:
        parts.append(f"native bf16: {'yes' if m['native_bf16'] else 'no'}")
    date = (m.get("date") or "")[:10]
    parts.append(date or "date not recorded")
    commit = m.get("git_commit")
    if commit:
        parts.append(f"commit {commit[:7]}" + (" + local changes" if m.get("git_dirty") else ""))
    else:
        # Older scripts do not record the commit; the last commit of the JSON file is the closest thing.
        last = changed = None
        if r.path.resolve().is_relative_to(ROOT):
            rel = str(r.path.resolve().relative_to(ROOT))
            last, changed = git("log", "-1", "--format=%h %cs", "--", rel), git("status", "--porcelain", "--", rel)
        if last and not changed:
            parts.append(f"commit not recorded (file committed in {last.split()[0]}, {last.split()[1]})")
        else:
            parts.append("commit not recorded")
    start = m.get("load_average_start")
    if isinstance(start, list) and start:
        parts.append(f"load {start[0]:.1f} at start")
    if r.get("quick"):
        parts.append("**quick run**")
    return " · ".join(parts)


def heading(title: str, command: str, r: Result) -> list[str]:
    """A table's title, its rerun command and where its numbers come from."""
    return [f"#### {title}", "", f"`{command}` → `{r.path.name}` · {provenance(r)}", ""]


# --------------------------------------------------------------------------------------------- sections


def inference_matrix(d: Result) -> list[str]:
    """Model x runtime x batch: cells/s and latency, decoded and end to end; peak RSS per cell."""
    rows = []
    for c in d["cells"]:
        name = MODEL_NAMES.get(c["model"], c["model"])
        weights = "" if c["model"] == "shipped" or not c.get("weights", "").startswith("random") else " (random init)"
        label = f"{name}{weights}, {c.get('input_size', '?')} px"
        if "error" in c:
            rows.append([label, c["runtime"], "", f"failed: {c['error'][:60]}", "", "", ""])
            continue
        row = [label, c["runtime"].replace("ort", "ONNX RT"), f"{c['peak_rss_mb']:,.0f} MB"]
        for b in ("1", "64"):
            for mode in ("decoded", "end_to_end"):
                m = c["batches"].get(b, {}).get(mode)
                lat = m["latency_ms"] if m else None
                row.append(f"{rate(m['cells_per_s'])} · {ms(lat['p50'])}/{ms(lat['p99'])}" if m else "")
        rows.append(row)
    cmd = (d.command or "python benchmarks/inference_matrix.py").strip()
    out = heading("Inference: model × runtime × batch", cmd, d)
    out += table(
        ["Model", "Runtime", "Peak RSS", "b=1 decoded", "b=1 end to end", "b=64 decoded", "b=64 end to end"],
        rows,
        "llrrrrr",
    )
    out += [
        "",
        f"Cells/s · per-call latency p50/p99 ms; {plural(d['threads'], 'thread')}; median of "
        f"{plural(d['passes'], 'pass', 'passes')}, each cell "
        "a fresh process (its peak RSS: imports, load, all timings). *decoded*: the model on letterboxed uint8 "
        "cells; *end to end*: `Classifier.predict(paths)` on share files (read, decode, letterbox, model). Random-"
        "init models time like trained ones; int8 = static QDQ as `malaria-cells export --int8`.",
        "",
    ]
    return out


def scaling(d: Result) -> list[str]:
    """Predict, train and cache-build time and memory against the number of images, with the line fits."""
    parts = {k: {r["images"]: r for r in d[k]["rows"]} for k in ("predict", "train", "cache_build") if k in d}
    sizes = d["sizes"]
    rows = []
    for n in sizes:
        p, t, c = (parts.get(k, {}).get(n, {}) for k in ("predict", "train", "cache_build"))
        rows.append(
            [
                f"{n:,}",
                f"{num(p.get('wall_s'))} s · {rate(p.get('images_per_s'))}/s" if p else "",
                f"{num(p.get('peak_rss_mb'), 0)} ({num(p.get('peak_rss_anon_mb'), 0)})" if p else "",
                f"{num(t.get('wall_s'))} s · {rate(t.get('train_images_per_s'))}/s" if t else "",
                f"{num(t.get('peak_rss_mb'), 0)} ({num(t.get('peak_rss_anon_mb'), 0)})" if t else "",
                num(100 * t["val_accuracy_after_1_epoch"], 1) + " %" if t.get("val_accuracy_after_1_epoch") else "",
                f"{num(c.get('prepare_s'))} s" if c else "",
            ]
        )
    cmd = (d.command or "python benchmarks/scaling.py").strip()
    out = heading("How cost grows with the number of images", cmd, d)
    out += table(
        [
            "Images",
            "predict (s · images/s)",
            "predict peak RSS MB (anon)",
            "train, 1 epoch (process s · epoch images/s)",
            "train peak RSS MB (anon)",
            "val acc after 1 epoch",
            "cold cache build",
        ],
        rows,
    )
    lines = []
    for key, what in (("predict", "predict"), ("train", "train 1 epoch"), ("cache_build", "cold cache build")):
        if key not in d:
            continue
        f = d[key]["fit_prepare_s"] if key == "cache_build" else d[key]["fit_wall_s"]
        q = d[key]["rss_ratio_largest_to_smallest"]
        r2 = f"R² {f['r2']:.3f}" if f.get("r2") is not None else "R² n/a"
        lines.append(
            f"{what}: {num(f['s_per_1k_images'], 2)} s per 1,000 images + {num(f['intercept_s'])} s ({r2}); "
            f"peak RSS ×{num(q['peak_rss'], 2)} from {q['sizes'][0]:,} to {q['sizes'][1]:,} images "
            f"(anonymous ×{num(q['anon'], 2)})"
        )
    out += [
        "",
        f"Least-squares lines of time vs images; medians of {plural(d['repeat'], 'interleaved round')}, "
        f"{plural(d['threads'], 'thread')}:",
        "",
    ]
    out += [f"- {ln}" for ln in lines]
    tta = d.get("time_to_accuracy")
    if tta:
        reached = []
        for target, hit in tta["reached"].items():
            pct = f"≥ {100 * float(target):g} %"
            reached.append(
                f"{pct}: epoch {hit['epoch']}, {hit['elapsed_s']:,.0f} s"
                if hit
                else f"{pct}: not within {tta['epochs']} epochs"
            )
        out.append(
            f"- time to a validation accuracy (custom CNN, {tta['images']:,} images, `--epochs {tta['epochs']}`, "
            f"training time incl. validation): " + "; ".join(reached)
        )
    out += [
        "",
        "Anonymous memory is what would grow if anything were held per image; the rest of the RSS is shared "
        "libraries and pages of the memory-mapped image cache (page cache). `predict` streams (csv written row by "
        "row). `train` reads the cache through a memmap; it holds a copy of the validation images (12 KB each at "
        "64 px) and validates in batches of up to 256, whose activations grow with the validation set until it "
        "reaches 256 images (~1,700 images in all) and stay flat beyond.",
        "",
    ]
    return out


def train_speed(files: list[Result]) -> list[str]:
    """Training images/s per model, fp32 vs bf16 autocast, one row per train_speed_<model>.json."""
    rows, sources = [], []
    for d in files:
        ips = d["images_per_s"]
        fp32, bf16 = ips.get("fp32"), ips.get("bf16")
        rounds = len(d.get("rounds", {}).get("fp32", [])) or "?"
        rows.append(
            [
                MODEL_NAMES.get(d["model"], d["model"]),
                f"{d['input_size']} px",
                str(d["batch"]),
                d.machine.get("gpu") or f"CPU, {d['threads']} threads",
                rate(fp32),
                rate(bf16),
                f"{bf16 / fp32:.2f}×" if fp32 and bf16 else "n/a",
            ]
        )
        cmd = f"python benchmarks/train_speed.py --model {d['model']} --batch {d['batch']} --rounds {rounds}"
        if d.get("device", "cpu") != "cpu":  # the command as run by benchmarks/gpu_check.sh (its --out was a temp dir)
            cmd = f"{d.command} (bash benchmarks/gpu_check.sh)"
        sources.append(f"- `{cmd}` → `{d.path.name}` · {provenance(d)}")
    out = ["#### Training speed: fp32 vs bf16 autocast (scratch training step)", ""]
    out += table(["Model", "Input", "Batch", "Device", "fp32 images/s", "bf16 images/s", "bf16 / fp32"], rows)
    out += [
        "",
        "A real step (augmentation, forward, backward, AdamW), median of rounds; bf16 pays off only on CPUs "
        "with native bf16 (AVX-512 BF16 / AMX). On a GPU the augmentation still runs on the CPU, as in `train`, "
        "and the small network leaves the GPU mostly idle: bf16 gains nothing there, a larger batch does.",
        "",
        *sources,
        "",
    ]
    return out


def transfer_strategies(d: Result) -> list[str]:
    """Images/s per model and training strategy (scratch, frozen cold/warm, finetune)."""
    rows = [
        [
            r["run"],
            MODEL_NAMES.get(r["model"], r["model"]),
            r["strategy"],
            f"{r['train_cells']:,}",
            rate(r.get("epoch_cells_per_s")),
            num(r.get("setup_s")),
        ]
        for r in d["rows"]
    ]
    cmd = f"python benchmarks/transfer_strategies.py --max-images {d.params.get('max_images', 600)}"
    out = heading("Training speed per model and strategy (one epoch, small subset)", cmd, d)
    out += table(["Run", "Model", "Strategy", "Train cells", "Epoch cells/s", "Setup s"], rows, "lllrrr")
    if d.get("note"):
        out += ["", f"Note recorded with the measurement: {d['note']}"]
    return [*out, ""]


def decode_speed(d: Result) -> list[str]:
    """WebP -> model input per decoder and thread count, and the shipped model end to end."""
    rows = [
        [
            r["stage"],
            r["decoder"],
            str(r["threads"]),
            str(r.get("decode_processes", 0)),
            rate(r["cells_per_s"]),
            f"{r['vs_pillow']:.2f}×" if r.get("vs_pillow") else "—",
        ]
        for r in sorted(d["rows"], key=lambda r: (r["stage"], r.get("decode_processes", 0), r["threads"], r["decoder"]))
    ]
    out = heading("Decoding: Pillow vs imagecodecs (vs OpenCV), and decoding processes", d.command, d)
    out += table(["Stage", "Decoder", "Threads", "Decode processes", "cells/s", "vs Pillow"], rows)
    out += [
        "",
        f"{d['files']} share files (lossless WebP); decode rows from the bytes in memory, letterbox "
        f"{d['letterbox_px']} px; end to end: `Classifier.predict` on the files with the shipped model (threads = the "
        "model's; decode processes run ahead of it). Median of interleaved rounds. OpenCV is emfet's decoder, shown "
        "for reference.",
    ]
    return [*out, ""]


def arch_speed(d: Result) -> list[str]:
    """Decoded cells/s of custom-CNN layouts x ONNX formats at batch 64, beside the shipped model."""
    rows = [
        [
            name,
            ", ".join(f"{c}×{n}" if n > 1 else str(c) for c, n in r["stages"]) if r.get("stages") else "—",
            f"{r['parameters']:,}" if r.get("parameters") else "—",
            f"{r['onnx_kb']:.0f}" if r.get("onnx_kb") else "—",
            rate(r["cells_per_s"]["median"]),
        ]
        for name, r in d.results.items()
    ]
    out = heading("Faster networks: custom-CNN layouts and ONNX formats (decoded cells, batch 64)", d.command, d)
    out += table(["Layout · format", "Channels per conv, by stage", "Params", "ONNX KB", "cells/s"], rows)
    out += [
        "",
        f"{d['cells']:,} letterboxed NIH cells at {d['size']} px in batches of {d['batch']}, "
        "`Classifier.predict_prepared` (the model only), every candidate in every round (interleaved), median of "
        f"{d['rounds']} rounds; random weights (speed does not depend on them), int8 as `malaria-cells export --int8`.",
    ]
    return [*out, ""]


def time_to_accuracy(d: Result) -> list[str]:
    """Time to each target validation accuracy, per run, from the runs' own training logs."""
    targets = d["targets"]
    rows = []
    for r in d["rows"]:
        cells = []
        for t in targets:
            hit = r["reached"].get(f"{t:.2f}")
            cells.append(f"{hit['elapsed_s']:,.0f} s (epoch {hit['epoch']})" if hit else "not reached")
        rows.append(
            [
                f"`{r['run']}`",
                f"{r['strategy']}, {r['input_size']} px",
                *cells,
                rate(r.get("train_images_per_s_median")),
                r.get("features") or "—",
            ]
        )
    out = heading("Time to a validation accuracy", d.command, d)
    out += table(
        ["Run", "Strategy", *(f"≥ {100 * t:.0f} %" for t in targets), "train img/s", "Backbone features"], rows
    )
    out += [
        "",
        "Wall seconds from the start of each run (feature extraction included when it ran) to the first epoch whose "
        "validation accuracy (threshold 0.5, validation patients) reached the target; read from the runs' "
        "`metrics.jsonl`, so the times carry the load the machine had when each run trained (see train img/s). "
        "A fine-tuned run starts from its frozen run's head: add that run's time.",
    ]
    return [*out, ""]


def emfet(d: Result) -> list[str]:
    """Ours vs emfet on the same test patients: metrics with CIs, end-to-end speed, and ratios to emfet."""
    rows = []
    for m in d["models"]:
        r = d["ratios"].get(m["name"], {})
        met = m.get("metrics") or {}
        speed = (m.get("cells_per_s") or {}).get("median")
        rows.append(
            [
                m["name"] + ("" if m.get("same_test_cells", True) else " *"),
                *(_format_ci(met[k]) if k in met else "n/a" for k in ("accuracy", "sensitivity", "specificity")),
                *(_format_ci(met[k]) if k in met else "n/a" for k in ("roc_auc", "mcc")),
                rate(speed),
                *(f"{r[k]:.3f}" if r.get(k) else "—" for k in ("accuracy", "roc_auc")),
                _points(r.get("difference_vs_emfet", {}).get("accuracy")),
                f"{r['cells_per_s']:.1f}×" if r.get("cells_per_s") else "—",
            ]
        )
    cfg = d.params
    cmd = "python benchmarks/emfet_compare.py --split " + str(d.get("split_file", cfg.get("split")))
    for flag, key, default in (
        ("--max-images", "max_images", None),
        ("--speed-files", "speed_files", 500),
        ("--repeat", "repeat", 5),
        ("--threads", "threads", 1),
        ("--decode-processes", "decode_processes", 0),
    ):
        if cfg.get(key) not in (default, None):
            cmd += f" {flag} {cfg[key]}"
    if cfg.get("runs"):
        cmd += " --runs " + " ".join(cfg["runs"])
    t, sp = d["test"], d["speed"]
    title = f"Ours vs emfet {d['emfet']['version']} on the same test patients"
    out = heading(title, cmd, d)
    if d.get("subsampled"):
        out += ["**Subsampled (`--max-images`): not the full test set.**", ""]
    out += table(
        [
            "Model",
            "Accuracy",
            "Sensitivity",
            "Specificity",
            "ROC AUC",
            "MCC",
            "cells/s",
            "acc ×",
            "AUC ×",
            "acc − emfet (points)",
            "speed ×",
        ],
        rows,
    )
    out += [
        "",
        f"{t['n_cells']:,} test cells of {t['n_patients']} patients (split `{Path(d['split_file']).name}`, "
        f"sha256 {d['split_sha256'][:12]}); emfet tuned and fitted on the train patients only. 95 % CIs: patient "
        f"bootstrap ({d['bootstrap']['resamples']} resamples). Speed: end to end from files, {sp['files']} files, "
        f"batch {sp['batch_size']}, {sp['threads']} thread(s) per model"
        + (
            f" (ours: + {sp['decode_processes']} decoding process(es), i.e. more cores than emfet)"
            if sp.get("decode_processes")
            else ""
        )
        + f", median of {sp['repeat']} interleaved rounds. "
        "Ratios: ours / emfet. acc − emfet: accuracy difference in points with a paired patient bootstrap (the same "
        "resampled patients for both models): an interval above 0 means better than emfet on patients like these, "
        "one that holds 0 means the two cannot be told apart with this many test patients.",
    ]
    goals = d.get("goals", {})
    if goals:
        out += ["", *(f"- {'met' if ok else '**not met**'}: {goal}" for goal, ok in goals.items())]
    if any(not m.get("same_test_cells", True) for m in d["models"]):
        out += ["", "\\* metrics not on the same test cells as emfet's (see the JSON)."]
    return [*out, ""]


def emfet_speed_variants(runs: list[Result]) -> list[str]:
    """The same comparison run with other thread/process settings: end-to-end speed of the shipped model vs emfet."""
    rows = []
    for d in runs:
        sp = d["speed"]
        speeds = {m["kind"]: (m.get("cells_per_s") or {}).get("median") for m in d["models"]}
        shipped, peer = speeds.get("shipped"), speeds.get("emfet")
        rows.append(
            [
                f"`{d.path.name}`",
                str(sp["threads"]),
                str(sp.get("decode_processes", 0)),
                rate(shipped),
                rate(peer),
                f"{shipped / peer:.1f}×" if shipped and peer else "—",
                provenance(d),
            ]
        )
    out = ["#### The same comparison with other thread settings (end-to-end speed)", ""]
    out += table(
        ["File", "Threads per model", "Our decode processes", "Shipped cells/s", "emfet cells/s", "Ratio", "Where"],
        rows,
    )
    out += [
        "",
        "Same command as above with `--threads N` and/or `--decode-processes N` (ours: processes that decode files "
        "while the model runs, as `malaria-cells predict` does for large inputs; emfet has no such mode, so those "
        "rows give ours more cores than emfet).",
    ]
    return [*out, ""]


def _points(v: dict | None) -> str:
    """A difference of fractions as ``+1.23 (+0.45 to +2.01)`` points, or a dash."""
    if not v:
        return "—"
    return f"{100 * v['value']:+.2f} ({100 * v['low']:+.2f} to {100 * v['high']:+.2f})"


def _format_ci(v: dict) -> str:
    """``value (low–high)`` with three decimals, as the comparison script prints it."""
    if v.get("value") is None:
        return "n/a"
    if v.get("low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} ({v['low']:.3f}–{v['high']:.3f})"


def deployment(results: Path) -> list[str]:
    """The shipped model's older deployment measurements: batch inference, the ONNX path, the load test."""
    out: list[str] = []
    p = results / "inference_speed.json"
    if p.exists():
        d = load_result(p)
        cmd = f"python benchmarks/inference_speed.py --run {d.get('run')} --repeat {d.get('rounds')}"
        out += heading(f"Batch inference of a run's model ({d['images']:,} decoded cells)", cmd, d)
        rows = [[k, rate(v["median"]), rate(v["best"])] for k, v in d["cells_per_s"].items()]
        out += table([f"{d['model']}, batch {d['batch_size']}, {d['threads']} threads", "cells/s median", "best"], rows)
        out += [""]
    p = results / "onnx_path.json"
    if p.exists():
        d = load_result(p)
        out += heading(
            "Fresh process: import, load, first prediction",
            "python benchmarks/onnx_path.py --onnx models/default.onnx --run runs/custom-cnn-48",
            d,
        )
        rows = [
            [
                name,
                num(r["import_s"], 2),
                num(r["load_s"], 2),
                num(r["first_predict_s"], 2),
                num(r["process_wall_s"], 2),
                num(r["peak_rss_mb"], 0),
                "yes" if r["torch_imported"] else "no",
            ]
            for name, r in d.results.items()
            if isinstance(r, dict)
        ]
        out += table(["Model from", "import s", "load s", "1st predict s", "process s", "peak RSS MB", "torch"], rows)
        out += [""]
    p = results / "load_test.json"
    if p.exists():
        d = load_result(p)
        r, mem, prm = d["run"], d.get("memory", {}), d.get("parameters") or d.params
        before, after = (mem.get(k, {}).get("rss_mb") for k in ("before_load", "after_run"))
        out += heading("`malaria-cells serve` under load", d.command or "python benchmarks/load_test.py", d)
        out += table(
            ["Requests", "Concurrency", "OK", "Errors", "Requests/s", "p50 ms", "p99 ms", "RSS before → after MB"],
            [
                [
                    f"{r['sent']:,}",
                    str(prm.get("concurrency", "?")),
                    f"{r['ok']:,}",
                    str(r["errors"]),
                    rate(r["requests_per_s"]),
                    ms(r["latency_ms"]["p50"]),
                    ms(r["latency_ms"]["p99"]),
                    f"{num(before, 0)} → {num(after, 0)}",
                ]
            ],
        )
        out += [""]
    return out


# --------------------------------------------------------------------------------------------- assembly


def render(results: Path) -> str:
    """The generated Markdown between the markers."""

    def load(name: str) -> Result | None:
        p = results / name
        return load_result(p) if p.exists() else None

    def missing(what: str, cmd: str) -> list[str]:
        return [f"#### {what}", "", f"Not measured yet: `{cmd}`.", ""]

    def section(name: str, what: str, cmd: str | None, fn: Callable[[Result], list[str]]) -> list[str]:
        """The section of one result file; when the file is missing, a "not measured" stub (None: nothing)."""
        got = load(name)
        if got:
            return fn(got)
        return missing(what, cmd) if cmd else []

    out = [
        START,
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.json; edits here are lost. -->",
        "",
    ]
    out += section(
        "inference_matrix.json",
        "Inference: model × runtime × batch",
        "python benchmarks/inference_matrix.py",
        inference_matrix,
    )
    out += section("arch_speed.json", "Faster networks", "python benchmarks/arch_speed.py", arch_speed)
    out += section("scaling.json", "How cost grows with the number of images", "python benchmarks/scaling.py", scaling)
    speeds = sorted(results.glob("train_speed_*.json"))
    out += (
        train_speed([load_result(p) for p in speeds])
        if speeds
        else missing("Training speed", "python benchmarks/train_speed.py")
    )
    out += section("transfer_strategies.json", "", None, transfer_strategies)
    out += section(
        "time_to_accuracy.json",
        "Time to a validation accuracy",
        "python benchmarks/time_to_accuracy.py --runs RUN ...",
        time_to_accuracy,
    )
    out += section("decode_speed.json", "", None, decode_speed)
    out += section("emfet.json", "Ours vs emfet", "python benchmarks/emfet_compare.py --split SPLIT.csv", emfet)
    others = sorted(results.glob("emfet_*.json"))
    if load("emfet.json") and others:
        out += emfet_speed_variants([load_result(p) for p in others])
    out += deployment(results)
    while out and out[-1] == "":
        out.pop()
    return "\n".join([*(ln for line in out for ln in wrap(line)), END])


def wrap(line: str, width: int = 118) -> list[str]:
    """Prose and list lines wrapped to the docs' width; tables, headings and comments left whole."""
    if len(line) <= width or line.startswith(("|", "#", "<!--")):
        return [line]
    indent = "  " if line.startswith("- ") else ""
    return textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def splice(doc: str, section: str) -> str:
    """``doc`` with the text between the markers (markers included) replaced by ``section``."""
    a, b = doc.find(START), doc.find(END)
    if a < 0 or b < a:
        raise SystemExit(f"no {START} ... {END} block; add it where the tables should go")
    return doc[:a] + section + doc[b + len(END) :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--doc", default=str(DOC), help="the Markdown file whose bench block is rewritten")
    ap.add_argument("--check", action="store_true", help="exit 1 if the document is not what the JSON files give")
    args = ap.parse_args()
    doc = Path(args.doc)
    old = doc.read_text(encoding="utf-8")
    new = splice(old, render(Path(args.results)))
    if args.check:
        if new != old:
            print(f"{doc}: the benchmark section is out of date; run python benchmarks/report.py")
            sys.exit(1)
        print(f"{doc}: up to date")
        return
    if new != old:
        from malaria_cells.io import atomic_write_text

        atomic_write_text(doc, new)
    print(f"{doc}: benchmark section {'rewritten' if new != old else 'unchanged'}")


if __name__ == "__main__":
    main()
