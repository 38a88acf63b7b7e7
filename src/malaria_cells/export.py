"""Export a run to ONNX (fp32, or int8 with static quantization), with metadata inside and a parity check.

The graph takes what :func:`malaria_cells.preprocess.letterbox` returns, batched: uint8 (N, S, S, 3) RGB with
a dynamic batch axis. The cast to float, the channel transpose and ``(x / 255 - mean) / std`` happen inside
the graph, so a client only decodes and letterboxes (NumPy and Pillow, no float work of its own) and the
input is 4x smaller than float32. Outputs: ``logit`` and ``prob_parasitized``, both (N,).

Everything a client needs travels inside the file as ``metadata_props`` (JSON-encoded values, keys in
:data:`malaria_cells.backends.CARD_KEYS`), the run's fitted ``temperature`` included: the graph's outputs are the raw
logit and its sigmoid, and P(Parasitized), on whose scale the thresholds are, is sigmoid(logit / temperature).

The exporter is torch's TorchScript-based one (``dynamo=False``): with the pinned torch it folds batch norm into the
convolutions and yields a clean graph in well under a second, while the dynamo exporter needs the extra
``onnxscript`` package, takes ~25x longer and leaves shape-computation nodes behind. Switch to ``dynamo=True`` when
torch drops the TorchScript exporter.

The parity and int8 checks run the model through :mod:`malaria_cells.backends`, the same code ``predict`` and
``evaluate`` use: the exported file is compared with the run folder as a user would load it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from malaria_cells import __version__
from malaria_cells.backends import (
    CARD_KEYS,
    CPU_ONLY,
    ONNX_FORMAT,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    OnnxBackend,
    TorchBackend,
    probabilities,
)
from malaria_cells.errors import MalariaCellsError
from malaria_cells.io import atomic_write
from malaria_cells.preprocess import ImageError, Preprocessing, letterbox, load_image

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |prob_onnx - prob_torch| for an fp32 export
INT8_MAX_DROP_POINTS = 0.5  # accuracy drop (percentage points) above which an int8 export is flagged
OPSET = 17


class ExportError(MalariaCellsError, RuntimeError):
    """An export that cannot be made or fails its checks; the message says why."""

    code = "export_failed"


@dataclass
class ExportReport:
    """What an export produced and measured."""

    path: str
    precision: str  # "fp32" or "int8"
    size_bytes: int
    parity_images: int
    parity_source: str  # "test split", "training cells (final fit: no test split)" or "synthetic"
    parity_max_abs_diff_prob: float  # vs the torch model, on the parity images
    quantization: dict = field(default_factory=dict)  # int8 only: format, calibration, accuracies, drop
    warning: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


class UInt8Input(nn.Module):
    """Wrap a model so it takes uint8 NHWC RGB and returns (logit, P(Parasitized)), normalisation inside."""

    def __init__(self, model: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one Sub and one Div in the graph.
        self.register_buffer("offset", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, S, S, 3) -> logit (N,), probability (N,)."""
        x = (image.permute(0, 3, 1, 2).float() - self.offset) / self.scale
        logit = self.model(x)
        return logit, torch.sigmoid(logit)


def onnx_metadata(meta: dict, *, extra: dict | None = None) -> dict[str, object]:
    """The metadata an exported file carries, from a run's ``metadata.json``.

    Args:
        meta: the run's metadata.
        extra: more card fields (quantization, parity, warning).

    Returns:
        Card fields (values not yet JSON-encoded).
    """
    out: dict[str, object] = {
        "format": ONNX_FORMAT,
        "model": meta["model"],
        "class_names": meta["class_names"],
        "positive_class": meta["positive_class"],
        "positive_index": meta.get("positive_index", 1),
        "preprocessing": meta["preprocessing"],
        "input": f"{ONNX_INPUT}: uint8 (N, S, S, 3) RGB letterboxed to S={meta['preprocessing']['input_size']} "
        "(normalisation is inside the graph)",
        "output": f"{ONNX_OUTPUTS[0]}: (N,) log-odds of Parasitized; {ONNX_OUTPUTS[1]}: (N,) sigmoid(logit). "
        f"P(Parasitized), the scale of threshold and operating_points, is sigmoid({ONNX_OUTPUTS[0]} / temperature)",
        "threshold": meta["threshold"],
        "threshold_method": meta.get("threshold_method"),
        # Named thresholds (balanced, high_specificity, high_sensitivity) where the run has them (adapt writes them).
        "operating_points": meta.get("operating_points") or {"default": meta["threshold"]},
        # Temperature scaling: written as a number even when none was fitted (1.0), so a client reading the file
        # without this package divides the logit by it and lands on the thresholds' scale.
        "temperature": meta.get("temperature") or 1.0,
        "temperature_fitted_on": meta.get("temperature_fitted_on"),
        # Test-time augmentation (8 views) has its own thresholds, chosen on out-of-fold predictions of the CV.
        "tta_threshold": meta.get("tta_threshold"),
        "tta_operating_points": meta.get("tta_operating_points"),
        # A model adapted on stain-normalized lab cells wants field photos' cells normalized the same way (smear).
        "stain_normalize": bool(meta.get("stain_normalize")),
        "split_kind": meta.get("split_kind"),
        # A final fit has no test patients: its figures are the cross-validation's estimate, carried here.
        "final_fit": bool(meta.get("final_fit")),
        "cv_estimate": meta.get("cv_estimate"),
        "data_manifest_sha256": meta.get("data_manifest_sha256"),
        "val_metrics_at_threshold": meta.get("val_metrics_at_threshold"),
        "source_run_created": meta.get("created"),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "quantization": {"precision": "fp32"},
    }
    out.update(extra or {})
    unknown = set(out) - set(CARD_KEYS)
    assert not unknown, f"card keys missing from backends.CARD_KEYS: {unknown}"
    return out


