"""Training mechanics on synthetic cells: the run folder, determinism, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from malaria_cells.config import load_config, resolve_config
from malaria_cells.models import CustomCNN, count_parameters
from malaria_cells.split import load_split
from malaria_cells.train import augment, lr_lambda, train

FAST = dict(model="custom-cnn", input_size=32, batch_size=16, epochs=3, patience=100, threads=1)


def test_run_folder_contents(tmp_path, synthetic_data):
    run = train(config=resolve_config(overrides=FAST), data_dir=synthetic_data, run_dir=tmp_path / "run")
    for name in ("config.yaml", "split.csv", "metrics.jsonl", "metadata.json", "best.safetensors", "last.safetensors"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["model"] == "custom-cnn" and meta["positive_class"] == "Parasitized" and meta["positive_index"] == 1
    assert meta["preprocessing"]["input_size"] == 32 and meta["preprocessing"]["resize"] == "letterbox"
    assert meta["class_names"] == ["Uninfected", "Parasitized"]
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["threshold_method"] == "youden"
    assert len(meta["data_manifest_sha256"]) == 64 and "torch" in meta["packages"]
    assert meta["split_kind"] == "patient"
    load_split(run / "split.csv")  # patient-disjoint
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "input_size: 32" in (run / "config.yaml").read_text()
    assert load_config(run / "config.yaml") == resolve_config(overrides=FAST).replace(
        strategy="scratch", weights="none", lr=3e-3, head_hidden=None
    )  # the saved config is the resolved one: every "model's default" filled in


def _env():
    env = dict(os.environ)
    env["MALARIA_CELLS_QUIET"] = "1"
    return env


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "malaria_cells.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--input-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        str(epochs),
        "--patience",
        "100",
        "--threads",
        "1",
    ]


def test_killed_run_resumes_to_the_same_result(tmp_path, synthetic_data):
    epochs = 12
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(synthetic_data, reference, epochs), check=True, env=_env(), capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(synthetic_data, killed, epochs), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        f = killed / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert 3 <= done < epochs, "the kill must land mid-run"
    assert not (killed / "metadata.json").exists()
    subprocess.run(
        [sys.executable, "-m", "malaria_cells.cli", "train", "--resume", str(killed), "--data", str(synthetic_data)],
        check=True,
        env=_env(),
        capture_output=True,
    )
    ref_rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got_rows] == list(range(1, epochs + 1))
    assert [r["train_loss"] for r in got_rows] == [r["train_loss"] for r in ref_rows]
    a, b = load_file(str(reference / "last.safetensors")), load_file(str(killed / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((killed / "metadata.json").read_text())["threshold"]
        == json.loads((reference / "metadata.json").read_text())["threshold"]
    )


def test_refuses_to_overwrite_a_run(tmp_path, synthetic_data):
    import pytest

    run = train(config=resolve_config(overrides={**FAST, "epochs": 1}), data_dir=synthetic_data, run_dir=tmp_path / "r")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config=resolve_config(overrides=FAST), data_dir=synthetic_data, run_dir=run)


def test_augment_keeps_background_black_and_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 16, 16, 3, dtype=torch.uint8)
    x[:, 4:12, 4:12] = torch.tensor([200, 120, 150], dtype=torch.uint8)
    y = augment(x, gen)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y[:, :4] == 0).all() and (y[:, 12:] == 0).all()  # padding stays black
    assert (y[:, 4:12, 4:12] > 0).any(dim=-1).all()  # the cell stays
    # a dihedral transform of a square centred cell keeps the set of cell pixels
    assert torch.equal((y.sum(-1) > 0), (x.sum(-1) > 0))


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_lambda(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert abs(lrs[-1] - 0.01) < 0.01


def test_custom_cnn_is_small():
    m = CustomCNN()
    assert count_parameters(m) < 1_000_000
    assert m(torch.zeros(2, 3, 64, 64)).shape == (2,)
    assert np.isfinite(m(torch.zeros(1, 3, 96, 96)).detach().numpy()).all()
