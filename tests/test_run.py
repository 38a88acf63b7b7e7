"""The run folder as a typed object: metadata validation, broken files as one-line errors, a resume state that
cannot run code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from malaria_cells.config import resolve_config
from malaria_cells.errors import EXIT_USAGE, RunError
from malaria_cells.run import Run, TrainState
from malaria_cells.train import train

FAST = dict(model="custom-cnn", input_size=32, batch_size=16, epochs=2, patience=100, threads=1)


@pytest.fixture()
def finished_run(tmp_path, synthetic_data) -> Path:
    return train(config=resolve_config(overrides=FAST), data_dir=synthetic_data, run_dir=tmp_path / "run")


class _OpensAFile:
    """Pickles as a call to open(path, "w"): what a crafted state.pt can do when it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALARIA_CELLS_QUIET": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "malaria_cells.cli", *args], capture_output=True, text=True, env=env)


def test_open_reads_typed_metadata(finished_run):
    run = Run.open(finished_run)
    assert run.meta.model == "custom-cnn" and run.meta.prep.input_size == 32
    assert 0 <= run.meta.threshold <= 1 and run.meta.positive_class == "Parasitized"
    assert run.meta.head_width is None  # the custom CNN has a fixed head
    assert [r["epoch"] for r in run.history()] == [1, 2]
    assert run.config().input_size == 32
    model = run.load_model()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2,)
    assert (
        run.meta.to_dict()["data_manifest_sha256"] == json.loads(run.metadata_path.read_text())["data_manifest_sha256"]
    )


def test_state_is_safetensors_and_round_trips(finished_run):
    run = Run(finished_run)
    assert run.state_path.exists() and not run.legacy_state_path.exists()
    with open(run.state_path, "rb") as f:  # safetensors: 8-byte header length, then a JSON header; never a pickle
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["format"] == "malaria-cells-state/1"
    state = run.load_state()
    assert state is not None and state.epoch == 1 and len(state.history) == 2
    assert isinstance(next(iter(state.optimizer["state"])), int)  # parameter indices stay ints
    assert state.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples

    # An optimizer restored from the file continues exactly like the original.
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    run.save_state(
        TrainState(
            epoch=0, best_score=float("-inf"), best_epoch=-1, bad_epochs=0, elapsed_s=1.0, optimizer=opt.state_dict()
        )
    )
    back = run.load_state()
    assert back.best_score == float("-inf")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.1)
    opt2.load_state_dict(back.optimizer)
    p.grad = q.grad = torch.tensor([0.3, 0.3, -1.0])
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_crafted_legacy_state_is_refused_and_never_executed(finished_run, synthetic_data, tmp_path):
    run = Run(finished_run)
    run.metadata_path.unlink()  # an unfinished run: --resume would load its state
    run.state_path.unlink()
    marker = tmp_path / "pwned"
    torch.save({"epoch": 0, "optimizer": _OpensAFile(str(marker))}, run.legacy_state_path)
    with pytest.raises(RunError, match="refused") as err:
        run.load_state()
    assert err.value.code == "run_state_unsafe"
    proc = _cli("train", "--resume", str(finished_run), "--data", str(synthetic_data))
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "state.pt" in proc.stderr and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()  # the pickle's open() never ran


def test_legacy_state_with_plain_data_still_resumes(finished_run):
    run = Run(finished_run)
    state = run.load_state()
    run.state_path.unlink()
    torch.save(
        {
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "epoch": state.epoch,
            "history": state.history,
            "best_score": state.best_score,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
            "elapsed_s": state.elapsed_s,
        },
        run.legacy_state_path,
    )
    legacy = run.load_state()
    assert legacy.epoch == state.epoch and legacy.model == {}  # weights then come from last.safetensors


@pytest.mark.parametrize(
    ("damage", "code", "names"),
    [
        (lambda r: r.metadata_path.write_text("[1, 2]"), "run_metadata_invalid", "metadata.json"),
        (lambda r: r.metadata_path.write_text("{not json"), "run_metadata_invalid", "metadata.json"),
        (
            lambda r: r.metadata_path.write_text(
                json.dumps({k: v for k, v in json.loads(r.metadata_path.read_text()).items() if k != "preprocessing"})
            ),
            "run_metadata_invalid",
            "preprocessing",
        ),
        (
            lambda r: r.weights_path("best").write_bytes(r.weights_path("best").read_bytes()[:1000]),
            "run_weights_invalid",
            "best.safetensors",
        ),
        (lambda r: r.metadata_path.unlink(), "run_unfinished", "metadata.json"),
    ],
)
def test_broken_run_files_are_one_line_errors(finished_run, damage, code, names):
    run = Run(finished_run)
    damage(run)
    with pytest.raises(RunError) as err:
        Run.open(finished_run).load_model()
    assert err.value.code == code and names in str(err.value)
    assert "\n" not in str(err.value)


def test_run_without_split_is_a_clear_error(finished_run):
    Run(finished_run).split_path.unlink()
    with pytest.raises(RunError, match="no split.csv") as err:
        Run.open(finished_run).split()
    assert err.value.code == "run_split_missing"