def _set_metadata(path: Path, fields: dict[str, object], *, doc: str) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in fields.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    model.doc_string = doc
    model.producer_name = "malaria-cells"
    model.producer_version = __version__
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_torchscript_onnx(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    """Write the fp32 graph (uint8 NHWC input, dynamic batch) without metadata.

    Args:
        model: the trained model (eval mode).
        prep: its preprocessing.
        path: the ``.onnx`` file to write.
    """
    wrapped = UInt8Input(model, prep).eval()
    example = torch.zeros((2, prep.input_size, prep.input_size, 3), dtype=torch.uint8)
    dyn = {ONNX_INPUT: {0: "batch"}, **{o: {0: "batch"} for o in ONNX_OUTPUTS}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (see the module docstring for why we keep it).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=list(ONNX_OUTPUTS),
            dynamic_axes=dyn,
            opset_version=OPSET,
            do_constant_folding=True,
        )


FINAL_FIT_CHECK_IMAGES = 3000  # a final fit has no test split: this many other training cells check the export


@dataclass
class _SplitData:
    calibration: np.ndarray | None  # uint8 train images
    test: np.ndarray | None  # uint8 check images: the test split, or training cells for a final fit
    test_labels: np.ndarray | None
    source: str = "test split"  # what the check images are


def _split_images(
    *, run_dir: Path, meta: dict, data_dir: Path | None, need_calibration: int, cache_dir: str | None
) -> _SplitData:
    """Train-split images for calibration and the whole test split, or Nones when the data is not there."""
    from malaria_cells.cache import build_or_load
    from malaria_cells.data import DataError, resolve_data_dir, scan
    from malaria_cells.evaluate import select_images
    from malaria_cells.run import Run

    size = int(meta["preprocessing"]["input_size"])
    try:
        if data_dir is None and meta.get("data_root") and Path(meta["data_root"]).exists():
            data_dir = Path(meta["data_root"])
        found = scan(resolve_data_dir(data_dir))
        held_out = set(Run.open(run_dir).split().assignment.values())  # a final fit has neither test nor val
        which = "test" if "test" in held_out else "val" if "val" in held_out else None
        test_images = select_images(run_dir=run_dir, images=found.images, split=which)[0] if which else []
        # Training cells only where they are used: int8 calibration, or a final fit's check images.
        need_train = need_calibration or not test_images
        train_images = select_images(run_dir=run_dir, images=found.images, split="train")[0] if need_train else []
    except (DataError, ValueError, FileNotFoundError) as e:
        log.warning("no data for the checks (%s); parity uses synthetic images", e)
        return _SplitData(None, None, None)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train_images), size=min(need_calibration, len(train_images)), replace=False)
    source = "test split" if which == "test" else "validation split (the run has no test split)"
    if not test_images:
        # A final fit trained on every patient: the export is checked on training cells the int8 calibration did not
        # use. That measures fidelity to the fp32 model (parity, int8 drop), not accuracy on new patients.
        rest = np.setdiff1d(np.arange(len(train_images)), pick)
        if not len(rest):
            raise ExportError(
                f"a final fit of {len(train_images)} cells has none left to check the export on after "
                f"{len(pick)} calibration images: lower --calibration-images"
            )
        chosen = np.sort(rng.choice(rest, size=min(FINAL_FIT_CHECK_IMAGES, len(rest)), replace=False))
        test_images = [train_images[i] for i in chosen]
        source = "training cells (final fit: no test split)"
    cache = build_or_load(images=test_images, size=size, root=found.root, cache_dir=cache_dir)
    keep = np.flatnonzero(cache.ok)
    test = np.asarray(cache.array[keep])
    labels = np.array([test_images[i].label for i in keep], dtype=np.int64)
    calibration = None
    if need_calibration:
        arrays = []
        for i in sorted(pick):
            try:
                arrays.append(letterbox(load_image(train_images[i].path), size))
            except ImageError as e:
                log.warning("calibration: skipped %s", e)
        calibration = np.stack(arrays) if arrays else None
    return _SplitData(calibration, test, labels, source)


