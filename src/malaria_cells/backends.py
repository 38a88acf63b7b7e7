"""One inference interface for every reader of a model: :class:`Backend`, an ONNX file's or a run folder's.

A backend turns a batch of letterboxed uint8 RGB cells (N, S, S, 3) into P(Parasitized) (N,). Prediction
(:class:`~malaria_cells.predict.Classifier`), evaluation, the export's parity and int8 checks and the benchmarks
all call one, so there is one place where a model runs.

- :class:`OnnxBackend`: onnxruntime on an exported file; preprocessing, threshold and the model card come from the
  file's ``metadata_props`` (each value JSON-encoded, keys in :data:`CARD_KEYS`). Importing this module, building an
  :class:`OnnxBackend` and calling it import neither torch nor timm.
- :class:`TorchBackend`: a run folder's weights, loaded through :meth:`malaria_cells.run.Run.load_model`; torch is
  imported only when one is built.

:func:`load_backend` picks one for a path (a folder is a run, anything else an ONNX file); with no path it uses
``$MALARIA_CELLS_MODEL``, else the model shipped inside the package at ``malaria_cells/models_shipped/default.onnx``
(package data, so the same path works from a clone with an editable install and from an installed wheel).

Both backends apply the model's stored ``temperature`` T (temperature scaling, fitted on validation patients by
:mod:`malaria_cells.calibrate`): P(Parasitized) = sigmoid(logit / T), computed by :func:`probability_from_logit`, so
every reader of a model gets the same calibrated probabilities, and the thresholds stored beside T are on that
scale. A model without a stored temperature has T = 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from malaria_cells.errors import ModelError, RunError, require_train_extra
from malaria_cells.preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily
    from torch import nn

    from malaria_cells.run import Run

MODEL_ENV = "MALARIA_CELLS_MODEL"
SHIPPED_MODEL = Path(__file__).resolve().parent / "models_shipped" / "default.onnx"
# The run folder the shipped model was exported from (weights and metadata only): what `adapt` fine-tunes when no
# other run is given, since an ONNX file cannot be fine-tuned. It needs the training extra (torch) to load.
SHIPPED_RUN = SHIPPED_MODEL.parent / "default-run"
ONNX_FORMAT = "malaria-cells-onnx/1"
ONNX_INPUT = "image"  # uint8 (N, S, S, 3) RGB, letterboxed; normalisation happens inside the graph
ONNX_OUTPUTS = ("logit", "prob_parasitized")
# What an exported ONNX file's metadata_props hold (values JSON-encoded) and what /api/v1/model shows.
CARD_KEYS = (
    "format",
    "model",
    "class_names",
    "positive_class",
    "positive_index",
    "preprocessing",
    "input",
    "output",
    "threshold",
    "threshold_method",
    "operating_points",
    "temperature",
    "temperature_fitted_on",
    "tta_threshold",
    "tta_operating_points",
    "stain_normalize",
    "split_kind",
    "final_fit",
    "cv_estimate",
    "data_manifest_sha256",
    "val_metrics_at_threshold",
    "source_run_created",
    "created",
    "package_version",
    "quantization",
    "parity_max_abs_diff_prob",
    "warning",
)
CPU_ONLY = ("CPUExecutionProvider",)


def temperature_of(meta: dict[str, Any], *, source: str = "model") -> float:
    """The temperature stored in a model's metadata (1.0 when it has none).

    Args:
        meta: a run's ``metadata.json`` or an ONNX file's decoded metadata.
        source: what to name in the error.

    Returns:
        T > 0.

    Raises:
        ModelError: a stored value that is not a finite positive number.
    """
    raw = meta.get("temperature")
    if raw is None:
        return 1.0
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise ModelError(f"{source}: temperature {raw!r} is not a positive number", code="model_metadata_invalid")
    return t


def probability_from_logit(logit: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(Parasitized) = sigmoid(logit / temperature), in float64 without overflow, returned as float32.

    Args:
        logit: raw log-odds of Parasitized, any shape.
        temperature: T > 0 (1.0: the raw probability).

    Returns:
        float32, the shape of ``logit``.
    """
    z = np.asarray(logit, dtype=np.float64) / temperature
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid, without overflow at large |z|


