"""Training configuration: one frozen dataclass of defaults, overlaid by a YAML file, then by CLI flags.

``None`` in a field means "the model's default" (see :mod:`malaria_cells.models`); the resolved config, with
every ``None`` filled in, is what a run folder's ``config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from malaria_cells.io import atomic_write_text


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run does."""

    model: str = "custom-cnn"
    strategy: str | None = None  # scratch | frozen | finetune; None = the model's default
    weights: str | None = None  # "imagenet", a file path, or "none"; None = the model's default
    init_from: str | None = None  # run folder whose best weights start this run (finetune starts from frozen's head)
    input_size: int | None = None  # px, square; None = the model's default
    epochs: int | None = None  # None = the model's default for the strategy
    batch_size: int = 64  # images per optimizer step
    lr: float | None = None  # peak learning rate (AdamW); None = the model's default
    backbone_lr_scale: float = 0.1  # finetune: backbone lr = lr * this (0-1]
    unfreeze_stages: int = 2  # finetune: top backbone stages that train (frozen: whose input it caches for one)
    head_hidden: int | None = None  # timm models: hidden units of the head (0 = linear); None = the model's default
    feature_views: int = 2  # frozen/finetune: cached dihedral views per training cell (1-8; 1 when augment is off)
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_epochs: float = 1.0  # linear warm-up before the cosine decay, in epochs
    label_smoothing: float = 0.0  # 0-0.2; targets become y*(1-s) + s/2
    patience: int = 5  # early stopping: epochs without a better validation AUC before stopping
    augment: bool = True  # flips, 90-degree rotations, mild brightness/contrast/hue
    split: str = "patient"  # "patient" (honest) or "image-leaky" (leakage audit only)
    val_fraction: float = 0.15  # of patients (0-0.5)
    test_fraction: float = 0.15  # of patients (0-0.5)
    max_images: int | None = None  # class-balanced random subset of the data (quick runs); None = all
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the CPU has it) | bf16 | fp32
    threads: int | None = None  # torch intra-op threads; None = all cores
    time_budget_s: float | None = None  # stop training after this many seconds (checked each epoch)
    threshold_method: str = "youden"  # how the decision threshold is chosen on validation: youden | accuracy
    cache_dir: str | None = None  # decoded-image cache; None = $MALARIA_CELLS_CACHE or ~/.cache/malaria-cells


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def resolve_config(*, yaml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a config from the defaults, a YAML file and explicit overrides (in that order).

    Args:
        yaml_path: optional YAML mapping of field names to values.
        overrides: field values that win over the file (CLI flags); ``None`` values are ignored so an unset
            flag never erases a YAML value.

    Returns:
        The frozen config.

    Raises:
        ValueError: on an unknown field name.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write a config as YAML, atomically.

    Args:
        config: the config to save.
        path: destination file.
    """
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    """Read a config saved by :func:`save_config`.

    Args:
        path: a run folder's ``config.yaml``.

    Returns:
        The config.
    """
    return resolve_config(yaml_path=path)
