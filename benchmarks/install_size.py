"""The inference-only install from a clone: how long `pip install .` takes, how big the environment gets, and that
`malaria-cells predict` and `smear` then work on the shipped models without torch.

A fresh venv in a temporary folder (the pip that ``venv`` bundles, no upgrade), then ``pip install --no-cache-dir
ROOT`` (not editable, no extras; every wheel downloaded from the package index, so the time includes the network),
timed from start to exit; then the venv's size on disk (``du``) and its largest distributions; then ``--version``,
``predict`` on one NIH cell and ``smear`` on one field photo with the venv's own ``malaria-cells``, and whether torch
(or anything of the ``train`` extra) got installed. The venv is removed afterwards (``--keep`` keeps it).

Run: .venv/bin/python benchmarks/install_size.py [--cell FILE] [--photo FILE] [--python PYTHON] [--keep]
Writes benchmarks/results/install_size.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, command_line, machine_info, save_result

OUT = ROOT / "benchmarks" / "results" / "install_size.json"
SHARED = ROOT.parent / "shared"
DEFAULT_CELL = SHARED / "nih-cell-images" / "Parasitized" / "C100P61ThinF_IMG_20150918_144104_cell_162.webp"
DEFAULT_PHOTO = SHARED / "iml-malaria" / "fields" / "PA171690.JPG"
TRAIN_EXTRA = ("torch", "torchvision", "timm", "safetensors", "matplotlib", "onnx")
GOALS = {"install_s": 120, "venv_mb": 600}  # issue 14: under 2 minutes and 600 MB


def du_mb(path: Path) -> float:
    """Disk usage of a folder in MB (10^6 bytes), as ``du -sk`` counts it (blocks, hard links once)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return round(int(out.split()[0]) * 1024 / 1e6, 1)


def largest_distributions(python: Path, n: int = 12) -> list[dict[str, object]]:
    """The ``n`` largest installed distributions of a venv, by the summed size of their RECORD files."""
    code = (
        "import importlib.metadata as md, json, os\n"
        "rows = []\n"
        "for d in md.distributions():\n"
        "    size = 0\n"
        "    for f in d.files or []:\n"
        "        p = d.locate_file(f)\n"
        "        size += os.path.getsize(p) if os.path.isfile(p) else 0\n"
        "    rows.append({'name': d.metadata['Name'], 'version': d.version, 'mb': round(size / 1e6, 1)})\n"
        "print(json.dumps(sorted(rows, key=lambda r: -r['mb'])))\n"
    )
    rows = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    return rows[:n]


def run(cmd: list[str], **kw: object) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command; return it and its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # the caller checks the exit code
    return proc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", type=Path, default=DEFAULT_CELL, help="one NIH cell image for predict")
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="one thin-smear field photo for smear")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that makes the venv")
    ap.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    args = ap.parse_args()
    for p in (args.cell, args.photo):
        if not p.is_file():
            sys.exit(f"{p} not found (pass --cell / --photo)")

    machine = machine_info(["pip"])
    tmp = Path(tempfile.mkdtemp(prefix="malaria-cells-install-"))
    venv = tmp / "venv"
    try:
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        py, exe = venv / "bin" / "python", venv / "bin" / "malaria-cells"
        pip_version = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True, text=True).stdout
        python_version = subprocess.run([str(py), "--version"], capture_output=True, text=True).stdout.strip()
        empty_mb = du_mb(venv)
        build_dir = ROOT / "build"  # setuptools builds the wheel in the clone; a stale build/lib would leak into wheels
        had_build_dir = build_dir.exists()
        install, install_s = run(
            [str(py), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", str(ROOT)]
        )
        if not had_build_dir:
            shutil.rmtree(build_dir, ignore_errors=True)
        if install.returncode != 0:
            sys.exit(f"pip install failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
        venv_mb = du_mb(venv)
        freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.splitlines()
        train_found = subprocess.run(
            [str(py), "-c", f"import importlib.util as u; print([m for m in {TRAIN_EXTRA!r} if u.find_spec(m)])"],
            capture_output=True,
            text=True,
        ).stdout.strip()

        work = tmp / "work"  # not the clone: the installed package must find its own models
        work.mkdir()
        version, _ = run([str(exe), "--version"], cwd=work)
        predict, predict_s = run([str(exe), "predict", str(args.cell), "--format", "json"], cwd=work)
        smear, smear_s = run([str(exe), "smear", str(args.photo), "--out", str(work / "smear")], cwd=work)
        pred = json.loads(predict.stdout)["predictions"][0] if predict.returncode == 0 else None
        summary = json.loads((work / "smear" / "summary.json").read_text()) if smear.returncode == 0 else None

        results = {
            "install_s": round(install_s, 1),
            "venv_mb": venv_mb,
            "empty_venv_mb": empty_mb,
            "installed_mb": round(venv_mb - empty_mb, 1),
            "goals": GOALS,
            "meets_goals": install_s < GOALS["install_s"] and venv_mb < GOALS["venv_mb"],
            "pip": pip_version.split(" from ")[0],
            "python": python_version,
            "distributions": len(freeze),
            "largest_distributions": largest_distributions(py),
            "train_extra_importable": train_found,
            "version_output": version.stdout.strip(),
            "predict": {
                "exit_code": predict.returncode,
                "seconds": round(predict_s, 2),
                "file": str(args.cell),
                "label": pred and pred["label"],
                "probability": pred and round(pred["prob_parasitized"], 4),
                "model_source": predict.returncode == 0 and json.loads(predict.stdout)["model"]["source"],
                "stderr_tail": predict.stderr[-500:] if predict.returncode else "",
            },
            "smear": {
                "exit_code": smear.returncode,
                "seconds": round(smear_s, 2),
                "file": str(args.photo),
                "cells": summary and summary["slides"][0]["cells"],
                "infected": summary and summary["slides"][0]["infected"],
                "stderr_tail": smear.stderr[-500:] if smear.returncode else "",
            },
            "freeze": freeze,
        }
        params = {"source": str(ROOT), "extras": [], "editable": False, "pip_cache": "disabled", "venv": str(venv)}
        save_result(OUT, name="install_size", command=command_line(), params=params, results=results, machine=machine)
    finally:
        if args.keep:
            print(f"kept {venv}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"{results['pip']}, {results['python']}")
    print(f"pip install . (no extras, no cache): {results['install_s']} s; venv {venv_mb} MB on disk")
    print(f"torch & co. importable: {train_found}")
    print("largest:", ", ".join(f"{r['name']} {r['mb']} MB" for r in results["largest_distributions"][:6]))
    print(f"predict: exit {predict.returncode}, {pred and pred['label']} ({predict_s:.1f} s)")
    print(f"smear: exit {smear.returncode}, {summary and summary['slides'][0]['cells']} cells ({smear_s:.1f} s)")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
