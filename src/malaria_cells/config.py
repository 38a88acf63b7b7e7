"""Training configuration: one validated model of defaults, overlaid by a YAML file, then by CLI flags.

:class:`TrainConfig` is the one home of every training default and of its help text: the ``train`` command's flags
are generated from its fields. Values are type-checked and coerced when the config is built (``lr: 3e-3`` in YAML
is a string to PyYAML and becomes a float here; ``epochs: two`` and ``batch_size: 32.5`` are errors), so a bad value
stops the run before any data is decoded or any file is written.

``None`` in a field means "the model's default" (the registry in :mod:`malaria_cells.models`, then
:data:`STRATEGY_DEFAULTS`); the resolved config, every ``None`` filled in, is what a run folder's ``config.yaml``
holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from malaria_cells.errors import ConfigError
from malaria_cells.io import atomic_write_text

# A frozen backbone leaves only the head to train, on cached features (seconds per epoch): it gets more
# epochs and a higher peak lr than the registry's defaults. Measured on validation patients of the --quick subset
# (Lite0, 2000 cells): lr 1e-3 x 10 epochs reached val AUC 0.956 and was still improving; 3e-3 x 40 reached 0.971
# (best epoch 13; early stopping ends such runs); 1e-2 and 3e-2 were no better. Fine-tuning (3 epochs from that
# head, backbone lr x0.1) reached val AUC 0.972 at lr 1e-3 and 0.980 at 3e-3.
STRATEGY_DEFAULTS: dict[str, dict[str, float | int]] = {"frozen": {"epochs": 40, "lr": 3e-3}, "finetune": {"lr": 3e-3}}

Strategy = Literal["scratch", "frozen", "finetune"]


class TrainConfig(BaseModel):
    """Everything that decides what a training run does (validated, immutable)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), validate_default=True)

    model: str = Field("custom-cnn", description="Registry name (see `malaria-cells models`).")
    strategy: Strategy | None = Field(None, description="scratch | frozen | finetune (default: the model's).")
    weights: str | None = Field(None, description="imagenet | FILE | none (default: the model's).")
    init_from: str | None = Field(
        None, description="Run folder whose best weights start this run (finetune starts from a frozen run's head)."
    )
    input_size: int | None = Field(None, ge=16, le=1024, description="Input side in px (default: the model's).")
    epochs: int | None = Field(None, ge=1, le=10_000, description="Maximum epochs (default: the model's).")
    batch_size: int = Field(64, ge=1, le=65_536, description="Images per optimizer step.")
    lr: float | None = Field(None, gt=0, le=10, description="Peak learning rate, AdamW (default: the model's).")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="finetune: backbone lr = lr x this.")
    unfreeze_stages: int = Field(
        2, ge=0, le=16, description="finetune: top backbone stages that train (frozen: whose input it caches)."
    )
    head_hidden: int | None = Field(
        None, ge=0, le=65_536, description="timm models: hidden units of the head, 0 = linear (default: the model's)."
    )
    feature_views: int = Field(
        2, ge=1, le=8, description="frozen/finetune: cached dihedral views per training cell (1 when augment is off)."
    )
    weight_decay: float = Field(0.05, ge=0, le=1, description="AdamW decoupled weight decay.")
    warmup_epochs: float = Field(1.0, ge=0, le=1000, description="Linear warm-up before the cosine decay, in epochs.")
    label_smoothing: float = Field(0.0, ge=0, le=0.2, description="Targets become y(1-s) + s/2.")
    patience: int = Field(5, ge=1, le=10_000, description="Early stopping: epochs without a better val AUC.")
    augment: bool = Field(True, description="Flips, 90-degree rotations, mild brightness/contrast/hue.")
    stain_jitter: float = Field(
        0.0, ge=0, le=2, description="scratch: strong stain augmentation (saturation, hue, brightness); 0 off, 1 full."
    )
    split: Literal["patient", "image-leaky"] = Field(
        "patient", description="patient (honest) | image-leaky (leakage audit only)."
    )
    split_file: str | None = Field(
        None,
        description="A split.csv from `malaria-cells data split` (or a run's): train on exactly its splits "
        "(split, fractions and cv fields then unused; max_images subsamples it).",
    )
    val_fraction: float = Field(0.15, ge=0, lt=0.5, description="Share of images for validation, by whole patients.")
    test_fraction: float = Field(
        0.15, ge=0, lt=0.5, description="Share of images for test, by whole patients (0: a final fit on every patient)."
    )
    cv_folds: int | None = Field(
        None,
        ge=2,
        le=20,
        description="Patient-level K-fold cross-validation: test = fold cv_fold (test_fraction unused).",
    )
    cv_fold: int = Field(0, ge=0, description="Which of the cv_folds folds is the test fold (0-based).")
    distill_from: str | None = Field(
        None,
        description="Knowledge distillation: teacher run folder(s), comma-separated, trained on the same training "
        "patients; their mean 8-view P(Parasitized) on each training cell enters its target.",
    )
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="Distillation: target = alpha * label + (1 - alpha) * teacher probability."
    )
    exclude_suspects: str | None = Field(
        None, description="suspects.csv of `data audit`: its cells are left out of training (never out of val/test)."
    )
    split_seed: int | None = Field(
        None, ge=0, description="Seed of the patient split or CV folds (default: seed), so seeds can share folds."
    )
    max_images: int | None = Field(None, ge=2, description="Class-balanced random subset size (quick runs).")
    seed: int = Field(0, ge=0, description="Seed for split, subset, initialisation and order.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto | bf16 | fp32 (auto: bf16 only where the CPU has it natively)."
    )
    threads: int | None = Field(None, ge=1, le=1024, description="Torch intra-op threads (default: available cores).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop training after this many seconds (checked after each epoch)."
    )
    threshold_method: Literal["youden", "accuracy"] = Field(
        "youden", description="How the decision threshold is chosen on the validation patients."
    )
    cache_dir: str | None = Field(
        None, description="Decoded-image cache (default: $MALARIA_CELLS_CACHE or ~/.cache/malaria-cells)."
    )

    @model_validator(mode="after")
    def _fractions(self) -> TrainConfig:
        if self.cv_folds is not None and self.cv_fold >= self.cv_folds:
            raise ValueError(f"cv_fold {self.cv_fold} must be below cv_folds {self.cv_folds}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves too few training "
                "patients (must be < 0.9)"
            )
        return self

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied, validated like the original.

        Raises:
            ConfigError: a changed value is invalid.
        """
        return _validated({**self.model_dump(), **changes}, source="config")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values (what ``config.yaml`` holds)."""
        return self.model_dump()


