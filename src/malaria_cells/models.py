"""The model registry (a plain dict), the custom CNN, and torch inference helpers.

Every model outputs one logit: the log-odds that the cell is Parasitized (label 1). The registry is the one place
that describes a model: its timm architecture (``ModelSpec.timm_arch``, which builds it and which
:mod:`malaria_cells.weights` loads ImageNet weights for) and its preprocessing (input size, and the mean/std its
default pretrained weights were trained with, which a run stores in its ``metadata.json``). This module imports
neither :mod:`malaria_cells.weights` nor timm at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from malaria_cells.preprocess import Preprocessing
from malaria_cells.progress import available_cores


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """A 3x3 convolution, batch norm and ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


# Stage layouts of the custom CNN, (channels, convolutions) per stage. "slim" drops the second convolution of the
# 24 px and 12 px stages at 48 px input (the costliest per cell after the stem): about 17 M instead of 28 M
# multiply-adds per 48 px cell (`python benchmarks/arch_speed.py` measures what that buys under ONNX Runtime int8).
CNN_STAGES = ((16, 1), (32, 2), (64, 2), (128, 2), (256, 1))
SLIM_STAGES = ((16, 1), (32, 1), (64, 1), (128, 2), (256, 1))


class CustomCNN(nn.Module):
    """A compact CNN from scratch: five stages of 3x3 conv + batch norm + ReLU, each but the last followed by
    2x2 max-pooling; global average pooling, dropout and one linear layer.

    The stem is narrow (16 channels) because at full resolution every channel is expensive on a CPU; width
    doubles as resolution halves. At 64 px this is ~50 M multiply-adds per image and ~0.59 M parameters.

    Args:
        stages: (channels, convolutions) per stage.
        dropout: before the final linear layer (0-1).
    """

    def __init__(
        self,
        stages: tuple[tuple[int, int], ...] = CNN_STAGES,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for i, (width, n_convs) in enumerate(stages):
            for _ in range(n_convs):
                layers += conv_bn_relu(c, width)
                c = width
            if i < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, 1)
        self.num_features = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector (N, C)."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit of Parasitized, shape (N,)."""
        return self.head(self.dropout(self.forward_features(x))).squeeze(1)


