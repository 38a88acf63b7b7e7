"""Transfer learning on synthetic cells: frozen trains only the head, finetune moves only the unfrozen stages,
the feature cache holds what the backbone computes, and missing ImageNet weights stop training (never random)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_synthetic_dataset
from malaria_cells.augment import view, view_jitter
from malaria_cells.cache import build_or_load
from malaria_cells.cli import app
from malaria_cells.config import resolve_config
from malaria_cells.data import scan
from malaria_cells.errors import EXIT_UNAVAILABLE
from malaria_cells.models import build_model, to_input
from malaria_cells.preprocess import Preprocessing
from malaria_cells.run import Run
from malaria_cells.train import resolve_model_defaults, train
from malaria_cells.transfer import cut_index, stage_groups
from malaria_cells.weights import WeightsUnavailable, load_pretrained

LITE0 = "efficientnet-lite0"
HEAD_PARAMS = 1280 * 128 + 128 + 128 + 1  # Linear(1280, 128) + Linear(128, 1): the default head
FAST = dict(model=LITE0, input_size=32, batch_size=16, epochs=2, patience=100, threads=1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic cells and a feature cache shared by this module's runs (module scope: built once)."""
    root = tmp_path_factory.mktemp("transfer")
    make_synthetic_dataset(root / "cells")
    return root


def _config(workdir: Path, **kw):
    return resolve_config(overrides={**FAST, "cache_dir": str(workdir / "cache"), **kw})


@pytest.fixture(scope="module")
def frozen_run(workdir: Path) -> Path:
    """One frozen-backbone Lite0 run with Google's ImageNet weights."""
    return train(config=_config(workdir, strategy="frozen"), data_dir=workdir / "cells", run_dir=workdir / "frozen")


def _pretrained_lite0() -> torch.nn.Module:
    torch.manual_seed(0)  # what train() does before building, so the head starts identical
    model = build_model(LITE0)
    load_pretrained(model.backbone, name=LITE0, source="imagenet")
    return model


def _group_keys(model: torch.nn.Module) -> list[set[str]]:
    """State-dict keys of each stage group of the model's backbone (stem first)."""
    named = model.state_dict(keep_vars=True)
    out = []
    for g in stage_groups(model.backbone):
        tensors = {id(t) for t in g.state_dict(keep_vars=True).values()}
        out.append({k for k, t in named.items() if id(t) in tensors})
    return out


def test_frozen_trains_only_the_head(frozen_run: Path) -> None:
    start = _pretrained_lite0()
    best = load_file(str(frozen_run / "best.safetensors"))
    last = load_file(str(frozen_run / "last.safetensors"))
    backbone = {k: v for k, v in start.state_dict().items() if k.startswith("backbone.")}
    assert any("running_mean" in k for k in backbone) and any("running_var" in k for k in backbone)
    for weights in (best, last):
        for k, v in backbone.items():  # parameters and BN buffers (running stats, batch counters) alike
            assert torch.equal(weights[k], v), k
    assert not torch.equal(best["head.0.weight"], start.head[0].weight)

    meta = json.loads((frozen_run / "metadata.json").read_text())
    assert meta["strategy"] == "frozen" and meta["weights"] == "imagenet"
    assert meta["weights_info"]["sha256"].startswith("57934424")
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and meta["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    assert meta["head_hidden"] == 128
    assert meta["trainable_parameters"] == HEAD_PARAMS
    counts = {r["split"]: r["images"] for r in meta["split_counts"]}
    ext = meta["transfer"]["extraction"]
    assert ext["computed"] == 2 * counts["train"] + counts["val"] and ext["reused"] == 0  # 2 views of train


def test_feature_cache_holds_the_backbone_outputs_and_is_reused(workdir: Path, frozen_run: Path) -> None:
    meta = json.loads((frozen_run / "metadata.json").read_text())
    store = meta["transfer"]["pooled_store"]
    feats = np.memmap(store["file"], dtype=np.float16, mode="r", shape=tuple(store["shape"]))
    found = scan(workdir / "cells")
    images = found.images  # the run used every image, in this order
    cache = build_or_load(images=images, size=32, root=found.root, cache_dir=workdir / "cache")
    with open(frozen_run / "split.csv", newline="") as f:
        where = {r["rel"]: r["split"] for r in csv.DictReader(f)}
    idx = np.array([i for i, im in enumerate(images) if where[im.rel] == "train"][:4])
    model = _pretrained_lite0().eval()
    prep = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        for v in (0, 1):
            u8 = view(
                torch.from_numpy(np.asarray(cache.array[idx])), v, view_jitter(v, len(images))[idx] if v else None
            )
            expected = model.backbone(to_input(u8, prep)).numpy()
            stored = feats[v, idx].astype(np.float32)
            if meta["precision"] == "fp32":
                np.testing.assert_allclose(stored, expected, rtol=2e-2, atol=2e-2)
            else:
                # bf16 autocast (a CPU with native bf16) rounds each layer to 8 significant bits, and how much
                # depends on the batch the cell was in: compare directions. The synthetic cells look alike (cosine
                # ~0.97-0.98 between two cells), so each stored vector must match its own cell far closer than that.
                unit_s = stored / np.linalg.norm(stored, axis=1, keepdims=True)
                unit_e = expected / np.linalg.norm(expected, axis=1, keepdims=True)
                cosine = unit_s @ unit_e.T
                assert (np.diag(cosine) > 0.995).all(), np.diag(cosine)
                assert (cosine.argmax(axis=1) == np.arange(len(idx))).all()  # nearest: the cell itself
    assert not np.allclose(feats[0, idx], feats[1, idx])  # view 1 is another transform of the cell

    again = train(config=_config(workdir, strategy="frozen"), data_dir=workdir / "cells", run_dir=workdir / "frozen2")
    ext = json.loads((again / "metadata.json").read_text())["transfer"]["extraction"]
    assert ext["computed"] == 0 and ext["reused"] == meta["transfer"]["extraction"]["computed"]


@pytest.mark.parametrize(("unfreeze", "mode"), [(2, "cached"), (3, "online")])
def test_finetune_moves_only_the_unfrozen_stages(workdir: Path, frozen_run: Path, unfreeze: int, mode: str) -> None:
    run = train(
        config=_config(workdir, strategy="finetune", init_from=str(frozen_run), unfreeze_stages=unfreeze),
        data_dir=workdir / "cells",
        run_dir=workdir / f"finetune{unfreeze}",
    )
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["transfer"]["frozen_part"].startswith(mode)  # 2 stages: the frozen run cached their input
    assert (run / "split.csv").read_text() == (frozen_run / "split.csv").read_text()  # the head's patients
    start = load_file(str(frozen_run / "best.safetensors"))
    end = load_file(str(run / "last.safetensors"))
    model = build_model(LITE0)
    groups = _group_keys(model)
    cut = cut_index(model.backbone, unfreeze)
    for keys in groups[:cut]:
        for k in keys:
            assert torch.equal(start[k], end[k]), f"frozen {k} changed"
    for keys in groups[cut:]:
        params = [k for k in keys if k.endswith("weight")]
        assert any(not torch.equal(start[k], end[k]) for k in params), "an unfrozen stage did not train"
        stats = [k for k in keys if k.endswith("running_mean")]
        assert any(not torch.equal(start[k], end[k]) for k in stats), "unfrozen BN should update its statistics"
    assert not torch.equal(start["head.3.weight"], end["head.3.weight"])
    top = sum(p.numel() for g in stage_groups(model.backbone)[cut:] for p in g.parameters())
    assert meta["trainable_parameters"] == top + HEAD_PARAMS  # the top stages and the head, nothing else


def test_head_option_builds_linear_or_mlp_heads() -> None:
    assert isinstance(build_model(LITE0, head_hidden=0).head, torch.nn.Linear)
    mlp = build_model(LITE0).head  # the registry's default
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    assert sum(p.numel() for p in mlp.parameters()) == HEAD_PARAMS
    with pytest.raises(ValueError, match="fixed head"):
        build_model("custom-cnn", head_hidden=64)


def test_run_from_before_the_head_option_loads_with_a_linear_head(tmp_path: Path, frozen_run: Path) -> None:
    # Runs made before head_hidden existed have no such key in metadata.json and a Linear(1280, 1) head.
    old = tmp_path / "old-run"
    old.mkdir()
    meta = json.loads((frozen_run / "metadata.json").read_text())
    del meta["head_hidden"]
    (old / "metadata.json").write_text(json.dumps(meta))
    linear = build_model(LITE0, head_hidden=0)
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()}, str(old / "best.safetensors"))
    model = Run.open(old).load_model()
    assert isinstance(model.head, torch.nn.Linear)
    assert torch.equal(model.head.weight, linear.head.weight)


