"""Transfer learning helpers: a timm backbone cut into stages, freezing, and an on-disk cache of backbone outputs.

A frozen backbone gives the same output for the same input every epoch, so it runs once per (image, view):
the pooled features (what a frozen-backbone head trains on) and, when they fit, the activations at the input
of the top ``unfreeze_stages`` stages (what a fine-tuning run would recompute every epoch) are stored as
float16 memmaps beside the decoded-image cache. A store is keyed by what decides its content: model, a hash of
the weights that produced it, input size and image list; it holds ``MAX_VIEWS`` view slots filled lazily, so
runs with another split, seed or number of views reuse what is already there, and a killed extraction
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from malaria_cells import progress
from malaria_cells.augment import MAX_VIEWS, view, view_jitter
from malaria_cells.cache import default_cache_dir
from malaria_cells.io import atomic_write, atomic_write_json
from malaria_cells.models import autocast, to_input
from malaria_cells.preprocess import Preprocessing

STORE_VERSION = 1  # bump when view definitions or extraction change
# Activation stores larger than this are not built. ResNet50V2 below its top two stages at 128 px is 262 KB per
# cell and view in float16 (~8 GB for the share's 14k training cells x 2 views + val) and gains little: most of
# its compute is in the top two stages (measured: 4.8 cells/s fine-tuning on cached activations vs 4.7 recomputing
# them, on a loaded CPU). EfficientNet-Lite0 below its top two stages is 14 KB (~0.5 GB) and gains 1.6-1.7x.
MAX_ACTIVATION_BYTES = 4 * 1024**3
# Save the done-mask at least this often during an extraction, so a kill loses at most this much work.
_CHECKPOINT_S = 30.0

# Per timm architecture: the modules before the stages, the container of the stages, and the modules after the
# last stage (they only make sense together with it, so they train or freeze with the top stage).
LAYOUT: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "resnetv2_50": (("stem",), "stages", ("norm",)),
    "tf_efficientnet_lite0": (("conv_stem", "bn1"), "blocks", ("conv_head", "bn2")),
}


def stage_groups(backbone: nn.Module) -> list[nn.Sequential]:
    """Cut a timm backbone into groups, bottom to top: the stem, then one group per stage.

    Running the groups in order and then ``backbone.forward_head`` is the backbone's forward pass. The
    groups share their modules with the backbone (no copies).

    Args:
        backbone: a timm model of an architecture in :data:`LAYOUT`, built with ``num_classes=0``.

    Returns:
        ``[stem, stage 1, ..., top stage + final norm]``.
    """
    arch = getattr(backbone, "pretrained_cfg", {}).get("architecture")
    if arch not in LAYOUT:
        raise ValueError(f"no stage layout for timm architecture {arch!r}; known: {', '.join(LAYOUT)}")
    before, container, after = LAYOUT[arch]
    stages = list(backbone.get_submodule(container).children())
    groups = [nn.Sequential(*(backbone.get_submodule(n) for n in before))]
    groups += [nn.Sequential(s) for s in stages[:-1]]
    groups.append(nn.Sequential(stages[-1], *(backbone.get_submodule(n) for n in after)))
    return groups


def cut_index(backbone: nn.Module, unfreeze_stages: int) -> int:
    """Index of the first group that trains when the top ``unfreeze_stages`` stages are unfrozen.

    Args:
        backbone: the timm backbone.
        unfreeze_stages: 0 (only the head trains) up to the number of stages + 1 (the stem too).

    Returns:
        The number of frozen groups below the cut.
    """
    total = len(stage_groups(backbone))
    if not 0 <= unfreeze_stages <= total:
        raise ValueError(f"unfreeze_stages must be 0-{total} for this backbone ({total - 1} stages + stem)")
    return total - unfreeze_stages


def run_groups(groups: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply groups in order."""
    for g in groups:
        x = g(x)
    return x


def freeze(modules: Iterable[nn.Module]) -> None:
    """Stop gradients for every parameter of ``modules`` and put them in eval mode (fixed BN statistics)."""
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def state_hash(modules: Iterable[nn.Module]) -> str:
    """sha256 over the names, shapes and bytes of the parameters and buffers of ``modules`` (16 hex digits).

    This identifies the weights that produced a cached output, whichever file or run they came from.
    """
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class FeatureStore:
    """A float16 memmap of shape (MAX_VIEWS, N, *item_shape), filled lazily, with a (MAX_VIEWS, N) done mask."""

    path: Path
    array: np.memmap
    done: np.ndarray
    meta: dict

    @property
    def item_bytes(self) -> int:
        """Bytes per image and view."""
        return int(np.prod(self.array.shape[2:])) * 2

    def missing(self, v: int, idx: np.ndarray) -> np.ndarray:
        """The entries of ``idx`` whose view ``v`` is not stored yet."""
        return idx[~self.done[v, idx]]

    def complete(self, needs: dict[int, np.ndarray]) -> bool:
        """Whether every (view, image) of ``needs`` is stored."""
        return all(self.done[v, idx].all() for v, idx in needs.items())

    def _write_done(self, tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, self.done)

    def save_done(self) -> None:
        """Flush the data, then write the done mask (so the mask never claims unwritten data)."""
        self.array.flush()
        atomic_write(self.path.with_suffix(".done.npy"), self._write_done)
        atomic_write_json(self.path.with_suffix(".json"), self.meta)


