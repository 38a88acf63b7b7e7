"""Training: one run folder per run, resumable after a kill, with early stopping and a threshold chosen on val.

The run folder is a :class:`~malaria_cells.run.Run` (see run.py for its files); this module only trains into it.
:func:`train` is the entry point; its parts are :func:`open_run` (a new or resumed folder), :func:`make_optimizer`,
:func:`train_one_epoch`, :func:`validate`, :class:`EarlyStopping`, a checkpoint per epoch (weights, a
safetensors resume state, the history) and :func:`finalize` (threshold on validation, ``metadata.json``).

Strategies share one epoch loop and differ only in a :class:`Plan` (trainable parameters, what a batch is, how
validation is scored): ``scratch`` trains every layer from random initialisation; ``frozen`` trains only the
head on cached backbone features (backbone and its BN statistics fixed); ``finetune`` starts from a frozen run's
head (``init_from``) and also trains the top ``unfreeze_stages`` stages at ``lr * backbone_lr_scale``. The
weights always hold the whole model, so evaluation and export never need to know the strategy.

Under ``torchrun --nproc_per_node N`` (see :mod:`malaria_cells.distributed`) the ``scratch`` strategy trains with
DistributedDataParallel: every rank draws the same epoch permutation and the same global batches of
``batch_size`` images as one process would, and rank r trains on rows ``r*b .. (r+1)*b`` (``b = batch_size / N``)
of each. Batch norm is synchronised and dropout masks are drawn for the global batch, so one N-rank step computes
what one single-process step computes, up to floating-point rounding (the loss agrees to ~1e-7; see
tests/test_ddp.py for what differs more). ``frozen`` and ``finetune`` refuse to run with N > 1: they train on
cached backbone features and build shared on-disk feature stores, which several ranks would race to write. Only
rank 0 writes the run folder, validates and decides when to stop.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from malaria_cells import distributed, progress
from malaria_cells import metrics as M
from malaria_cells.augment import (
    augment,  # re-exported: the scratch path's augmentation
    stain_jitter,
)
from malaria_cells.cache import build_or_load, cache_key, default_cache_dir
from malaria_cells.config import STRATEGY_DEFAULTS, TrainConfig
from malaria_cells.data import CLASSES, POSITIVE, CellImage, Scan, scan
from malaria_cells.errors import ConfigError, RunError
from malaria_cells.models import (
    autocast,
    build_model,
    count_parameters,
    default_device,
    get_spec,
    head_width,
    predict_logits,
    resolve_precision,
    set_threads,
    sigmoid,
    to_input,
)
from malaria_cells.preprocess import Preprocessing
from malaria_cells.run import Run, RunMeta, TrainState
from malaria_cells.split import Split, check_split, describe, load_split, make_cv_split, make_split, save_split
from malaria_cells.transfer import (
    MAX_ACTIVATION_BYTES,
    FeatureStore,
    activations_to_input,
    cut_index,
    describe_store,
    extract,
    freeze,
    open_store,
    run_groups,
    stage_groups,
    state_hash,
    store_key,
)
from malaria_cells.weights import load_pretrained, weights_preprocessing

log = logging.getLogger(__name__)
PACKAGES = ("malaria-cells", "torch", "timm", "numpy", "pillow", "scikit-learn", "onnxruntime")


@dataclass
class Prepared:
    """Data ready for training: the images, the split, and a uint8 cache aligned with the images."""

    scan: Scan
    images: list[CellImage]
    split: Split
    array: np.ndarray  # uint8 (N, S, S, 3), memmap
    labels: np.ndarray  # int (N,)
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    targets: np.ndarray | None = None  # float (N,) soft targets of the training cells (distillation); None: labels


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def resolve_model_defaults(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` that means "the model's default" from the registry (and :data:`STRATEGY_DEFAULTS`).

    Args:
        config: the config as given.

    Returns:
        A new config with model, strategy, weights, input size, epochs and lr resolved.
    """
    try:
        spec = get_spec(config.model)
    except ValueError as e:
        raise ConfigError(str(e), code="config_unknown_model") from None
    strategy = config.strategy or spec.strategy
    if strategy not in spec.strategies:
        raise ConfigError(f"model {config.model} supports strategies {', '.join(spec.strategies)}, not {strategy!r}")
    weights = config.weights or (spec.weights if strategy != "scratch" else "none")
    defaults = {"epochs": spec.epochs, "lr": spec.lr, **STRATEGY_DEFAULTS.get(strategy, {})}
    head_hidden = config.head_hidden
    if head_hidden is None and strategy == "finetune" and config.init_from and Run(config.init_from).finished:
        head_hidden = Run.open(config.init_from).meta.head_width  # a run started from another has its head
    try:
        head_hidden = head_width(config.model, head_hidden)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config.replace(
        strategy=strategy,
        weights=weights,
        input_size=config.input_size or spec.input_size,
        epochs=config.epochs if config.epochs is not None else defaults["epochs"],
        lr=config.lr if config.lr is not None else defaults["lr"],
        head_hidden=head_hidden,
    )