def test_finetune_keeps_its_init_runs_head(workdir: Path, frozen_run: Path) -> None:
    inherited = resolve_model_defaults(_config(workdir, strategy="finetune", init_from=str(frozen_run)))
    assert inherited.head_hidden == 128  # from the frozen run's metadata
    with pytest.raises(ValueError, match="pass --head-hidden 128"):
        train(
            config=_config(workdir, strategy="finetune", init_from=str(frozen_run), head_hidden=0),
            data_dir=workdir / "cells",
            run_dir=workdir / "finetune-wrong-head",
        )


def test_missing_imagenet_weights_stop_training(tmp_path: Path, synthetic_data: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    config = resolve_config(overrides={**FAST, "model": "resnet50v2", "strategy": "frozen"})
    with pytest.raises(WeightsUnavailable, match="--weights FILE"):
        train(config=config, data_dir=synthetic_data, run_dir=tmp_path / "r50")
    assert not (tmp_path / "r50").exists()  # stopped before writing anything, let alone training

    result = CliRunner().invoke(
        app, ["train", "--model", "resnet50v2", "--data", str(synthetic_data), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == EXIT_UNAVAILABLE  # the errors.py table: pretrained weights unavailable
    assert "could not be downloaded" in result.output and "--weights FILE" in result.output
    assert not (tmp_path / "cli").exists()


def test_pretrained_strategies_refuse_random_weights(tmp_path: Path, synthetic_data: Path) -> None:
    for strategy, weights in (("frozen", "none"), ("finetune", "none"), ("scratch", "imagenet")):
        config = resolve_config(overrides={**FAST, "strategy": strategy, "weights": weights})
        with pytest.raises(ValueError, match="random"):
            train(config=config, data_dir=synthetic_data, run_dir=tmp_path / strategy)
        assert not (tmp_path / strategy).exists()


def test_resnet50v2_frozen_from_a_local_file(tmp_path: Path, synthetic_data: Path) -> None:
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model("resnetv2_50", num_classes=1000).state_dict().items()}
    save_file(state, str(tmp_path / "r50.safetensors"))
    config = resolve_config(
        overrides={**FAST, "model": "resnet50v2", "strategy": "frozen", "weights": str(tmp_path / "r50.safetensors")}
    )
    run = train(config=config, data_dir=synthetic_data, run_dir=tmp_path / "run")
    best = load_file(str(run / "best.safetensors"))
    assert torch.equal(best["backbone.stages.3.blocks.2.conv3.weight"], state["stages.3.blocks.2.conv3.weight"])
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["weights_info"]["file"] == str(tmp_path / "r50.safetensors")
    assert meta["trainable_parameters"] == 2048 * 128 + 128 + 128 + 1  # the default head on 2048 features