class TimmBinary(nn.Module):
    """A timm backbone with a single-logit head; the backbone is ``self.backbone`` (timm names inside).

    Args:
        arch: timm architecture name.
        dropout: on the pooled features, before the head (0-1).
        head_hidden: 0 for a linear head; else the width of one hidden ReLU layer (with dropout 0.5 after it).
    """

    def __init__(self, arch: str, dropout: float = 0.2, head_hidden: int = 0) -> None:
        super().__init__()
        import timm  # imported here so the registry does not pay timm's import time until a timm model is built

        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        self.num_features = self.backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Module
        if head_hidden:
            self.head = nn.Sequential(
                nn.Linear(self.num_features, head_hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(head_hidden, 1)
            )
        else:
            self.head = nn.Linear(self.num_features, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector (N, C)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit of Parasitized, shape (N,)."""
        return self.head(self.dropout(self.forward_features(x))).squeeze(1)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a model and its defaults.

    A timm model is named by ``timm_arch`` alone (built as :class:`TimmBinary` of that architecture); any other
    model by its ``build`` callable. For a model with pretrained weights, ``mean``/``std`` are the normalisation
    those weights were trained with (tests/test_weights.py checks them against timm's ``pretrained_cfg``).
    """

    input_size: int  # px, default; measured (docs/reproduce.md, and the CV of docs/cv.md) for the custom CNN
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    strategy: str  # default strategy: scratch | frozen | finetune
    weights: str  # default weights: "none" or "imagenet"
    lr: float  # default peak learning rate
    epochs: int  # default epochs
    description: str
    timm_arch: str | None = None  # the timm architecture; None for a model of our own (then ``build`` is set)
    build: Callable[..., nn.Module] | None = None  # non-timm models: builds the model (keyword: head options)
    strategies: tuple[str, ...] = field(default=("scratch",))
    # timm models: hidden units of the head (0 = linear). None: the model has no such option (the custom CNN).
    head_hidden: int | None = None

    def __post_init__(self) -> None:
        if (self.timm_arch is None) == (self.build is None):
            raise ValueError("a ModelSpec names either a timm_arch or a build callable, exactly one")

    def builder(self) -> Callable[..., nn.Module]:
        """The callable that builds the model: ``build``, or :class:`TimmBinary` of ``timm_arch``."""
        if self.build is not None:
            return self.build
        return functools.partial(TimmBinary, self.timm_arch)


# A frozen ImageNet backbone's pooled features need a non-linear head here: on the validation patients of the full
# share (Lite0, 128 px, cached features; `python benchmarks/frozen_head.py`), the linear head reached accuracy
# 94.72 % / AUC 0.9859, one hidden layer of 64-512 units (dropout 0.5) 94.91-95.14 % / 0.9880-0.9886. 128 had the
# best AUC (early stopping's criterion); wider ones were no better. Fine-tuning and scratch runs keep the same head.
HEAD_HIDDEN = 128

MODELS: dict[str, ModelSpec] = {
    "custom-cnn": ModelSpec(
        build=CustomCNN,
        input_size=64,
        # Plain [0, 1] scaling: the network learns its own input statistics through the first batch norm.
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        strategy="scratch",
        weights="none",
        lr=3e-3,
        epochs=30,
        description="Compact CNN from scratch (8 conv layers, ~0.59 M params)",
    ),
    "resnet50v2": ModelSpec(
        timm_arch="resnetv2_50",
        input_size=128,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        strategy="frozen",
        weights="imagenet",
        lr=1e-3,
        epochs=10,
        description="timm resnetv2_50: pre-activation ResNet-50 (Keras ResNet50V2's architecture)",
        strategies=("frozen", "finetune", "scratch"),
        head_hidden=HEAD_HIDDEN,
    ),
    "efficientnet-lite0": ModelSpec(
        timm_arch="tf_efficientnet_lite0",
        input_size=128,
        mean=(0.5, 0.5, 0.5),  # Google's Lite0 weights take inputs scaled to [-1, 1]
        std=(0.5, 0.5, 0.5),
        strategy="frozen",
        weights="imagenet",
        lr=1e-3,
        epochs=10,
        description="timm tf_efficientnet_lite0 with Google's ImageNet weights",
        strategies=("frozen", "finetune", "scratch"),
        head_hidden=HEAD_HIDDEN,
    ),
}


MODELS["custom-cnn-slim"] = dataclasses.replace(
    MODELS["custom-cnn"],
    build=functools.partial(CustomCNN, stages=SLIM_STAGES),
    input_size=48,
    description="The compact CNN with one convolution fewer in two middle stages (6 conv layers, ~0.54 M params)",
)


def get_spec(name: str) -> ModelSpec:
    """Look up a registry entry, with the known names in the error.

    Args:
        name: a key of :data:`MODELS`.

    Returns:
        The entry.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def build_model(name: str, *, head_hidden: int | None = None) -> nn.Module:
    """Build an untrained model by registry name.

    Args:
        name: a key of :data:`MODELS`.
        head_hidden: timm models: hidden units of the head (0 = linear); None = the registry's default.

    Returns:
        The model (random init; load weights separately).

    Raises:
        ValueError: an unknown name, or ``head_hidden`` for a model without that option.
    """
    build, width = get_spec(name).builder(), head_width(name, head_hidden)
    return build() if width is None else build(head_hidden=width)


def head_width(name: str, head_hidden: int | None) -> int | None:
    """The head a model gets: ``head_hidden`` hidden units, else the registry's default; None for a fixed head.

    Args:
        name: a key of :data:`MODELS`.
        head_hidden: hidden units asked for (0 = linear), or None for the default.

    Returns:
        Hidden units (0 = linear), or None for a model whose head is fixed (the custom CNN).

    Raises:
        ValueError: ``head_hidden`` for a model with a fixed head.
    """
    spec = get_spec(name)
    if spec.head_hidden is None:
        if head_hidden:
            raise ValueError(f"{name} has a fixed head; head_hidden applies to the timm models only")
        return None
    return spec.head_hidden if head_hidden is None else head_hidden


def timm_models() -> dict[str, str]:
    """Registry name -> timm architecture, for every timm model of the registry.

    Returns:
        E.g. ``{"resnet50v2": "resnetv2_50", "efficientnet-lite0": "tf_efficientnet_lite0"}``.
    """
    return {name: spec.timm_arch for name, spec in MODELS.items() if spec.timm_arch is not None}


def default_preprocessing(name: str, input_size: int | None = None) -> Preprocessing:
    """The preprocessing a model's registry entry defines, at the given (or default) input size.

    For a model with pretrained weights this is the normalisation those weights expect, so scratch, frozen and
    fine-tuned runs of one model all take the same input.

    Args:
        name: a key of :data:`MODELS`.
        input_size: input side in px; None for the registry's default.

    Returns:
        The preprocessing.
    """
    spec = get_spec(name)
    return Preprocessing(input_size=input_size or spec.input_size, mean=spec.mean, std=spec.std)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """Turn "auto" into "bf16" (CUDA, or a CPU with native bf16) or "fp32".

    Args:
        precision: "auto", "bf16" or "fp32".
        device: where the model runs.

    Returns:
        "bf16" or "fp32".
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision != "auto":
        return precision
    if device is not None and device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """An autocast context for bf16, a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op torch threads.

    Args:
        threads: how many; None (or 0) for the cores this process may use (:func:`progress.available_cores`, which
            honours CPU affinity and a container's CPU quota).
    """
    torch.set_num_threads(max(1, threads or available_cores()))


def to_input(batch_u8: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW (channels_last memory) on the batch's device.

    Args:
        batch_u8: uint8 tensor (N, H, W, 3).
        prep: the model's preprocessing.

    Returns:
        float32 tensor (N, 3, H, W) in channels_last memory format.
    """
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(prep.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


_TF32_LOCK = threading.Lock()


@contextlib.contextmanager
def exact_fp32(precision: str, device: torch.device):
    """Make "fp32" on CUDA mean fp32 for the duration: cuDNN convolutions default to TF32 (10-bit mantissa).

    On an H200, TF32 moved P(Parasitized) by up to 2.5e-3 against the fp32 ONNX export (benchmarks/gpu_check.sh);
    with it off, torch and ONNX agree as they do on the CPU. Training keeps torch's default (TF32 is fast and its
    rounding is far below the noise of SGD). A no-op on the CPU and for bf16. The flag is process-wide, so concurrent
    CUDA fp32 predictions (serve's threads) take turns.

    Args:
        precision: the resolved precision of the forward pass ("fp32" or "bf16").
        device: where it runs.

    Yields:
        Nothing: the forward pass runs inside.
    """
    if device.type != "cuda" or precision != "fp32":
        yield
        return
    cudnn = torch.backends.cudnn
    with _TF32_LOCK:
        old = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = old


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    *,
    prep: Preprocessing,
    batch_size: int = 256,
    precision: str = "auto",
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits for a uint8 NHWC array (or memmap) of letterboxed images.

    Args:
        model: the model (put in eval mode here).
        images: uint8 (N, S, S, 3).
        prep: the model's preprocessing.
        batch_size: images per forward pass.
        precision: "auto", "bf16" or "fp32".
        device: defaults to the model's device.
        progress: called with the number of images done after each batch.

    Returns:
        float32 logits (N,).
    """
    device = device or next(model.parameters()).device
    precision = resolve_precision(precision, device)
    model.eval()
    out = np.empty(len(images), dtype=np.float32)
    for a in range(0, len(images), batch_size):
        x = to_input(
            torch.from_numpy(np.array(images[a : a + batch_size])).to(device), prep
        )  # copy: memmaps are read-only
        with exact_fp32(precision, device), autocast(precision, device):
            out[a : a + len(x)] = model(x).float().cpu().numpy()
        if progress:
            progress(len(x))
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))).astype(
        np.float32
    )