def subsample(images: list[CellImage], max_images: int | None, seed: int) -> list[CellImage]:
    """A class-balanced random subset of at most ``max_images`` images (every patient keeps some cells).

    Args:
        images: all images.
        max_images: the cap, or ``None`` for all.
        seed: sampling seed.

    Returns:
        The subset, in the original order.
    """
    if not max_images or max_images >= len(images):
        return images
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in (0, 1):
        idx = np.array([i for i, im in enumerate(images) if im.label == label])
        take = min(len(idx), max_images // 2)
        keep += rng.choice(idx, size=take, replace=False).tolist()
    return [images[i] for i in sorted(keep)]


def prepare_data(
    *,
    data_dir: Path,
    input_size: int,
    split: Split | None,
    kind: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_images: int | None,
    cache_dir: str | None,
    cv_folds: int | None = None,
    cv_fold: int = 0,
    split_seed: int | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Prepared:
    """Scan, subsample, split (or reuse a split) and cache the images at the model's input size.

    Args:
        data_dir: folder or zip archive.
        input_size: px.
        split: an existing split (resume, a split file, or another run's split) or ``None`` to make one. Its images
            are matched by relative path, else by class folder and file stem (a zip and a folder of the same data),
            and ``max_images`` subsamples them (a no-op on a resumed run's own subset).
        kind: split kind when making one.
        val_fraction: of images, by whole patients.
        test_fraction: of images, by whole patients.
        seed: split and subsample seed.
        max_images: class-balanced cap on images (quick runs).
        cache_dir: decoded-image cache folder.
        cv_folds: when set, the split is fold ``cv_fold`` of a patient-level K-fold cross-validation
            (:func:`~malaria_cells.split.make_cv_split`; ``test_fraction`` is unused).
        cv_fold: the test fold.
        split_seed: seed of the split or folds (default ``seed``): runs of several seeds can share one split.
        exclude: relative paths left out of the training cells only (suspect labels of ``data audit``); the split,
            validation and test keep them, so every figure stays on the original labels.

    Returns:
        The prepared data; unreadable images are reported and dropped.
    """
    found = scan(data_dir)
    found.require_images(hint="training splits by patient, so file names must carry NIH patient ids (C<number>...)")
    for path, reason in found.problems[:10]:
        log.warning("skipped %s: %s", path, reason)
    if len(found.problems) > 10:
        log.warning("... %d more files skipped (see `malaria-cells data check`)", len(found.problems) - 10)
    if split is None:
        images = subsample(found.images, max_images, seed)
        s_seed = seed if split_seed is None else split_seed
        if cv_folds is not None:
            split = make_cv_split(images, folds=cv_folds, fold=cv_fold, val_fraction=val_fraction, seed=s_seed)
        else:
            split = make_split(images, kind=kind, val_fraction=val_fraction, test_fraction=test_fraction, seed=s_seed)
    else:
        images, which = _match_split(found.images, split)
        missing = len(split.assignment) - len(images)
        if missing:
            log.warning("%d image(s) of the split are not in %s; continuing without them", missing, data_dir)
        if not images:
            raise ConfigError(f"none of the split's images are in {data_dir}", code="split_file_invalid")
        images = subsample(images, max_images, seed)
        split = Split(kind=split.kind, assignment={im.rel: which[im.rel] for im in images}, seed=split.seed)
        check_split(split, images)  # patient ids parsed from these file names: still no patient in two splits
    cache = build_or_load(images=images, size=input_size, root=found.root, cache_dir=cache_dir)
    labels = np.array([im.label for im in images], dtype=np.int64)
    idx = {
        w: np.array([i for i in split.indices(images, w) if cache.ok[i]], dtype=np.int64)
        for w in ("train", "val", "test")
    }
    for w in ("train", "val"):
        present = set(labels[idx[w]].tolist())
        if len(idx[w]) and len(present) < 2:
            # One class: the val AUC that picks the best epoch and the threshold is undefined (no weights would be
            # saved), and a one-class training split learns nothing. Say so before an hour of training.
            only = "Parasitized" if present == {1} else "Uninfected"
            raise ConfigError(
                f"the {w} split holds only {only} cells ({len(idx[w])} cells of "
                f"{len({images[i].patient for i in idx[w]})} patient(s)): use more patients, a larger "
                "--val-fraction or another --split-seed",
                code="split_one_class",
            )
    if exclude:
        drop = np.array([images[i].rel in exclude for i in idx["train"]], dtype=bool)
        log.info("left %d suspect label(s) of the audit out of %d training cells", int(drop.sum()), len(drop))
        idx["train"] = idx["train"][~drop]
    return Prepared(found, images, split, cache.array, labels, idx["train"], idx["val"], idx["test"])


def _match_split(images: list[CellImage], split: Split) -> tuple[list[CellImage], dict[str, str]]:
    """The images a split names, and the split of each (keyed by the image's relative path).

    A row matches an image by relative path, else by class folder and file stem, so a split made on the unpacked
    folder also fits the zip archive (whose paths start with ``cell_images/``) and ``.png`` fits ``.webp``.
    """

    def key(rel: str) -> str:
        path = Path(rel)
        return f"{path.parent.name.lower()}/{path.stem}"

    by_key = {key(rel): s for rel, s in split.assignment.items()}
    chosen, which = [], {}
    for im in images:
        s = split.assignment.get(im.rel) or by_key.get(key(im.rel))
        if s is not None:
            which[im.rel] = s
            chosen.append(im)
    return chosen, which


def load_exclusions(path: str | None) -> frozenset[str]:
    """The relative paths listed in a ``suspects.csv`` of ``data audit`` (column ``rel``); empty without a file.

    Raises:
        ConfigError: the file is missing or has no ``rel`` column.
    """
    if not path:
        return frozenset()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConfigError(f"exclude_suspects: cannot read {path} ({e.strerror})") from None
    if rows and "rel" not in rows[0]:
        raise ConfigError(f"exclude_suspects: {path} has no 'rel' column (expected a suspects.csv of `data audit`)")
    return frozenset(r["rel"] for r in rows)


def teacher_probabilities(runs: list[Path], data: Prepared, idx: np.ndarray, *, cache_dir: str | None) -> np.ndarray:
    """The teachers' mean P(Parasitized) over the 8 dihedral views of the cells ``idx`` (each at its own input size).

    Args:
        runs: finished teacher run folders.
        data: the prepared data (its images, in order).
        idx: positions of the cells to score.
        cache_dir: decoded-image cache folder.

    Returns:
        float64 (len(idx),).
    """
    from malaria_cells.backends import TorchBackend, probabilities
    from malaria_cells.preprocess import MAX_VIEWS, dihedral_view

    images = [data.images[i] for i in idx]
    total = np.zeros(len(idx))
    for run_dir in runs:
        teacher = TorchBackend(run_dir, precision="fp32")
        cache = build_or_load(images=images, size=teacher.prep.input_size, root=data.scan.root, cache_dir=cache_dir)
        cells = np.asarray(cache.array)
        with progress.task(f"teacher {Path(run_dir).name}", total=MAX_VIEWS * len(idx), transient=True) as t:
            for v in range(MAX_VIEWS):
                view = np.ascontiguousarray(dihedral_view(cells, number=v))
                total += probabilities(teacher, view, progress=t.advance) / MAX_VIEWS
    return total / len(runs)


def distillation_targets(data: Prepared, *, config: TrainConfig) -> np.ndarray:
    """Soft targets for the training cells: ``alpha * label + (1 - alpha) * teacher``; other cells keep their label.

    Raises:
        RunError: a teacher run folder is missing or unfinished.
    """
    runs = [Path(r.strip()) for r in (config.distill_from or "").split(",") if r.strip()]
    for r in runs:
        Run.open(r)  # a clear error for a missing or unfinished teacher before any work
    targets = data.labels.astype(np.float64)
    teacher = teacher_probabilities(runs, data, data.train_idx, cache_dir=config.cache_dir)
    a = config.distill_alpha
    targets[data.train_idx] = a * targets[data.train_idx] + (1 - a) * teacher
    agree = float(((teacher >= 0.5) == (data.labels[data.train_idx] == 1)).mean()) if len(teacher) else float("nan")
    log.info(
        "distillation: %d teacher(s), alpha %.2f; teachers agree with %.2f %% of training labels",
        len(runs),
        a,
        100 * agree,
    )
    return targets


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up then cosine decay to ``floor`` x peak (multiplier of the peak lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _bce(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    y = y * (1 - smoothing) + 0.5 * smoothing
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), y)


@dataclass
class Plan:
    """What differs between strategies; the epoch loop, checkpoints, early stopping and threshold are shared."""

    model: nn.Module  # the whole model: what the run saves and evaluates
    param_groups: list[dict]  # AdamW groups, each with its peak "lr"
    batch: Callable[[np.ndarray, torch.Generator], torch.Tensor]  # sorted train indices -> forward input
    forward: Callable[[torch.Tensor], torch.Tensor]  # forward input -> logits (N,)
    train_mode: Callable[[], None]  # sets train/eval modes at the start of each epoch
    val_logits: Callable[[], np.ndarray] | None  # logits of the validation cells in sorted order; None: no val
    info: dict = field(default_factory=dict)  # strategy details for metadata.json
    setup_s: float = 0.0  # seconds spent before the first epoch (backbone feature extraction)


def load_initial_model(config: TrainConfig) -> tuple[nn.Module, Preprocessing, dict]:
    """Build the model and load the weights its strategy starts from; never falls back to random weights.

    scratch: random initialisation (seeded). frozen: pretrained backbone (``config.weights``: "imagenet" or a
    file) and a fresh head. finetune: the ``init_from`` run's best weights (a frozen run: pretrained backbone and
    trained head), or pretrained backbone and a fresh head without ``init_from``.

    Args:
        config: the resolved config.

    Returns:
        (model on the CPU, its preprocessing, where the weights came from).

    Raises:
        WeightsUnavailable: pretrained weights cannot be had (the message says what to pass instead).
        ValueError: a strategy/weights combination that would train a "pretrained" model from random weights.
    """
    spec = get_spec(config.model)
    torch.manual_seed(config.seed)  # the initialisation of the head (scratch: of everything)
    model = build_model(config.model, head_hidden=config.head_hidden)
    if config.strategy == "scratch":
        if config.weights not in (None, "none"):
            raise ConfigError(
                "strategy scratch trains every layer from random initialisation; pass --weights none, or use "
                "--strategy frozen/finetune to start from pretrained weights"
            )
        return model, Preprocessing(input_size=config.input_size, mean=spec.mean, std=spec.std), {"source": "none"}
    if spec.timm_arch is None:
        raise ConfigError(f"{config.model} has no pretrained backbone; it trains with --strategy scratch only")
    if config.strategy == "finetune" and config.init_from:
        init = Run.open(config.init_from)
        meta = init.meta
        if meta.model != config.model:
            raise ConfigError(f"init_from {init.path} holds a {meta.model} model, not {config.model}")
        if meta.weights in (None, "none"):
            raise ConfigError(
                f"init_from {init.path} was trained from random weights; fine-tuning needs a pretrained start"
            )
        if meta.prep.input_size != config.input_size:
            raise ConfigError(
                f"init_from {init.path} was trained at {meta.prep.input_size} px; pass --input-size "
                f"{meta.prep.input_size}"
            )
        if meta.head_width != config.head_hidden:
            raise ConfigError(
                f"init_from {init.path} has a head with {meta.head_width} hidden units; pass --head-hidden "
                f"{meta.head_width}"
            )
        model.load_state_dict(init.load_model().state_dict())
        info = {**meta.weights_info, "init_from": str(init.path), "init_from_strategy": meta.strategy}
        return model, meta.prep, info
    if config.weights in (None, "none"):
        raise ConfigError(
            f"strategy {config.strategy} needs pretrained weights (--weights imagenet or --weights FILE); "
            "to train from random weights use --strategy scratch"
        )
    if config.strategy == "finetune":
        log.warning("finetune without init_from: the head starts untrained (a frozen run's head is better)")
    info = load_pretrained(model.backbone, name=config.model, source=config.weights)
    # The normalisation the weights were trained with ([-1, 1] for both backbones), not the registry's guess.
    pre = weights_preprocessing(config.model)
    prep = Preprocessing(input_size=config.input_size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    return model, prep, info


def _views(config: TrainConfig) -> int:
    # Default 2 (benchmarks/feature_views.py, Lite0, 2000 cells, val patients): a frozen head gains nothing from
    # more views (val AUC 0.971 / 0.970 / 0.971 for 1 / 2 / 4) but fine-tuning on the cached activations does
    # a little (3 epochs: val AUC 0.979 / loss 0.229 with 1 view, train loss 0.03 = memorising; 0.981 / 0.204
    # with 2), and each view costs one backbone pass per training cell.
    return config.feature_views if config.augment else 1


def _needs(data: Prepared, views: int) -> dict[int, np.ndarray]:
    """(view -> cells) a frozen backbone must have seen: every view of the train cells, view 0 of val."""
    needs = {0: np.sort(np.concatenate([data.train_idx, data.val_idx]))}
    needs.update({v: np.sort(data.train_idx) for v in range(1, views)})
    return needs


def _activation_store(
    *, config: TrainConfig, data: Prepared, groups: list[nn.Sequential], cut: int, needs: dict, create: bool
) -> FeatureStore | None:
    """The store of activations at the input of ``groups[cut]``, or None if too big (or absent and not created)."""
    device = next((p.device for g in groups for p in g.parameters()), torch.device("cpu"))  # CUDA when trained there
    with torch.no_grad():
        probe = torch.zeros(1, 3, config.input_size, config.input_size, device=device)
        shape = run_groups(groups[:cut], probe).shape[1:]
    item_shape = (shape[1], shape[2], shape[0])  # NHWC
    n_items = sum(len(i) for i in needs.values())
    if n_items * int(np.prod(item_shape)) * 2 > MAX_ACTIVATION_BYTES:
        return None
    key = store_key(
        what=f"cut{cut}",
        model=config.model,
        weights_hash=state_hash(groups[:cut]),
        input_size=config.input_size,
        images_key=cache_key(data.images, config.input_size, data.scan.root),
    )
    directory = default_cache_dir(config.cache_dir) / "features"
    if not create and not (directory / f"{key}.f16").exists():
        return None
    meta = {"what": f"activations at the input of group {cut}", "model": config.model, "layout": "NHWC"}
    return open_store(key=key, n=len(data.images), item_shape=item_shape, meta=meta, cache_dir=config.cache_dir)


def _head_logits(
    model: nn.Module, inputs: np.ndarray, to_features: Callable[[torch.Tensor], torch.Tensor]
) -> np.ndarray:
    """Logits of cached backbone outputs in eval mode, in batches."""
    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(inputs), 256):
            out.append(model.head(to_features(torch.from_numpy(np.asarray(inputs[a : a + 256])))).squeeze(1))
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, np.float32)


def scratch_plan(
    *, model: nn.Module, data: Prepared, config: TrainConfig, prep: Preprocessing, device: torch.device, precision: str
) -> Plan:
    """Every layer trains from random initialisation on augmented images."""
    val_sorted = np.sort(data.val_idx)
    x_val = data.array[val_sorted] if len(val_sorted) else None

    def batch(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        xb = torch.from_numpy(data.array[idx])
        if config.augment:
            xb = augment(xb, gen)
            xb = stain_jitter(xb, gen, strength=config.stain_jitter)  # no draw at 0: older runs resume the same
        return to_input(xb.to(device), prep)

    def val_logits() -> np.ndarray:
        return predict_logits(model, x_val, prep=prep, precision=precision, device=device)

    params = [p for p in model.parameters() if p.requires_grad]
    return Plan(
        model=model,
        param_groups=[{"params": params, "lr": config.lr}],
        batch=batch,
        forward=model,
        train_mode=model.train,
        val_logits=val_logits if x_val is not None else None,
    )


def frozen_plan(
    *, model: nn.Module, data: Prepared, config: TrainConfig, prep: Preprocessing, device: torch.device, precision: str
) -> Plan:
    """Only the head trains, on backbone features computed once per (cell, view) and cached on disk.

    The backbone stays in eval mode (BN statistics fixed) and never receives gradients. The activations at the
    input of the top ``unfreeze_stages`` stages are stored along the way when they fit, so a fine-tuning run
    started from this one does not recompute the frozen part.
    """
    t0 = time.perf_counter()
    backbone = model.backbone
    groups = stage_groups(backbone)
    freeze([backbone])
    views = _views(config)
    needs = _needs(data, views)
    cut = cut_index(backbone, config.unfreeze_stages)
    images_key = cache_key(data.images, config.input_size, data.scan.root)
    full_hash = state_hash([backbone])
    pooled = open_store(
        key=store_key(
            what="pooled",
            model=config.model,
            weights_hash=full_hash,
            input_size=config.input_size,
            images_key=images_key,
        ),
        n=len(data.images),
        item_shape=(backbone.num_features,),
        meta={"what": "pooled backbone features", "model": config.model},
        cache_dir=config.cache_dir,
    )
    activations = None
    if config.unfreeze_stages > 0:
        activations = _activation_store(config=config, data=data, groups=groups, cut=cut, needs=needs, create=True)
    ext = extract(
        backbone=backbone,
        groups=groups,
        cut=cut,
        images=data.array,
        prep=prep,
        needs=needs,
        pooled=pooled,
        activations=activations,
        precision=precision,
        device=device,
        description=f"{config.model} features ({config.input_size} px, {views} view{'s' * (views > 1)})",
    )
    feats = pooled.array
    val_sorted = np.sort(data.val_idx)

    def batch(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        v = torch.randint(0, views, (len(idx),), generator=gen).numpy()
        return torch.from_numpy(feats[v, idx].astype(np.float32)).to(device)

    def forward(f: torch.Tensor) -> torch.Tensor:
        return model.head(model.dropout(f)).squeeze(1)

    def train_mode() -> None:
        model.eval()  # the backbone's BN keeps its ImageNet statistics
        model.dropout.train()

    def val_logits() -> np.ndarray:
        return _head_logits(model, feats[0, val_sorted], lambda f: f.float().to(device))

    info = {
        "feature_views": views,
        "backbone_hash": full_hash,
        "extraction": ext.to_dict(),
        "pooled_store": describe_store(pooled),
        "activation_store": describe_store(activations) if activations is not None else None,
    }
    return Plan(
        model=model,
        param_groups=[{"params": list(model.head.parameters()), "lr": config.lr}],
        batch=batch,
        forward=forward,
        train_mode=train_mode,
        val_logits=val_logits if len(val_sorted) else None,
        info=info,
        setup_s=time.perf_counter() - t0,
    )


def finetune_plan(
    *, model: nn.Module, data: Prepared, config: TrainConfig, prep: Preprocessing, device: torch.device, precision: str
) -> Plan:
    """The top ``unfreeze_stages`` stages and the head train; the stages below stay frozen, BN in eval mode.

    The backbone's learning rate is ``lr * backbone_lr_scale``. When the frozen part's activations are cached
    (a frozen run made them on the way, or building them pays off) the frozen part is not run at all.
    """
    t0 = time.perf_counter()
    backbone = model.backbone
    groups = stage_groups(backbone)
    if config.unfreeze_stages < 1:
        raise ConfigError("finetune needs unfreeze_stages >= 1 (0 trains the head only: use --strategy frozen)")
    cut = cut_index(backbone, config.unfreeze_stages)
    frozen, upper = groups[:cut], groups[cut:]
    freeze(frozen)
    for g in upper:
        for p in g.parameters():
            p.requires_grad_(True)
    views = _views(config)
    needs = _needs(data, views)
    val_sorted = np.sort(data.val_idx)
    store = _activation_store(config=config, data=data, groups=groups, cut=cut, needs=needs, create=False)
    ext = None
    # Measured on this project's 2-core CPU (EfficientNet-Lite0, 128 px, top 2 stages): a training step on
    # cached activations runs 1.6-1.7x faster (39.5 vs 24.9 cells per CPU-second; 18.3 vs 10.7 cells/s in
    # benchmarks/transfer_strategies.py) but building the cache costs one frozen-part forward (38 cells per
    # CPU-second) per cell and view, so it pays off only after about 1.8 x views epochs. With augmentation (several
    # views) and few epochs that is rarely true, so the cache is built here only when epochs > 2 x views. A frozen
    # run of the same weights stores it on the way (no extra compute), which is how reproduce gets it for free.
    if store is not None and store.complete(needs):
        mode = "cached activations (made by an earlier run)"
    elif config.epochs > 2 * views and (
        store := _activation_store(config=config, data=data, groups=groups, cut=cut, needs=needs, create=True)
    ):
        ext = extract(
            backbone=backbone,
            groups=groups,
            cut=cut,
            images=data.array,
            prep=prep,
            needs=needs,
            pooled=None,
            activations=store,
            precision=precision,
            device=device,
            description=f"{config.model} frozen-part activations",
        )
        mode = "cached activations (built by this run)"
    else:
        store = None
        mode = "online (frozen part recomputed each step; random augmentation)"
    log.info("fine-tuning %d top stage(s) of %s: %s", config.unfreeze_stages, config.model, mode)

    def upper_features(a: torch.Tensor) -> torch.Tensor:
        return backbone.forward_head(run_groups(upper, a))

    if store is not None:
        acts = store.array

        def batch(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
            v = torch.randint(0, views, (len(idx),), generator=gen).numpy()
            return activations_to_input(acts[v, idx]).to(device)

        def forward(a: torch.Tensor) -> torch.Tensor:
            return model.head(model.dropout(upper_features(a))).squeeze(1)

        def val_logits() -> np.ndarray:
            return _head_logits(
                model, acts[0, val_sorted], lambda a: upper_features(activations_to_input(a).to(device))
            )

    else:
        x_val = data.array[val_sorted]

        def batch(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
            xb = torch.from_numpy(data.array[idx])
            return to_input((augment(xb, gen) if config.augment else xb).to(device), prep)

        forward = model

        def val_logits() -> np.ndarray:
            return predict_logits(model, x_val, prep=prep, precision=precision, device=device)

    def train_mode() -> None:
        model.train()
        for g in frozen:
            g.eval()  # still-frozen BN keeps its pretrained statistics

    info = {
        "feature_views": views if store is not None else None,
        "unfreeze_stages": config.unfreeze_stages,
        "unfrozen_groups": len(upper),
        "backbone_lr_scale": config.backbone_lr_scale,
        "frozen_part": mode,
        "extraction": ext.to_dict() if ext else None,
        "activation_store": describe_store(store) if store is not None else None,
    }
    return Plan(
        model=model,
        param_groups=[
            {"params": [p for g in upper for p in g.parameters()], "lr": config.lr * config.backbone_lr_scale},
            {"params": list(model.head.parameters()), "lr": config.lr},
        ],
        batch=batch,
        forward=forward,
        train_mode=train_mode,
        val_logits=val_logits if len(val_sorted) else None,
        info=info,
        setup_s=time.perf_counter() - t0,
    )


PLANS: dict[str, Callable[..., Plan]] = {"scratch": scratch_plan, "frozen": frozen_plan, "finetune": finetune_plan}


@dataclass
class EarlyStopping:
    """Tracks the best validation score and the epochs since it improved."""

    patience: int  # epochs without improvement before stopping
    best_score: float = -math.inf
    best_epoch: int = -1  # zero-based; -1 before any epoch
    bad_epochs: int = 0

    def step(self, score: float, epoch: int) -> bool:
        """Record an epoch's score.

        Args:
            score: higher is better.
            epoch: zero-based epoch index.

        Returns:
            Whether the score improved on the best so far.
        """
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs passed without improvement."""
        return self.bad_epochs >= self.patience


def open_run(
    *, config: TrainConfig | None, run_dir: Path, resume: bool, epochs: int | None = None
) -> tuple[Run, TrainConfig, Split | None]:
    """The run folder to train into, its resolved config and the split to reuse (None: make one).

    Args:
        config: the config (ignored when resuming: the folder's own config is used).
        run_dir: the run folder.
        resume: continue the run in ``run_dir``.
        epochs: when resuming, train to this many epochs instead of the run's own count (more than it has done).

    Returns:
        (run, resolved config, split or None).

    Raises:
        RunError: resuming a folder without a run, a finished run without more epochs, or a fresh run into a
            folder that holds one.
        ConfigError: the config's model, strategy or weights do not go together, or an unusable split file.
    """
    run = Run(run_dir)
    if resume:
        if not run.config_path.exists():
            raise RunError(f"{run.path}: no config.yaml; nothing to resume", code="run_not_found")
        return run, _resumed_config(run, epochs), run.split()
    if run.started:
        raise FileExistsError(f"{run.path} already holds a run; pass --resume to continue it or pick another --out")
    if config is None:
        raise ConfigError("a new run needs a config")
    config = resolve_model_defaults(config)
    split = None
    if config.strategy == "finetune" and config.init_from:
        # The head was trained on the init run's patients: keep its split, or its training patients could
        # land in this run's test set.
        if config.split_file:
            raise ConfigError("a finetune run keeps the split of its --init-from run; leave out --split-file")
        split = Run.open(config.init_from).split()
    if config.split_file:
        split = _read_split_file(config)
    return run, config, split


def _read_split_file(config: TrainConfig) -> Split:
    """The split of ``config.split_file``, checked for patients crossing splits before anything is decoded."""
    if config.cv_folds is not None:
        raise ConfigError("--split-file fixes the split; leave out --cv-folds", code="split_file_conflict")
    try:
        return load_split(config.split_file)
    except FileNotFoundError:
        raise ConfigError(
            f"split file {config.split_file} not found (make one with `malaria-cells data split --out FILE`)",
            code="split_file_invalid",
        ) from None
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:  # a leaking split (LeakageError) says so itself
        raise ConfigError(
            f"split file {config.split_file}: not a split.csv of `malaria-cells data split` ({e!r})",
            code="split_file_invalid",
        ) from None


def _resumed_config(run: Run, epochs: int | None) -> TrainConfig:
    """The config a resumed run goes on with: its own, trained to ``epochs`` when given.

    Raises:
        RunError: ``epochs`` adds no epoch, the run is finished and no more epochs were asked for, or it stopped
            early (more epochs would stop again at once).
    """
    config = run.config()
    done = len(run.history())
    if run.finished:
        stopped = run.meta.stopped or "epochs"
        if epochs is None or epochs <= done:
            asked = f"--epochs {epochs} adds none" if epochs is not None else "nothing to resume"
            raise RunError(
                f"{run.path} already finished after {done} epoch(s) ({stopped}); {asked}: pass --epochs N with "
                f"N > {done} to train it on",
                code="run_already_finished",
            )
        if stopped.startswith(("early stop", "time budget")):
            raise RunError(
                f"{run.path} stopped by itself ({stopped}) after {done} epoch(s); more epochs would stop again "
                "after the next one: train a new run (e.g. with a larger --patience or --time-budget)",
                code="run_stopped_early",
            )
    elif epochs is not None and epochs <= done:
        raise RunError(
            f"{run.path} has trained {done} epoch(s) already; --epochs {epochs} adds none: pass N > {done}",
            code="run_already_trained",
        )
    return config if epochs is None else config.replace(epochs=epochs)


def make_optimizer(
    plan: Plan, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the plan's parameter groups with linear warm-up and cosine decay, stepped per batch.

    Args:
        plan: the strategy's plan (its parameter groups carry their peak lr).
        config: the resolved config.
        steps_per_epoch: optimizer steps in one epoch.

    Returns:
        (optimizer, scheduler).
    """
    optimizer = torch.optim.AdamW(plan.param_groups, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup_steps=warmup, total_steps=total_steps)
    )
    return optimizer, scheduler


def train_one_epoch(
    *,
    plan: Plan,
    data: Prepared,
    config: TrainConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    forward: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
    world: int,
) -> tuple[float, float]:
    """One pass over the training cells in seeded random order.

    Every rank draws the same permutation (same seed) and builds the same global batches, augmentation included, so
    the augmentation generator stays in step with a single process's; rank r trains on its contiguous share.

    Args:
        plan: the strategy's plan.
        data: the prepared data.
        config: the resolved config.
        epoch: zero-based epoch (seeds dropout, order and augmentation, so a resumed run draws the same).
        optimizer: the optimizer.
        scheduler: stepped once per batch.
        forward: the plan's forward, or DDP around the model with several ranks.
        device: where batches go.
        precision: "bf16" or "fp32".
        world: number of ranks.

    Returns:
        (mean loss over this epoch's batches, averaged over ranks; seconds of training).
    """
    steps = max(1, len(data.train_idx) // config.batch_size)
    per_rank = config.batch_size // world
    share = slice(distributed.rank() * per_rank, (distributed.rank() + 1) * per_rank)
    torch.manual_seed(config.seed * 1000 + epoch)  # dropout
    gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    # Not a DistributedSampler: its own shuffle and padding would give other batches than one process.
    order = np.random.default_rng(config.seed * 1000 + epoch).permutation(data.train_idx)
    plan.train_mode()
    t0 = time.perf_counter()
    losses: list[float] = []
    with progress.task(f"epoch {epoch + 1}", total=steps, transient=True) as step_task:
        for s in range(steps):
            idx = np.sort(order[s * config.batch_size : (s + 1) * config.batch_size])
            x = plan.batch(idx, gen)
            if world > 1:
                x, idx = x[share], idx[share]
            target = data.labels if data.targets is None else data.targets
            yb = torch.from_numpy(np.asarray(target[idx])).float().to(device)
            with autocast(precision, device):
                logits = forward(x)
            loss = _bce(logits, yb, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if s % 10 == 0 or s == steps - 1:
                step_task.update(completed=s + 1, status=f"loss {np.mean(losses[-50:]):.4f}")
    # Equal shares: the mean over ranks of each rank's mean loss is the global batches' mean loss.
    return distributed.all_reduce_mean(float(np.mean(losses))), time.perf_counter() - t0


def validate(plan: Plan, data: Prepared) -> tuple[dict[str, float], float]:
    """Score the validation patients' cells at threshold 0.5.

    Args:
        plan: the strategy's plan (its ``val_logits``).
        data: the prepared data.

    Returns:
        (row fields: val loss, ROC-AUC, accuracy, sensitivity, specificity; early-stopping score: AUC first, val
        loss breaking near-ties).
    """
    val_logits = plan.val_logits() if plan.val_logits is not None else None
    if val_logits is None:
        return {}, -math.inf
    yv = data.labels[np.sort(data.val_idx)]
    vm = M.binary_metrics(yv, sigmoid(val_logits), 0.5)
    row = {
        "val_loss": float(_bce(torch.from_numpy(val_logits), torch.from_numpy(yv).float(), 0.0)),
        "val_roc_auc": vm["roc_auc"],
        "val_accuracy": vm["accuracy"],
        "val_sensitivity": vm["sensitivity"],
        "val_specificity": vm["specificity"],
    }
    return row, vm["roc_auc"] - 1e-3 * row["val_loss"]


def train(
    *, config: TrainConfig | None, data_dir: Path, run_dir: Path, resume: bool = False, epochs: int | None = None
) -> Path:
    """Train a model and write a complete run folder.

    Args:
        config: the run's config (``None`` fields resolved from the model's defaults). Ignored when
            resuming: the run folder's own ``config.yaml`` is used.
        data_dir: folder or zip archive of cell images.
        run_dir: the run folder (created).
        resume: continue the run in ``run_dir`` from its last completed epoch.
        epochs: with ``resume``, train to this many epochs (more than done; a finished run goes on from its last
            epoch, the cosine schedule stretched to the new count). ``None``: the run's own count.

    Returns:
        ``run_dir``.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) every rank calls this with the same arguments; rank 0's
    ``run_dir`` is used and only rank 0 writes. See the module docstring for what equals a single-process run.

    Raises:
        WeightsUnavailable: pretrained weights cannot be had; nothing is written.
        ConfigError: an invalid config, or with several ranks a strategy other than scratch or a batch size not
            divisible by them.
        RunError: a broken run folder to resume (a state file that is not ours is refused, never executed).
    """
    run, config, split = open_run(config=config, run_dir=Path(run_dir), resume=resume, epochs=epochs)
    world = distributed.world_size()  # from torchrun's environment: checked before joining, so a refusal never hangs
    if world > 1 and config.strategy != "scratch":
        raise ConfigError(
            f"strategy {config.strategy} does not run on {world} processes (only scratch does); run it without "
            "torchrun: it trains on cached backbone features (seconds per epoch) in on-disk stores ranks would share"
        )
    if config.batch_size % world:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the number of processes ({world})")
    owns_group = distributed.setup()
    with contextlib.ExitStack() as stack:
        if not distributed.is_main():
            stack.enter_context(progress.reporting(progress.Reporter()))  # rank 0 reports for all
        run = Run(distributed.broadcast_from_main(str(run.path)))  # ranks may have stamped default names apart
        _fit(run=run, config=config, split=split, data_dir=Path(data_dir), resume=resume, world=world)
    distributed.barrier()  # the run folder is complete when any rank returns
    if owns_group:
        distributed.cleanup()
    return run.path


def _fit(*, run: Run, config: TrainConfig, split: Split | None, data_dir: Path, resume: bool, world: int) -> None:
    """The training loop of :func:`train`, after the run folder and the process group are settled."""
    # Without a thread count, the ranks on one machine share its cores instead of each taking all of them.
    set_threads(config.threads or max(1, progress.available_cores() // distributed.local_world_size()))
    device = distributed.device(default_device())
    precision = resolve_precision(config.precision, device)
    # Weights first: when they cannot be had the run stops before anything is decoded or written.
    model, prep, weights_info = load_initial_model(config)
    model = model.to(device).to(memory_format=torch.channels_last)
    model = distributed.prepare_replica(model)  # synced batch norm, global-batch dropout; a no-op in one process

    if not distributed.is_main():
        distributed.barrier()  # rank 0 decodes the image cache first; the others then load it instead of racing
    data = prepare_data(
        data_dir=data_dir,
        input_size=config.input_size,
        split=split,
        kind=config.split,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        max_images=config.max_images,
        cache_dir=config.cache_dir,
        cv_folds=config.cv_folds,
        cv_fold=config.cv_fold,
        split_seed=config.split_seed,
        exclude=load_exclusions(config.exclude_suspects),
    )
    if distributed.is_main():
        distributed.barrier()
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            run.save_config(config)
            save_split(data.split, data.images, run.split_path)
        elif config != run.config():  # --epochs on resume: the run now trains to the new count
            if run.finished:
                log.warning("%s: training on to %d epochs; evaluate it again afterwards", run.path, config.epochs)
            run.save_config(config)
            run.metadata_path.unlink(missing_ok=True)  # unfinished until finalize writes it again
        _log_split(data)

    if config.distill_from:
        data.targets = distillation_targets(data, config=config)
    plan = PLANS[config.strategy](model=model, data=data, config=config, prep=prep, device=device, precision=precision)
    steps_per_epoch = max(1, len(data.train_idx) // config.batch_size)
    optimizer, scheduler = make_optimizer(plan, config, steps_per_epoch)

    history: list[dict] = []
    stopper = EarlyStopping(patience=config.patience)
    start_epoch, elapsed_before = 0, plan.setup_s
    state = run.load_state() if resume else None
    if state is not None:
        model.load_state_dict(state.model or _load_weights(run.weights_path("last")))
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        history = state.history
        start_epoch = state.epoch + 1
        stopper = EarlyStopping(config.patience, state.best_score, state.best_epoch, state.bad_epochs)
        elapsed_before = state.elapsed_s + plan.setup_s
        log.info("resuming %s at epoch %d/%d", run.path, start_epoch + 1, config.epochs)
    stopped = "epochs"
    if start_epoch > 0 and (stopper.should_stop or start_epoch >= config.epochs):
        stopped = "already finished"

    t_start = time.perf_counter()
    # One process: the plan's forward. Several: DDP around the model (gradients averaged over ranks).
    forward = distributed.wrap(model, device=device) if world > 1 else plan.forward
    with progress.task("epochs", total=config.epochs, completed=start_epoch) as ep_task:
        for epoch in range(start_epoch, config.epochs):
            if stopped == "already finished":
                break
            train_loss, train_s = train_one_epoch(
                plan=plan,
                data=data,
                config=config,
                epoch=epoch,
                optimizer=optimizer,
                scheduler=scheduler,
                forward=forward,
                device=device,
                precision=precision,
                world=world,
            )
            if distributed.is_main():  # validation, checkpoints and the stopping decision; the others wait below
                row = {
                    "epoch": epoch + 1,
                    "lr": optimizer.param_groups[-1]["lr"],  # the head's (the only group outside finetune)
                    "train_loss": train_loss,
                    "train_images_per_s": steps_per_epoch * config.batch_size / train_s,
                    "epoch_s": train_s,
                }
                val_row, score = validate(plan, data)
                row.update(val_row)
                if not val_row:
                    score = -train_loss
                row["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                history.append(row)
                improved = stopper.step(score, epoch)
                _checkpoint(run, model, optimizer, scheduler, stopper, history, epoch, improved=improved)
                status = f"loss {row['train_loss']:.4f}"
                if "val_roc_auc" in row:
                    status += f"  val AUC {row['val_roc_auc']:.4f}  acc {row['val_accuracy']:.4f}"
                ep_task.update(completed=epoch + 1, status=status + ("  *" if improved else ""))
                log.debug("epoch %d: %s", epoch + 1, status)
                if stopper.should_stop:
                    stopped = f"early stop (no better val AUC for {config.patience} epochs)"
                elif config.time_budget_s and row["elapsed_s"] >= config.time_budget_s:
                    stopped = f"time budget {config.time_budget_s:.0f} s reached"
            stopped = distributed.broadcast_from_main(stopped)  # every rank stops after the same epoch
            if stopped != "epochs":
                break
    if distributed.is_main():
        log.info("training stopped: %s; best epoch %d", stopped, stopper.best_epoch + 1)
        finalize(
            run=run,
            config=config,
            data=data,
            prep=prep,
            precision=precision,
            history=history,
            best_epoch=stopper.best_epoch,
            stopped=stopped,
            plan=plan,
            weights_info=weights_info,
        )


def _checkpoint(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stopper: EarlyStopping,
    history: list[dict],
    epoch: int,
    *,
    improved: bool,
) -> None:
    """Write the epoch's weights, resume state and history (each file atomically, the history last)."""
    if improved:
        run.save_weights(model, "best")
    run.save_weights(model, "last")
    run.save_state(
        TrainState(
            epoch=epoch,
            best_score=stopper.best_score,
            best_epoch=stopper.best_epoch,
            bad_epochs=stopper.bad_epochs,
            elapsed_s=history[-1]["elapsed_s"],
            history=history,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
        )
    )
    # metrics.jsonl is rewritten from the checkpointed history, so it never runs ahead of the state.
    run.save_history(history)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise RunError(f"{path}: unreadable weights ({e})", code="run_weights_invalid") from None


def finalize(
    *,
    run: Run,
    config: TrainConfig,
    data: Prepared,
    prep: Preprocessing,
    precision: str,
    history: list[dict],
    best_epoch: int,
    stopped: str,
    plan: Plan,
    weights_info: dict,
) -> RunMeta:
    """Choose the decision threshold on validation with the best weights and write ``metadata.json``.

    Args:
        run: the run folder.
        config: the resolved config.
        data: the prepared data.
        prep: the model's preprocessing.
        precision: "bf16" or "fp32" (what training used).
        history: per-epoch rows.
        best_epoch: zero-based index of the best epoch.
        stopped: why training ended.
        plan: the strategy's plan (its model gets the best weights; its validation logits set the threshold).
        weights_info: where the starting weights came from.

    Returns:
        The metadata.
    """
    model = plan.model
    model.load_state_dict(_load_weights(run.weights_path("best")))
    val_sorted = np.sort(data.val_idx)
    threshold, val_metrics = 0.5, {}
    if plan.val_logits is not None and len(data.val_idx):
        pv = sigmoid(plan.val_logits())
        yv = data.labels[val_sorted]
        threshold = M.choose_threshold(yv, pv, method=config.threshold_method)
        val_metrics = M.binary_metrics(yv, pv, threshold)
    model.eval()
    n_params = count_parameters(model)
    ips = [r["train_images_per_s"] for r in history]
    meta = {
        "format": "malaria-cells-run/1",
        "model": config.model,
        "strategy": config.strategy,
        "weights": config.weights,
        "weights_info": weights_info,
        "init_from": config.init_from if config.strategy == "finetune" else None,
        "timm_arch": get_spec(config.model).timm_arch,
        "head_hidden": config.head_hidden,
        "preprocessing": prep.to_dict(),
        "class_names": list(CLASSES),
        "positive_class": CLASSES[POSITIVE],
        "positive_index": POSITIVE,
        "output": "one logit; sigmoid(logit) = P(Parasitized)",
        "threshold": float(threshold),
        "threshold_method": config.threshold_method,
        "split_kind": data.split.kind,
        "data_root": data.scan.root,
        "data_manifest_sha256": data.scan.manifest_hash,
        "split_counts": describe(data.split, data.images),
        "cv": {"folds": config.cv_folds, "fold": config.cv_fold} if config.cv_folds else None,
        # No test patients: the run's own figures cannot be measured; they come from cross-validation.
        "final_fit": not len(data.test_idx),
        "val_metrics_at_threshold": val_metrics,
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history),
        "stopped": stopped,
        "train_time_s": history[-1]["elapsed_s"] if history else 0.0,
        "setup_s": plan.setup_s,
        "train_images_per_s_median": float(np.median(ips)) if ips else None,
        "transfer": plan.info,
        "precision": precision,
        "world_size": distributed.world_size(),  # processes that trained together (torchrun)
        "parameters": n_params,
        "trainable_parameters": sum(p.numel() for g in plan.param_groups for p in g["params"]),
        "weights_mb": round(run.weights_path("best").stat().st_size / 1e6, 3),
        "packages": package_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return run.save_meta(meta)


def _log_split(data: Prepared) -> None:
    leaky = " - LEAKY, for the audit only" if data.split.kind != "patient" else ""
    for row in describe(data.split, data.images):
        log.info("split (%s%s): %s", data.split.kind, leaky, ", ".join(f"{k} {v}" for k, v in row.items()))