@runtime_checkable
class Backend(Protocol):
    """A loaded model: letterboxed uint8 cells in, P(Parasitized) out.

    Attributes:
        name: "onnx" or "torch".
        prep: the input the model wants (its ``input_size`` is S).
        meta: the model's metadata: an ONNX file's decoded ``metadata_props`` or a run's ``metadata.json``; holds at
            least ``model``, ``preprocessing``, ``threshold`` and ``class_names`` (and ``temperature`` when fitted).
    """

    name: str
    prep: Preprocessing
    meta: dict[str, Any]

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) of a batch.

        Args:
            batch_u8: uint8 (N, S, S, 3), letterboxed RGB.

        Returns:
            float32 (N,).
        """
        ...


class OnnxBackend:
    """onnxruntime inference on an exported file; preprocessing, threshold and card come from its metadata.

    Attributes:
        name: "onnx".
        path: the file.
        prep: from the file's metadata.
        meta: the file's ``metadata_props``, JSON-decoded.
        temperature: the stored temperature T (1.0 when none): probabilities are sigmoid(logit / T).
        session: the onnxruntime session.
    """

    name = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Open an ONNX file.

        Args:
            path: the ``.onnx`` file.
            threads: intra-op threads (default: onnxruntime's choice, all cores).
            providers: onnxruntime execution providers (default: CUDA when this build has it, then the CPU).
            meta: metadata to use instead of the file's: for a graph the exporter has not stamped yet.

        Raises:
            ModelError: not a loadable ONNX file, or one without malaria-cells metadata of this format.
        """
        import onnxruntime as ort  # imported here: a run folder needs only torch

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if providers is None:
            providers = [*(p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()), *CPU_ONLY]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first})", code="model_not_onnx") from None
        self.meta = meta if meta is not None else _onnx_metadata(self.path, self.session)
        try:
            self.prep = Preprocessing.from_dict(self.meta["preprocessing"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{self.path}: metadata without a usable preprocessing ({e!r})") from None
        self.temperature = temperature_of(self.meta, source=str(self.path))
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch_u8: np.ndarray) -> np.ndarray:
        """The graph's raw log-odds of Parasitized (before the temperature) of a uint8 (N, S, S, 3) batch.

        Args:
            batch_u8: uint8 (N, S, S, 3), letterboxed RGB.

        Returns:
            float64 (N,).
        """
        (logit,) = self.session.run([ONNX_OUTPUTS[0]], {self.input_name: np.ascontiguousarray(batch_u8)})
        return logit.astype(np.float64, copy=False).reshape(-1)

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) of a uint8 (N, S, S, 3) batch, float32 (N,): sigmoid(logit / temperature).

        The probability is computed here in float from the graph's ``logit`` output: an int8 graph quantizes its
        own ``prob_parasitized`` output to steps of 1/255, so a third of the cells came out at exactly 1.0 and a
        fifth at 0 (no ranking among them); its logit is finer (steps of ~0.1 in log-odds over +-10). The graph's
        ``prob_parasitized`` never includes the temperature.
        """
        return probability_from_logit(self.logits(batch_u8), self.temperature)


def _onnx_metadata(path: Path, session: Any) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map
    if "format" not in raw:
        raise ModelError(
            f"{path}: ONNX file without malaria-cells metadata; export it with `malaria-cells export`",
            code="model_metadata_missing",
        )
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v  # a plain string someone else added
    if meta["format"] != ONNX_FORMAT:
        raise ModelError(
            f"{path}: metadata format {meta['format']!r}, this version reads {ONNX_FORMAT!r}",
            code="model_metadata_invalid",
        )
    missing = [k for k in ("model", "preprocessing", "threshold", "class_names") if k not in meta]
    if missing:
        raise ModelError(f"{path}: metadata lacks {', '.join(missing)}", code="model_metadata_invalid")
    return meta


class TorchBackend:
    """torch inference on a run folder's weights, loaded through :class:`~malaria_cells.run.Run`.

    Attributes:
        name: "torch".
        model: the ``torch.nn.Module`` (eval mode), for Grad-CAM and the exporter.
        prep: the run's preprocessing.
        meta: the run's ``metadata.json`` as a dict.
        temperature: the run's stored temperature T (1.0 when none): probabilities are sigmoid(logit / T).
        precision: "fp32" (default: results match an fp32 ONNX export), "bf16" or "auto".
    """

    name = "torch"

    def __init__(
        self,
        run_or_path: Run | str | Path,
        *,
        threads: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        which: str = "best",
    ) -> None:
        """Load a run's weights.

        Args:
            run_or_path: a :class:`~malaria_cells.run.Run` or a finished run folder.
            threads: torch intra-op threads (default: leave torch's setting).
            device: "cpu", "cuda", ... (default: CUDA when present, else the CPU).
            precision: "fp32", "bf16" or "auto" (bf16 where native).
            which: "best" or "last" weights.

        Raises:
            ModelError: not a finished run, a broken ``metadata.json`` or weights that are missing, truncated or of
                another model (the message names the file).
            ExtraMissingError: torch or safetensors is not installed (an inference-only install).
        """
        require_train_extra("a run folder as the model")  # one clear error, not an ImportError from deep inside
        from malaria_cells.models import default_device, set_threads  # lazy: torch only for run folders
        from malaria_cells.run import Run

        if threads:
            set_threads(threads)
        try:
            run = run_or_path if isinstance(run_or_path, Run) else Run.open(run_or_path)
            run.meta  # noqa: B018 - a Run(...) not yet opened: parse (and fail) here
            model = run.load_model(which=which, device=device or default_device())
        except RunError as e:
            # One exception type for every unusable model, whatever its kind (callers catch ModelError).
            raise ModelError(str(e), code=e.code) from None
        self.run: Run | None = run
        self._setup(model, run.meta.to_dict(), precision)

    @classmethod
    def from_model(cls, model: nn.Module, meta: dict[str, Any], *, precision: str = "fp32") -> TorchBackend:
        """Wrap a model already in memory (an untrained one for a benchmark, a model being exported).

        Args:
            model: the model (put in eval mode here).
            meta: its metadata; needs ``preprocessing`` (and ``threshold``/``class_names`` for a Classifier).
            precision: "fp32", "bf16" or "auto".

        Returns:
            The backend.
        """
        self = cls.__new__(cls)
        self.run = None
        self._setup(model.eval(), dict(meta), precision)
        return self

    def _setup(self, model: nn.Module, meta: dict[str, Any], precision: str) -> None:
        self.model = model
        self.meta = meta
        self.precision = precision
        self.prep = Preprocessing.from_dict(meta["preprocessing"])
        self.temperature = temperature_of(meta, source=str(self.run.path) if self.run else "model")

    def logits(self, batch_u8: np.ndarray) -> np.ndarray:
        """The model's raw log-odds of Parasitized (before the temperature) of a uint8 (N, S, S, 3) batch.

        Args:
            batch_u8: uint8 (N, S, S, 3), letterboxed RGB.

        Returns:
            float64 (N,), in one forward pass.
        """
        from malaria_cells.models import predict_logits

        logits = predict_logits(
            self.model, batch_u8, prep=self.prep, precision=self.precision, batch_size=max(1, len(batch_u8))
        )
        return np.asarray(logits, dtype=np.float64).reshape(-1)

    def __call__(self, batch_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) of a uint8 (N, S, S, 3) batch, float32 (N,): sigmoid(logit / temperature)."""
        return probability_from_logit(self.logits(batch_u8), self.temperature)


def resolve_model(model: str | Path | None) -> Path:
    """Find the model to load: the argument, else ``$MALARIA_CELLS_MODEL``, else the shipped default.

    Args:
        model: an ``.onnx`` file, a run folder, or ``None``.

    Returns:
        The existing path.

    Raises:
        ModelError: nothing there; the message says how to get a model.
    """
    if model is not None:
        path, where = Path(model), None
    elif os.environ.get(MODEL_ENV):
        path, where = Path(os.environ[MODEL_ENV]), f"${MODEL_ENV}"
    else:
        path, where = SHIPPED_MODEL, "the shipped default"
    if path.exists():
        return path
    if where == "the shipped default":
        raise ModelError(
            f"no model given and no shipped default model at {path}. Pass --model RUN_FOLDER_OR_ONNX, set "
            f"${MODEL_ENV}, or export one: `malaria-cells export RUN --format onnx --out {path}`",
            code="model_not_found",
        )
    if where is None:
        raise ModelError(f"{path}: no such model file or run folder (does not exist)", code="model_not_found")
    raise ModelError(f"{where} points to {path}, which does not exist", code="model_not_found")


def load_backend(
    model: str | Path | None,
    *,
    threads: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
) -> OnnxBackend | TorchBackend:
    """Load an ONNX file (onnxruntime) or a run folder (torch).

    Args:
        model: an ``.onnx`` file, a run folder, or ``None`` for ``$MALARIA_CELLS_MODEL`` or the shipped default.
        threads: intra-op threads (default: the runtime's choice).
        device: torch only: where the run's model runs (default: CUDA when present).
        precision: torch only: "fp32" (default), "bf16" or "auto".

    Returns:
        The backend.

    Raises:
        ModelError: the model is missing or unusable; the message names the file.
    """
    path = resolve_model(model)
    if path.is_dir():
        return TorchBackend(path, threads=threads, device=device, precision=precision)
    return OnnxBackend(path, threads=threads)


def probabilities(
    backend: Backend,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """P(Parasitized) of many letterboxed cells, batch by batch (the array may be a read-only memmap).

    Args:
        backend: the model.
        images: uint8 (N, S, S, 3).
        batch_size: images per call (>= 1).
        progress: called with the number of images done after each batch.

    Returns:
        float32 (N,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    out = np.empty(len(images), dtype=np.float32)
    for a in range(0, len(images), batch_size):
        xb = np.ascontiguousarray(images[a : a + batch_size])
        out[a : a + len(xb)] = backend(xb)
        if progress:
            progress(len(xb))
    return out


def model_card(meta: dict[str, Any], *, backend: str, source: str) -> dict[str, Any]:
    """The model card shown to users: the card fields of a run's metadata or an ONNX file's metadata.

    Args:
        meta: a run's ``metadata.json`` or the decoded ONNX metadata.
        backend: "onnx" or "torch".
        source: the file or folder it came from.

    Returns:
        A JSON-ready dict (missing fields are left out).
    """
    card = {k: meta[k] for k in CARD_KEYS if k in meta}
    if backend == "torch":
        card.setdefault("package_version", (meta.get("packages") or {}).get("malaria-cells"))
        card["input"] = "letterboxed RGB, normalised as in preprocessing (torch)"
    card.update(
        backend=backend,
        source=source,
        explainable=backend == "torch",
        disclaimer="Research and education use only; not a medical device and not for diagnosis.",
    )
    return card