def synthetic_cells(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Cell-like uint8 images (stained discs on black, some with dark dots) for checks without the data.

    Args:
        n: how many.
        size: side in px.
        seed: random seed.

    Returns:
        uint8 (n, size, size, 3).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.4, 0.6, 2) * size
        r = rng.uniform(0.3, 0.45) * size
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        colour = rng.uniform([180, 100, 110], [240, 160, 170])
        img = np.zeros((size, size, 3))
        img[disc] = colour + rng.normal(0, 8, (disc.sum(), 3))
        for _ in range(rng.integers(0, 3)):
            dy, dx = rng.uniform(-0.5, 0.5, 2) * r
            dot = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 < (0.12 * r) ** 2
            img[dot & disc] = rng.uniform([60, 20, 90], [110, 60, 150])
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


class _Calibration:
    """An onnxruntime CalibrationDataReader over uint8 image batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([images[a : a + batch_size] for a in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ONNX_INPUT: np.ascontiguousarray(batch)}


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    *,
    quant_format: str = "qdq",
    per_channel: bool = True,
    keep_first_conv: bool = True,
) -> None:
    """Static int8 quantization with onnxruntime (MinMax calibration, uint8 activations, int8 weights).

    Args:
        fp32_path: the fp32 model.
        out_path: where to write the int8 model.
        calibration: uint8 images (N, S, S, 3) to calibrate activation ranges on.
        quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs) or "qoperator" (QLinearConv etc.).
        per_channel: per-output-channel weight scales (more accurate for convolutions).
        keep_first_conv: leave the first convolution in fp32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise ValueError(f"quant_format must be qdq or qoperator, not {quant_format!r}")
    import onnx

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        # The first convolution sees 3 channels only: int8 weights there cost the most accuracy for the least
        # time (measured on a small run: 2 instead of 5 of 295 test decisions flipped), so it stays fp32.
        first_conv = (
            [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"][:1] if keep_first_conv else []
        )
        try:
            root.setLevel(logging.ERROR)  # the quantizer logs a warning for the uint8 input it rightly skips
            quantize_static(
                str(pre),
                str(out_path),
                _Calibration(calibration),
                quant_format=formats[quant_format],
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=first_conv,
            )
        finally:
            root.setLevel(level)


def accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Share of images whose thresholded prediction (Parasitized = 1) matches the label."""
    return float(np.mean((probs >= threshold).astype(np.int64) == labels)) if len(labels) else float("nan")


def export_run(
    *,
    run_dir: Path,
    out: Path | None = None,
    int8: bool = False,
    data_dir: Path | None = None,
    quant_format: str = "qdq",
    calibration_images: int = 512,
    parity_images: int = 512,
    cache_dir: str | None = None,
) -> ExportReport:
    """Export a run's best weights to ONNX with metadata, check parity with torch, optionally quantize to int8.

    The fp32 export must match torch within :data:`PARITY_TOLERANCE` on the parity images (the run's test
    split when the data is found, else synthetic cells), or nothing is written. An int8 export is calibrated
    on training images of the run's split and its accuracy compared with fp32 on the run's test split; a drop
    over :data:`INT8_MAX_DROP_POINTS` points is logged as a warning and recorded in the file's metadata.

    Args:
        run_dir: a finished run folder.
        out: the ``.onnx`` file (default ``RUN/model.onnx`` or ``RUN/model-int8.onnx``).
        int8: quantize (needs the run's data).
        data_dir: the images (default: the run's data root, then the usual search).
        quant_format: int8 only: "qdq" or "qoperator".
        calibration_images: int8 only: how many training images calibrate the activation ranges.
        parity_images: at most this many test images for the parity check.
        cache_dir: decoded-image cache folder.

    Returns:
        The report (also logged).

    Raises:
        ExportError: parity failed, or int8 asked for without data.
        ModelError: not a finished run folder, a broken ``metadata.json`` or unusable weights (names the file).
    """
    run_dir = Path(run_dir)
    # The reference is the run as `predict` loads it, on the CPU like the ONNX checks (no GPU rounding in the diff).
    reference = TorchBackend(run_dir, device="cpu", precision="fp32")
    model, meta, prep = reference.model, reference.meta, reference.prep
    threshold = float(meta["threshold"])
    out = Path(out) if out else run_dir / ("model-int8.onnx" if int8 else "model.onnx")
    split = _split_images(
        run_dir=run_dir,
        meta=meta,
        data_dir=data_dir,
        need_calibration=calibration_images if int8 else 0,
        cache_dir=cache_dir,
    )
    if split.test is not None and len(split.test):
        parity_set, parity_source = split.test[:parity_images], split.source
    else:
        parity_set, parity_source = synthetic_cells(min(parity_images, 128), prep.input_size), "synthetic"
    if int8 and (split.calibration is None or split.test is None):
        raise ExportError("--int8 needs the run's images (calibration on train, accuracy on test); pass --data DIR")

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_torchscript_onnx(model, prep, fp32)
        ref = probabilities(reference, parity_set).astype(np.float64)
        # Not stamped yet (the stamp records the parity): the run's metadata stands in for the file's.
        fp32_backend = OnnxBackend(fp32, providers=CPU_ONLY, meta=meta)
        diff = float(np.max(np.abs(probabilities(fp32_backend, parity_set) - ref)))
        log.info("parity fp32 ONNX vs torch: max |Δprob| = %.2e on %d %s images", diff, len(parity_set), parity_source)
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"fp32 ONNX differs from torch by {diff:.2e} > {PARITY_TOLERANCE:.0e}; nothing written")
        extra: dict[str, object] = {"parity_max_abs_diff_prob": diff}
        final, precision, warning, quant = fp32, "fp32", None, {}
        if int8:
            assert split.calibration is not None and split.test is not None and split.test_labels is not None
            q8 = Path(tmp) / "int8.onnx"
            quantize_int8(fp32, q8, split.calibration, quant_format=quant_format)
            q8_backend = OnnxBackend(q8, providers=CPU_ONLY, meta=meta)
            acc32 = accuracy(probabilities(fp32_backend, split.test), split.test_labels, threshold)
            acc8 = accuracy(probabilities(q8_backend, split.test), split.test_labels, threshold)
            drop = (acc32 - acc8) * 100.0
            q8_diff = float(np.max(np.abs(probabilities(q8_backend, parity_set) - ref)))
            quant = {
                "precision": "int8",
                "method": "onnxruntime quantize_static, MinMax, per-channel int8 weights, uint8 activations, "
                "first convolution kept fp32",
                "format": quant_format.upper(),
                "calibration": f"{len(split.calibration)} training images of the run's split",
                "test_images": int(len(split.test_labels)),
                "check_images": split.source,
                "accuracy_fp32_test": acc32,
                "accuracy_int8_test": acc8,
                "accuracy_drop_points": drop,
                "max_abs_diff_prob_vs_torch": q8_diff,
            }
            log.info(
                "int8 (%s): accuracy %.4f vs fp32 %.4f on the %s (drop %+.2f points on %d images); "
                "max |Δprob| vs torch %.3f",
                quant_format.upper(),
                acc8,
                acc32,
                split.source,
                drop,
                len(split.test_labels),
                q8_diff,
            )
            if drop > INT8_MAX_DROP_POINTS:
                warning = (
                    f"int8 accuracy on the {split.source} is {drop:.2f} points below fp32 "
                    f"(more than {INT8_MAX_DROP_POINTS}); prefer the fp32 model"
                )
                log.warning("%s", warning)
            final, precision = q8, "int8"
        extra["quantization"] = quant or {"precision": "fp32"}
        if warning:
            extra["warning"] = warning
        _set_metadata(
            final,
            onnx_metadata(meta, extra=extra),
            doc=f"malaria-cells {meta['model']} ({precision}): P(Parasitized) of a red blood cell image. "
            "Research and education use only; not for diagnosis.",
        )
        atomic_write(out, lambda t: t.write_bytes(final.read_bytes()))
    report = ExportReport(
        path=str(out),
        precision=precision,
        size_bytes=out.stat().st_size,
        parity_images=len(parity_set),
        parity_source=parity_source,
        parity_max_abs_diff_prob=diff,
        quantization=quant,
        warning=warning,
    )
    log.info("wrote %s (%.2f MB, %s)", out, report.size_bytes / 1e6, precision)
    return report