FIELDS = frozenset(TrainConfig.model_fields)


def _validated(values: dict[str, Any], *, source: str) -> TrainConfig:
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}",
            code="config_unknown_field",
        )
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            given = f" (got {err['input']!r})" if "input" in err and loc else ""
            problems.append(f"{loc}: {err['msg']}{given}" if loc else err["msg"].removeprefix("Value error, "))
        raise ConfigError(f"{source}: invalid config: {'; '.join(problems)}") from None


def resolve_config(*, yaml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a config from the defaults, a YAML file and explicit overrides (in that order), and validate it.

    Args:
        yaml_path: optional YAML mapping of field names (dashes or underscores) to values.
        overrides: field values that win over the file (CLI flags); ``None`` values are ignored so an unset
            flag never erases a YAML value.

    Returns:
        The frozen, validated config.

    Raises:
        ConfigError: unknown field, unreadable YAML, or a value of the wrong type or out of range.
    """
    values: dict[str, Any] = {}
    source = "flags"
    if yaml_path is not None:
        source = str(yaml_path)
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{yaml_path}: cannot read ({e.strerror or e})", code="config_unreadable") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path}: not valid YAML ({e})", code="config_unreadable") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _validated(values, source=source)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write a config as YAML, atomically.

    Args:
        config: the config to save.
        path: destination file.
    """
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    """Read a config saved by :func:`save_config`.

    Args:
        path: a run folder's ``config.yaml``.

    Returns:
        The config.

    Raises:
        ConfigError: unreadable or invalid.
    """
    return resolve_config(yaml_path=path)
