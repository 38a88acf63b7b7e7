"""The run folder as a typed object: every reader of a run goes through :class:`Run`, never ``json.load``.

A run folder holds:

- ``config.yaml``: the resolved :class:`~malaria_cells.config.TrainConfig`;
- ``split.csv``: which image is in train / val / test;
- ``metrics.jsonl``: one line per finished epoch;
- ``metadata.json``: :class:`RunMeta` (model, preprocessing, classes, threshold, versions, data hash), written last:
  a folder without it is an unfinished run;
- ``best.safetensors`` / ``last.safetensors``: the model's weights;
- ``state.safetensors``: what ``--resume`` needs (model, optimizer and scheduler tensors; epoch counters, history
  and RNG-free scalars in the header as JSON). Nothing in a run folder is a pickle: loading one never runs code. A
  legacy ``state.pt`` is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
  containers.

This module imports torch only inside the functions that need it, so reading a run's metadata stays light.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from malaria_cells.config import TrainConfig, load_config, save_config
from malaria_cells.errors import RunError
from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text, jsonl_text, read_jsonl
from malaria_cells.preprocess import Preprocessing
from malaria_cells.split import Split, load_split

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily
    import torch
    from torch import nn

RUN_FORMAT = "malaria-cells-run/1"
STATE_FORMAT = "malaria-cells-state/1"
WEIGHTS = ("best", "last")


class PreprocessingMeta(BaseModel):
    """How the model wants its input (see :class:`~malaria_cells.preprocess.Preprocessing`)."""

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(ge=8, le=4096)  # px, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "letterbox"


class RunMeta(BaseModel):
    """A finished run's ``metadata.json``: the fields every reader relies on are typed and checked.

    Unknown keys are kept (``extra="allow"``) so a newer run's additions survive a round trip.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: str = RUN_FORMAT
    model: str
    strategy: str | None = None
    weights: str | None = None
    weights_info: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    timm_arch: str | None = None
    head_hidden: int | None = None
    preprocessing: PreprocessingMeta
    class_names: list[str] = Field(default_factory=lambda: ["Uninfected", "Parasitized"])
    positive_class: str = "Parasitized"
    positive_index: int = 1
    threshold: float = Field(ge=0.0, le=1.0)  # on P(Parasitized)
    threshold_method: str = "youden"
    # Temperature scaling (malaria_cells.calibrate): P(Parasitized) = sigmoid(logit / T); None = not fitted (T = 1).
    # The threshold and operating points are on the scale of the probabilities this gives.
    temperature: float | None = Field(default=None, gt=0.0)
    split_kind: str = "patient"
    data_root: str | None = None
    data_manifest_sha256: str | None = None
    split_counts: list[dict[str, Any]] = Field(default_factory=list)
    val_metrics_at_threshold: dict[str, Any] = Field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped: str | None = None
    train_time_s: float | None = None
    precision: str | None = None
    parameters: int | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    created: str | None = None

    @property
    def prep(self) -> Preprocessing:
        """The model's preprocessing as the object the pipeline uses."""
        return Preprocessing.from_dict(self.preprocessing.model_dump())

    @property
    def head_width(self) -> int | None:
        """Hidden units of the head: ``None`` for a fixed-head model; 0 (linear) for timm runs made before the
        head option existed."""
        if not self.timm_arch:
            return None
        return self.head_hidden if self.head_hidden is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """The metadata as a JSON-ready dict (unknown keys included)."""
        return self.model_dump(mode="json")


@dataclass
class TrainState:
    """Everything ``--resume`` needs besides the config and split: counters, history and the training tensors."""

    epoch: int  # zero-based index of the last finished epoch
    best_score: float
    best_epoch: int  # zero-based; -1 before any
    bad_epochs: int
    elapsed_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # state_dict of the model
    optimizer: dict[str, Any] = field(default_factory=dict)  # optimizer.state_dict()
    scheduler: dict[str, Any] = field(default_factory=dict)  # scheduler.state_dict()


