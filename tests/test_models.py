"""Every model of the registry, as timm's own tests run over every architecture: it builds without any weights
download, gives one logit per image, has the parameters its parts add up to, and follows the head-width rules.

The tests are parametrised over :data:`malaria_cells.models.MODELS`, so a model added to the registry is tested
without touching this file.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from malaria_cells import models as Mo
from malaria_cells.models import (
    HEAD_HIDDEN,
    MODELS,
    ModelSpec,
    TimmBinary,
    build_model,
    count_parameters,
    default_preprocessing,
    exact_fp32,
    get_spec,
    head_width,
    predict_logits,
    set_threads,
    sigmoid,
)
from malaria_cells.preprocess import Preprocessing

NAMES = sorted(MODELS)
TIMM_NAMES = [n for n in NAMES if MODELS[n].timm_arch]
FIXED_HEAD_NAMES = [n for n in NAMES if MODELS[n].head_hidden is None]
TINY = 32  # px: every registry model downsamples to at least 1x1 at this size
STRATEGIES = {"scratch", "frozen", "finetune"}

_built: dict[tuple[str, int | None], nn.Module] = {}


def _model(name: str, head_hidden: int | None = None) -> nn.Module:
    """Build once per (model, head) for this module: the ResNet takes about a second."""
    key = (name, head_hidden)
    if key not in _built:
        torch.manual_seed(0)
        _built[key] = build_model(name, head_hidden=head_hidden).eval()
    return _built[key]


def _head_parameters(features: int, hidden: int) -> int:
    return features + 1 if hidden == 0 else features * hidden + hidden + hidden + 1


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_consistent(name: str) -> None:
    spec = get_spec(name)
    assert spec.strategy in spec.strategies and set(spec.strategies) <= STRATEGIES
    assert spec.weights in ("none", "imagenet")
    assert (spec.weights == "none") == (spec.strategy == "scratch")  # pretrained strategies need weights
    assert spec.input_size >= 8 and spec.lr > 0 and spec.epochs >= 1 and spec.description
    assert len(spec.mean) == len(spec.std) == 3 and all(s > 0 for s in spec.std)
    assert (spec.timm_arch is None) != (spec.build is None)  # named by exactly one of them
    if spec.timm_arch is not None:
        assert spec.head_hidden is not None and spec.head_hidden >= 0  # timm models have the head option
    prep = default_preprocessing(name)
    assert prep == Preprocessing(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    assert default_preprocessing(name, 48).input_size == 48


@pytest.mark.parametrize("name", NAMES)
def test_builds_without_weights_and_gives_one_logit_per_image(name: str) -> None:
    model = _model(name)
    x = torch.rand(3, 3, TINY, TINY)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the images differ, so the logits do (a model that ignored its input would pass a shape test alone)
    assert len(set(out.tolist())) == 3
    assert model.forward_features(x).shape == (3, model.num_features)
    if MODELS[name].timm_arch:
        assert isinstance(model, TimmBinary)
        assert model.backbone.pretrained_cfg["architecture"] == MODELS[name].timm_arch


@pytest.mark.parametrize("name", NAMES)
def test_predict_logits_matches_the_forward_pass(name: str) -> None:
    model = _model(name)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, TINY, TINY, 3), dtype=np.uint8)
    prep = default_preprocessing(name, TINY)
    logits = predict_logits(model, images, prep=prep, batch_size=2, precision="fp32")
    assert logits.shape == (5,) and logits.dtype == np.float32
    with torch.no_grad():
        expected = model(Mo.to_input(torch.from_numpy(images), prep)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    p = sigmoid(logits)
    assert ((p > 0) & (p < 1)).all() and np.array_equal(p > 0.5, logits > 0)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_adds_up(name: str) -> None:
    model = _model(name)
    n = count_parameters(model)
    assert n == sum(p.numel() for _, p in model.named_parameters()) > 0
    if MODELS[name].timm_arch:
        hidden = head_width(name, None)
        assert hidden == MODELS[name].head_hidden
        assert n == count_parameters(model.backbone) + _head_parameters(model.num_features, hidden)
    else:  # the description states the size: "~0.59 M params"
        claimed = re.search(r"~([\d.]+) M params", MODELS[name].description)
        assert claimed, MODELS[name].description
        assert round(n / 1e6, 2) == float(claimed.group(1))


@pytest.mark.parametrize("name", TIMM_NAMES)
@pytest.mark.parametrize("hidden", [0, 16])
def test_head_width_rules_timm(name: str, hidden: int) -> None:
    assert head_width(name, None) == MODELS[name].head_hidden  # None: the registry's default
    assert head_width(name, hidden) == hidden
    model = _model(name, hidden)
    if hidden == 0:
        assert isinstance(model.head, nn.Linear) and model.head.in_features == model.num_features
    else:
        assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert model.head[0].out_features == hidden
    assert count_parameters(model.head) == _head_parameters(model.num_features, hidden)
    with torch.no_grad():
        assert model(torch.rand(2, 3, TINY, TINY)).shape == (2,)


@pytest.mark.parametrize("name", FIXED_HEAD_NAMES)
def test_head_width_rules_fixed_head(name: str) -> None:
    assert head_width(name, None) is None
    assert head_width(name, 0) is None  # 0 = "linear" = what a fixed head is anyway
    with pytest.raises(ValueError, match="fixed head"):
        head_width(name, 64)
    with pytest.raises(ValueError, match="fixed head"):
        build_model(name, head_hidden=64)


def test_default_timm_head_is_the_documented_one() -> None:
    assert all(MODELS[n].head_hidden == HEAD_HIDDEN for n in TIMM_NAMES)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="custom-cnn"):
        build_model("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        default_preprocessing("no-such-model")


def test_a_spec_names_an_architecture_or_a_builder_exactly_once() -> None:
    common = dict(input_size=32, mean=(0.0,) * 3, std=(1.0,) * 3, strategy="scratch", weights="none", lr=1e-3, epochs=1)
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(description="neither", **common)
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(description="both", timm_arch="resnetv2_50", build=Mo.CustomCNN, **common)
    timm_spec = ModelSpec(description="timm", timm_arch="tf_efficientnet_lite0", head_hidden=0, **common)
    assert timm_spec.builder().args == ("tf_efficientnet_lite0",)  # the architecture is written once, here


def test_set_threads_defaults_to_the_available_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(Mo, "available_cores", lambda: 1)
    try:
        set_threads(None)
        assert torch.get_num_threads() == 1
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_models_have_a_stage_layout(name: str) -> None:
    from malaria_cells.transfer import cut_index, run_groups, stage_groups

    backbone = _model(name).backbone
    groups = stage_groups(backbone)  # raises for an architecture without a LAYOUT entry
    x = torch.rand(2, 3, TINY, TINY)
    with torch.no_grad():
        np.testing.assert_allclose(backbone.forward_head(run_groups(groups, x)), backbone(x), rtol=1e-5, atol=1e-5)
    assert cut_index(backbone, 0) == len(groups) and cut_index(backbone, len(groups)) == 0
    with pytest.raises(ValueError):
        cut_index(backbone, len(groups) + 1)


def test_fp32_on_cuda_turns_tf32_off_for_the_forward_only() -> None:
    # TF32 convolutions moved P(Parasitized) by up to 2.5e-3 against the ONNX export on an H200. The flag can be set
    # without a GPU, so the switch itself is checked here; benchmarks/gpu_check.sh checks the parity on one.
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    cudnn.allow_tf32 = True
    try:
        with exact_fp32("fp32", torch.device("cuda")):
            assert cudnn.allow_tf32 is False
        assert cudnn.allow_tf32 is True
        for precision, device in (("bf16", "cuda"), ("fp32", "cpu")):
            with exact_fp32(precision, torch.device(device)):
                assert cudnn.allow_tf32 is True
    finally:
        cudnn.allow_tf32 = before