def open_store(*, key: str, n: int, item_shape: tuple[int, ...], meta: dict, cache_dir: str | None) -> FeatureStore:
    """Open (or create, sparse on disk) the store named ``key``.

    Args:
        key: the store's identity (see :func:`store_key`).
        n: images.
        item_shape: shape of one output.
        meta: what the store holds (saved beside it).
        cache_dir: the cache folder (features go to its ``features/`` subfolder).

    Returns:
        The store.
    """
    directory = default_cache_dir(cache_dir) / "features"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.f16"
    shape = (MAX_VIEWS, n, *item_shape)
    done_path = path.with_suffix(".done.npy")
    expected = int(np.prod(shape)) * 2
    if path.exists() and path.stat().st_size == expected and done_path.exists():
        done = np.load(done_path)
        if done.shape != shape[:2]:
            done = np.zeros(shape[:2], dtype=bool)
        array = np.memmap(path, dtype=np.float16, mode="r+", shape=shape)
    else:
        # A new file is sparse: views never extracted take no disk space.
        array = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
        done = np.zeros(shape[:2], dtype=bool)
    return FeatureStore(path=path, array=array, done=done, meta={**meta, "shape": list(shape)})


def store_key(*, what: str, model: str, weights_hash: str, input_size: int, images_key: str) -> str:
    """The file stem of a store: what it holds, model, weights hash, input size and image list."""
    return f"{model}-{what}-w{weights_hash}-{input_size}px-i{images_key}-v{STORE_VERSION}"


@dataclass
class Extraction:
    """What an extraction computed and how long it took."""

    computed: int  # (image, view) pairs run through the backbone
    reused: int  # pairs already in the store
    seconds: float

    def to_dict(self) -> dict:
        """JSON-ready dict, with throughput."""
        return {
            "computed": self.computed,
            "reused": self.reused,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.computed / self.seconds, 1) if self.seconds > 0 and self.computed else None,
        }


@torch.no_grad()
def extract(
    *,
    backbone: nn.Module,
    groups: list[nn.Sequential],
    cut: int,
    images: np.ndarray,
    prep: Preprocessing,
    needs: dict[int, np.ndarray],
    pooled: FeatureStore | None,
    activations: FeatureStore | None,
    batch_size: int = 64,
    precision: str = "fp32",
    device: torch.device | None = None,
    description: str = "backbone features",
) -> Extraction:
    """Run the frozen backbone (eval mode) on every missing (view, image) of ``needs`` and store its outputs.

    Args:
        backbone: the timm backbone (its ``forward_head`` pools).
        groups: :func:`stage_groups` of the backbone.
        cut: activations are taken at the input of ``groups[cut]``.
        images: uint8 (N, S, S, 3) letterboxed cells (the decoded-image cache).
        prep: the backbone's preprocessing.
        needs: view number -> image indices that need it.
        pooled: store of pooled features, or ``None``.
        activations: store of activations at the cut, or ``None``.
        batch_size: images per forward pass.
        precision: "bf16" or "fp32".
        device: where the backbone runs (default: its parameters' device).
        description: progress task label.

    Returns:
        Counts and time.
    """
    stores = [s for s in (pooled, activations) if s is not None]
    device = device or next(backbone.parameters()).device
    backbone.eval()
    todo: dict[int, np.ndarray] = {}
    reused = 0
    for v, idx in sorted(needs.items()):
        idx = np.unique(idx)
        mask = np.zeros(len(idx), dtype=bool)
        for s in stores:
            mask |= ~s.done[v, idx]
        todo[v] = idx[mask]
        reused += int((~mask).sum())
    total = sum(len(t) for t in todo.values())
    t0 = time.perf_counter()
    if total == 0:
        return Extraction(0, reused, 0.0)
    last_save = time.perf_counter()
    with progress.task(description, total=total) as task:
        task.update(status=f"{reused:,} cached")
        for v, idx in todo.items():
            jitter = view_jitter(v, len(images)) if v else None
            for a in range(0, len(idx), batch_size):
                b = idx[a : a + batch_size]
                u8 = view(torch.from_numpy(np.asarray(images[b])), v, jitter[b] if jitter is not None else None)
                x = to_input(u8.to(device), prep)
                with autocast(precision, device):
                    act = run_groups(groups[:cut], x)
                    if activations is not None:
                        # NHWC is the memory order of a channels_last tensor: no copy, and it reads back as one.
                        activations.array[v, b] = act.float().permute(0, 2, 3, 1).cpu().numpy()
                    if pooled is not None:
                        pooled.array[v, b] = backbone.forward_head(run_groups(groups[cut:], act)).float().cpu().numpy()
                for s in stores:
                    s.done[v, b] = True
                task.advance(len(b))
                if time.perf_counter() - last_save > _CHECKPOINT_S:
                    for s in stores:
                        s.save_done()
                    last_save = time.perf_counter()
    seconds = time.perf_counter() - t0
    for s in stores:
        s.meta["seconds_per_item"] = seconds / total
        s.save_done()
    return Extraction(total, reused, seconds)


def activations_to_input(block: np.ndarray) -> torch.Tensor:
    """float16 NHWC activations -> float32 NCHW tensor in channels_last memory (what the upper stages expect)."""
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).permute(0, 3, 1, 2)


def describe_store(store: FeatureStore) -> dict:
    """File, shape and fill of a store (for metadata.json)."""
    return {
        "file": str(store.path),
        "shape": list(store.array.shape),
        "stored_items": int(store.done.sum()),
        "disk_mb": round(os.stat(store.path).st_blocks * 512 / 1e6, 1) if store.path.exists() else 0.0,
    }
