"""Packaging: an inference-only install (no ``train`` extra) runs predict, smear and serve on the shipped models.

Each command runs in a fresh interpreter whose import system refuses the ``train`` extra's modules (torch,
torchvision, timm, safetensors, matplotlib, onnx, ...), as if they were not installed; the interpreter reports every
refused import and every such module it ended up with. The commands needing the extra must fail with one clear
error and its exit code, not a traceback. The declared dependencies are checked from ``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy_helpers import field_photo
from malaria_cells.errors import EXIT_UNAVAILABLE, TRAIN_EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The train extra's import names, plus scikit-learn (a test and benchmark tool, not a dependency of the package).
BLOCKED = sorted(TRAIN_EXTRA_MODULES | {"sklearn"})
REPORT = "PACKAGING-REPORT "

# Installed before anything else: a meta-path finder that refuses the blocked modules (recording each attempt), and
# an exit hook that reports the attempts and the blocked modules present in sys.modules.
BOOT = f"""
import atexit, importlib.abc, json, sys
BLOCKED = set({BLOCKED!r})
refused = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            refused.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the packaging test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())

def _report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    sys.stderr.write({REPORT!r} + json.dumps({{"refused": refused, "loaded": loaded}}) + "\\n")

atexit.register(_report)
"""
CLI = BOOT + "sys.argv = ['malaria-cells', *sys.argv[1:]]\nfrom malaria_cells.cli import main\nmain()\n"


def _env() -> dict[str, str]:
    # The shipped models, whatever the developer's environment points to.
    return {k: v for k, v in os.environ.items() if k not in ("MALARIA_CELLS_MODEL", "MALARIA_CELLS_DETECTOR")}


def _run(code: str, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``code`` with the blocker in a fresh interpreter; return the process and its import report."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**_env(), "PYTHONPATH": str(ROOT / "tests")},
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(REPORT)]
    assert lines, f"no import report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1][len(REPORT) :])


def _assert_torch_free(proc: subprocess.CompletedProcess, report: dict) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report == {"refused": [], "loaded": []}, report


@pytest.fixture(scope="module")
def cell(share) -> Path:
    return sorted((share / "Parasitized").iterdir())[0]


def test_blocker_refuses_torch():
    # The harness itself: a blocked import fails as if the module were not installed, and is reported.
    proc, report = _run(
        BOOT + "import sys\ntry:\n    import torch.nn\nexcept ModuleNotFoundError as e:\n    print(e.name)\n"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "torch"
    assert report == {"refused": ["torch"], "loaded": []}


def test_predict_without_training_extra(cell):
    proc, report = _run(CLI, "predict", str(cell), "--format", "json")
    _assert_torch_free(proc, report)
    out = json.loads(proc.stdout)
    (row,) = out["predictions"]
    assert row["label"] == "Parasitized" and row["error"] is None
    assert out["model"]["backend"] == "onnx"


def test_smear_without_training_extra(tmp_path):
    proc, report = _run(CLI, "smear", str(field_photo()), "--out", str(tmp_path / "out"))
    _assert_torch_free(proc, report)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["photos"] == 1 and summary["failed_photos"] == 0
    assert summary["slides"][0]["cells"] > 10
    assert len(list((tmp_path / "out" / "overlays").iterdir())) == 1  # the overlay: Pillow only


def test_explain_without_training_extra(cell, tmp_path):
    # The shipped ONNX model gets an occlusion map: no gradients, no torch, no matplotlib.
    proc, report = _run(CLI, "explain", str(cell), "--out", str(tmp_path / "maps"))
    _assert_torch_free(proc, report)
    (png,) = (tmp_path / "maps").glob("*_occlusion.png")
    assert png.stat().st_size > 1000


def test_serve_without_training_extra(cell):
    # The real app on a loopback port, started as `serve` starts it, answering a cell and a field photo.
    code = BOOT + (
        "import httpx\n"
        "from deploy_helpers import live_server\n"
        "from malaria_cells.serve import create_app\n"
        "cell, photo = sys.argv[1], sys.argv[2]\n"
        "with live_server(create_app()) as url:\n"
        "    with open(cell, 'rb') as f:\n"
        "        r = httpx.post(url + '/api/v1/predict', files={'files': ('cell.png', f.read())}, timeout=60)\n"
        "    print('PREDICT', r.status_code, json.dumps(r.json()['results'][0]['label']))\n"
        "    with open(photo, 'rb') as f:\n"
        "        r = httpx.post(url + '/api/v1/smear', files={'file': ('field.jpg', f.read())}, timeout=120)\n"
        "    print('SMEAR', r.status_code, len(r.json()['cells']))\n"
    )
    proc, report = _run(code, str(cell), str(field_photo()))
    _assert_torch_free(proc, report)
    out = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("PREDICT", "SMEAR")))
    assert out["PREDICT"] == '200 "Parasitized"'
    status, cells = out["SMEAR"].split()
    assert status == "200" and int(cells) > 10


def test_version_without_training_extra():
    proc, report = _run(CLI, "--version")
    _assert_torch_free(proc, report)
    assert proc.stdout.strip() == f"malaria-cells {PYPROJECT['project']['version']}"


@pytest.mark.parametrize("command", ["predict", "smear", "serve", "train"])
def test_help_without_training_extra(command):
    # Help, the train flags (generated from the config) included, needs nothing of the extra.
    proc, report = _run(CLI, command, "--help")
    _assert_torch_free(proc, report)
    assert "Usage:" in proc.stdout and command in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("predict", "{cell}", "--model", "{tmp}"),  # a run folder as the model needs torch
        ("export", "{tmp}", "--format", "onnx"),
        ("explain", "{cell}", "--model", "{tmp}"),
        ("train", "--model", "custom-cnn", "--out", "{tmp}/run"),
        ("evaluate", "{tmp}/model.onnx"),  # its plots need matplotlib; refused before any work
        ("serve", "--model", "{tmp}", "--port", "1"),  # refused before the port is bound
    ],
    ids=["predict-run-folder", "export", "explain", "train", "evaluate", "serve-run-folder"],
)
def test_training_commands_say_which_extra(args, cell, tmp_path):
    argv = [a.format(cell=cell, tmp=tmp_path) for a in args]
    proc, _ = _run(CLI, *argv)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    missing = re.search(r"needs the training extra \((\w+) is not installed\)", proc.stderr)
    assert missing and missing[1] in {"torch", "safetensors", "matplotlib"}, proc.stderr
    assert "pip install 'malaria-cells[train]'" in proc.stderr


def _requirements(group: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in group}


def test_base_dependencies_leave_training_out():
    base = _requirements(PYPROJECT["project"]["dependencies"])
    train = _requirements(PYPROJECT["project"]["optional-dependencies"]["train"])
    heavy = {"torch", "torchvision", "timm", "safetensors", "matplotlib", "onnx", "scikit-learn"}
    assert not heavy & base.keys(), heavy & base.keys()
    assert {"torch", "torchvision", "timm", "safetensors", "matplotlib", "onnx"} <= train.keys()
    assert {"onnxruntime", "numpy", "pillow", "scipy", "fastapi", "uvicorn", "typer"} <= base.keys()
    # Ranges with a floor, not exact pins: the pins live in constraints.txt.
    for name, req in base.items():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "==" not in ops, f"{name}: {req.specifier}"


def test_constraints_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    project = PYPROJECT["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    for req in (Requirement(r) for group in groups for r in group):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