class Run:
    """A run folder: its paths, and typed access to everything in it.

    ``Run(path)`` never touches the disk; :meth:`open` checks that the folder is a finished run and parses its
    metadata, with a one-line :class:`~malaria_cells.errors.RunError` naming the file when something is wrong.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._meta: RunMeta | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- paths -------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        """``config.yaml``."""
        return self.path / "config.yaml"

    @property
    def split_path(self) -> Path:
        """``split.csv``."""
        return self.path / "split.csv"

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl`` (one line per epoch)."""
        return self.path / "metrics.jsonl"

    @property
    def metadata_path(self) -> Path:
        """``metadata.json``."""
        return self.path / "metadata.json"

    @property
    def state_path(self) -> Path:
        """``state.safetensors``: what ``--resume`` needs."""
        return self.path / "state.safetensors"

    @property
    def legacy_state_path(self) -> Path:
        """``state.pt`` of runs made before the safetensors state (read with ``weights_only=True``)."""
        return self.path / "state.pt"

    def weights_path(self, which: str = "best") -> Path:
        """``best.safetensors`` or ``last.safetensors``."""
        if which not in WEIGHTS:
            raise ValueError(f"which must be one of {', '.join(WEIGHTS)}, not {which!r}")
        return self.path / f"{which}.safetensors"

    # -- state of the folder -----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Whether training finished (``metadata.json`` is written last)."""
        return self.metadata_path.exists()

    @property
    def started(self) -> bool:
        """Whether a run (finished or not) is in this folder."""
        return self.finished or self.state_path.exists() or self.legacy_state_path.exists()

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open a finished run folder, checking its metadata.

        Args:
            path: the run folder.

        Returns:
            The run, its metadata parsed.

        Raises:
            RunError: not a folder, unfinished (no ``metadata.json``) or a broken ``metadata.json``.
        """
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"{run.path}: not a run folder (no such directory)", code="run_not_found")
        if not run.finished:
            raise RunError(f"{run.path}: not a finished run folder (no metadata.json)", code="run_unfinished")
        run.meta  # noqa: B018 - parse now, so a broken file fails here with its name
        return run

    # -- readers -----------------------------------------------------------------------------------------------
    @property
    def meta(self) -> RunMeta:
        """The run's metadata (parsed once).

        Raises:
            RunError: missing, not JSON, or missing/invalid fields (the message names the file and the fields).
        """
        if self._meta is None:
            self._meta = self._read_meta()
        return self._meta

    def _read_meta(self) -> RunMeta:
        path = self.metadata_path
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(
                f"{self.path}: not a finished run folder (no metadata.json)", code="run_unfinished"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{path}: unreadable metadata ({e})", code="run_metadata_invalid") from None
        if not isinstance(raw, dict):
            raise RunError(
                f"{path}: metadata must be a JSON object, not {type(raw).__name__}", code="run_metadata_invalid"
            )
        try:
            return RunMeta.model_validate(raw)
        except ValidationError as e:
            raise RunError(f"{path}: invalid metadata ({_describe(e)})", code="run_metadata_invalid") from None

    def config(self) -> TrainConfig:
        """The run's resolved config.

        Raises:
            RunError: no ``config.yaml``, or one that does not validate.
        """
        if not self.config_path.exists():
            raise RunError(f"{self.path}: no config.yaml", code="run_config_missing")
        try:
            return load_config(self.config_path)
        except ValueError as e:
            raise RunError(f"{self.config_path}: {e}", code="run_config_invalid") from None

    def split(self) -> Split:
        """The run's split (checked for patients crossing splits).

        Raises:
            RunError: no ``split.csv`` or an unreadable one.
        """
        if not self.split_path.exists():
            raise RunError(
                f"{self.path}: no split.csv, so its test patients are unknown; evaluate another folder of images "
                "with --split all",
                code="run_split_missing",
            )
        try:
            return load_split(self.split_path)
        except (ValueError, KeyError, OSError) as e:
            raise RunError(f"{self.split_path}: {e}", code="run_split_invalid") from None

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch rows of ``metrics.jsonl`` (empty when there are none)."""
        return read_jsonl(self.metrics_path)

    def load_model(self, *, which: str = "best", device: torch.device | str = "cpu") -> nn.Module:
        """Rebuild the run's model with its trained weights, in eval mode.

        Args:
            which: "best" or "last".
            device: where to put it.

        Returns:
            The model.

        Raises:
            RunError: weights missing, truncated or not of this model's shape.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from malaria_cells.models import build_model

        meta = self.meta
        path = self.weights_path(which)
        try:
            model = build_model(meta.model, head_hidden=meta.head_width)
        except ValueError as e:
            raise RunError(f"{self.metadata_path}: {e}", code="run_metadata_invalid") from None
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise RunError(f"{path}: missing weights file", code="run_weights_missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise RunError(f"{path}: unreadable weights ({e})", code="run_weights_invalid") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise RunError(
                f"{path}: weights do not fit a {meta.model} model ({first})", code="run_weights_invalid"
            ) from None
        return model.to(device).eval()

    def load_state(self) -> TrainState | None:
        """The resume state, or ``None`` when the run has none yet.

        Raises:
            RunError: a state file that is unreadable, or a legacy ``state.pt`` holding anything but tensors and plain
                data (a pickle that would run code is refused, never executed).
        """
        if self.state_path.exists():
            return _read_state(self.state_path)
        if self.legacy_state_path.exists():
            return _read_legacy_state(self.legacy_state_path)
        return None

    # -- writers (the trainer's) -------------------------------------------------------------------------------
    def save_config(self, config: TrainConfig) -> None:
        """Write ``config.yaml`` atomically."""
        save_config(config, self.config_path)

    def save_history(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` atomically from the checkpointed history (never runs ahead of the state)."""
        atomic_write_text(self.metrics_path, jsonl_text(history))

    def save_meta(self, meta: RunMeta | dict[str, Any]) -> RunMeta:
        """Validate and write ``metadata.json`` atomically; the run is finished afterwards.

        Returns:
            The validated metadata.
        """
        parsed = meta if isinstance(meta, RunMeta) else RunMeta.model_validate(meta)
        atomic_write_json(self.metadata_path, parsed.to_dict())
        self._meta = parsed
        return parsed

    def save_weights(self, model: nn.Module, which: str) -> None:
        """Save a model's state dict as safetensors, atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        atomic_write(self.weights_path(which), lambda tmp: save_file(state, str(tmp)))

    def save_state(self, state: TrainState) -> None:
        """Write the resume state as one safetensors file (tensors + a JSON header), atomically.

        One file, so a kill can never leave tensors of one epoch beside counters of another.
        """
        from safetensors.torch import save_file

        tensors: dict[str, Any] = {}
        header = _encode(
            {
                "epoch": state.epoch,
                "best_score": state.best_score,  # -inf before the first epoch: tagged, as JSON has no inf
                "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs,
                "elapsed_s": state.elapsed_s,
                "history": state.history,
                "model": state.model,
                "optimizer": state.optimizer,
                "scheduler": state.scheduler,
            },
            tensors,
            "",
        )
        metadata = {"format": STATE_FORMAT, "state": json.dumps(header, allow_nan=False)}
        atomic_write(self.state_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.legacy_state_path.unlink(missing_ok=True)  # the new file supersedes it


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


# -- the state file's encoding: tensors to safetensors, everything else to JSON --------------------------------
# JSON cannot hold tensors, int dict keys (optimizer state is keyed by parameter index), tuples or NaN/inf; each
# gets a tagged object. Decoding builds only plain containers, numbers, strings and tensors read by safetensors.
def _encode(obj: Any, tensors: dict[str, Any], key: str) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}".lstrip(".")) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a run's state ({key})")


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _read_state(path: Path) -> TrainState:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if metadata.get("format") != STATE_FORMAT:
            raise RunError(
                f"{path}: state format {metadata.get('format')!r}, this version reads {STATE_FORMAT!r}",
                code="run_state_invalid",
            )
        header = _decode(json.loads(metadata["state"]), tensors)
        return TrainState(
            epoch=int(header["epoch"]),
            best_score=float(header["best_score"]),
            best_epoch=int(header["best_epoch"]),
            bad_epochs=int(header["bad_epochs"]),
            elapsed_s=float(header["elapsed_s"]),
            history=list(header["history"]),
            model=header["model"],
            optimizer=header["optimizer"],
            scheduler=header["scheduler"],
        )
    except RunError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise RunError(f"{path}: unreadable resume state ({type(e).__name__}: {e})", code="run_state_invalid") from None


def _read_legacy_state(path: Path) -> TrainState:
    import pickle

    import torch

    try:
        # weights_only=True: torch's restricted unpickler, which accepts tensors and plain containers and refuses
        # every other global, so a crafted state.pt cannot run code.
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise RunError(
            f"{path}: refused: the file holds objects other than tensors and plain data (a pickle that could run "
            f"code); it was not loaded ({str(e).splitlines()[0][:200]})",
            code="run_state_unsafe",
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise RunError(f"{path}: unreadable resume state ({e})", code="run_state_invalid") from None
    try:
        return TrainState(
            epoch=int(raw["epoch"]),
            best_score=float(raw["best_score"]),
            best_epoch=int(raw["best_epoch"]),
            bad_epochs=int(raw["bad_epochs"]),
            elapsed_s=float(raw["elapsed_s"]),
            history=list(raw["history"]),
            model={},  # legacy runs resume their weights from last.safetensors
            optimizer=raw["optimizer"],
            scheduler=raw["scheduler"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path}: resume state lacks {e}", code="run_state_invalid") from None
