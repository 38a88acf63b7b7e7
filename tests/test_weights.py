"""Tests for malaria_cells.weights: real ImageNet predictions for lite0, strict local-file loading, offline failure."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data as skdata
from skimage.transform import resize

from malaria_cells.models import MODELS, default_preprocessing
from malaria_cells.weights import TIMM_ARCH, WeightsUnavailable, load_pretrained, weights_preprocessing

# A backbone tensor that exists in every resnetv2_50 (stem conv) and is randomly initialised.
RESNET_PROBE = "stem.conv.weight"
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0_imagenet() -> tuple[torch.nn.Module, dict]:
    """Build one 1000-class tf_efficientnet_lite0 with the package's ImageNet weights for the module."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    info = load_pretrained(model, name="efficientnet-lite0", source="imagenet")
    return model.eval(), info


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Save one random 1000-class resnetv2_50 as .safetensors and .pth (created once: it takes ~1 s)."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("resnetv2_50", num_classes=1000).state_dict().items()}
    root = tmp_path_factory.mktemp("resnet")
    save_file(state, str(root / "r50.safetensors"))
    torch.save(state, root / "r50.pth")
    torch.save({"state_dict": state}, root / "r50_wrapped.pth")
    return {"state": state, "root": root}


def _imagenet_top5(model: torch.nn.Module, image: np.ndarray) -> set[int]:
    """Resize an RGB uint8 image to 224 px, normalise as the weights expect, and return the top-5 class ids."""
    pre = weights_preprocessing("efficientnet-lite0")
    x = resize(image, (224, 224), order=3, anti_aliasing=True)  # float64 in [0, 1]
    x = (x - np.asarray(pre["mean"])) / np.asarray(pre["std"])
    batch = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).float()
    with torch.no_grad():
        return set(model(batch).topk(5, dim=1).indices[0].tolist())


def test_preprocessing_comes_from_pretrained_cfg() -> None:
    # Both default tags (tf_efficientnet_lite0.in1k, resnetv2_50.a1h_in1k) were trained on [-1, 1] inputs. The
    # registry is the one place the normalisation is written; it must agree with what timm says of the weights.
    assert TIMM_ARCH and set(TIMM_ARCH) == {n for n, s in MODELS.items() if s.timm_arch}
    for name, arch in TIMM_ARCH.items():
        cfg = timm.models.get_pretrained_cfg(arch).to_dict()
        spec = MODELS[name]
        assert spec.timm_arch == arch
        assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (spec.mean, spec.std)
        assert cfg["interpolation"] == "bicubic"  # as the module docstring says
        pre = weights_preprocessing(name)
        assert pre == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
        assert pre == {"mean": list(default_preprocessing(name).mean), "std": list(default_preprocessing(name).std)}
    with pytest.raises(ValueError, match="unknown model name"):
        weights_preprocessing("custom-cnn")  # no pretrained weights, so no such preprocessing


def test_lite0_imagenet_recognises_cat_and_coffee(lite0_imagenet: tuple[torch.nn.Module, dict]) -> None:
    model, info = lite0_imagenet
    assert info["source"] == "imagenet"
    assert info["tensors_loaded"] == 296 and info["head_loaded"] is True
    assert info["sha256"].startswith("57934424") and info["file"].endswith(".pth")
    assert _imagenet_top5(model, skdata.chelsea()) & CAT_CLASSES
    assert _imagenet_top5(model, skdata.coffee()) & COFFEE_CLASSES


def test_lite0_imagenet_one_logit_keeps_fresh_head(lite0_imagenet: tuple[torch.nn.Module, dict]) -> None:
    reference, _ = lite0_imagenet
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1)
    head_before = model.classifier.weight.detach().clone()
    info = load_pretrained(model, name="efficientnet-lite0", source="imagenet")
    assert info["head_loaded"] is False
    assert info["tensors_loaded"] == 294  # every backbone tensor: 147 parameters + 147 BatchNorm buffers
    assert torch.equal(model.classifier.weight, head_before)
    assert torch.equal(model.conv_head.weight, reference.conv_head.weight)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, reference.blocks[6][0].conv_pwl.weight)


@pytest.mark.parametrize("filename", ["r50.safetensors", "r50.pth", "r50_wrapped.pth"])
def test_resnet_local_file_loads_backbone(resnet_files: dict, filename: str) -> None:
    expected = resnet_files["state"][RESNET_PROBE]
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    assert not torch.equal(model.state_dict()[RESNET_PROBE], expected)
    path = resnet_files["root"] / filename
    info = load_pretrained(model, name="resnet50v2", source=str(path))
    assert torch.equal(model.state_dict()[RESNET_PROBE], expected)
    assert info["head_loaded"] is False
    assert info["tensors_loaded"] == len(resnet_files["state"]) - 2  # all but head.fc.weight / head.fc.bias
    assert info["file"] == str(path) and len(info["sha256"]) == 64


def test_resnet_local_file_same_head_is_loaded(resnet_files: dict) -> None:
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1000)
    info = load_pretrained(model, name="resnet50v2", source=str(resnet_files["root"] / "r50.safetensors"))
    assert info["head_loaded"] is True and info["tensors_loaded"] == len(resnet_files["state"])
    assert torch.equal(model.head.fc.weight, resnet_files["state"]["head.fc.weight"])


def test_resnet_wrong_shape_raises(resnet_files: dict, tmp_path) -> None:
    state = dict(resnet_files["state"])
    state[RESNET_PROBE] = torch.zeros(32, 3, 7, 7)  # real shape is (64, 3, 7, 7)
    path = tmp_path / "bad_shape.safetensors"
    save_file(state, str(path))
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    before = model.state_dict()[RESNET_PROBE].clone()
    with pytest.raises(WeightsUnavailable, match=RESNET_PROBE):
        load_pretrained(model, name="resnet50v2", source=str(path))
    assert torch.equal(model.state_dict()[RESNET_PROBE], before)  # nothing was half-loaded


def test_resnet_missing_key_raises(resnet_files: dict, tmp_path) -> None:
    state = {k: v for k, v in resnet_files["state"].items() if k != RESNET_PROBE}
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    with pytest.raises(WeightsUnavailable, match=f"missing: {RESNET_PROBE}"):
        load_pretrained(model, name="resnet50v2", source=str(path))


def test_resnet_unexpected_key_raises(resnet_files: dict, tmp_path) -> None:
    state = dict(resnet_files["state"])
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    with pytest.raises(WeightsUnavailable, match="unexpected: extra.weight"):
        load_pretrained(model, name="resnet50v2", source=str(path))


def test_missing_file_raises(tmp_path) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_pretrained(model, name="efficientnet-lite0", source=str(tmp_path / "nope.safetensors"))


def test_resnet_imagenet_offline_raises_quickly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, so a developer's cached copy cannot turn this into a successful load.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="--weights FILE") as excinfo:
        load_pretrained(model, name="resnet50v2", source="imagenet")
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "resnet50v2" in message and "resnetv2_50" in message and "--weights none" in message
    assert excinfo.value.__cause__ is not None


def test_resnet_imagenet_offline_uses_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path, resnet_files: dict) -> None:
    import huggingface_hub.constants

    # Lay out a Hugging Face cache entry by hand, as hf_hub_download would have left it after a download.
    commit = "0" * 40
    repo_dir = tmp_path / "models--timm--resnetv2_50.a1h_in1k"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes((resnet_files["root"] / "r50.safetensors").read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    info = load_pretrained(model, name="resnet50v2", source="imagenet")
    assert info["source"] == "imagenet" and info["file"] == str(snapshot / "model.safetensors")
    assert info["head_loaded"] is False
    assert torch.equal(model.state_dict()[RESNET_PROBE], resnet_files["state"][RESNET_PROBE])


def test_resnet_imagenet_unreachable_hub_raises_quickly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # Port 9 (discard) on localhost refuses at once: stands in for a machine without network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = timm.create_model("resnetv2_50", pretrained=False, num_classes=1)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="--weights FILE"):
        load_pretrained(model, name="resnet50v2", source="imagenet")
    assert time.monotonic() - start < 10


def test_wrong_arch_is_rejected() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1)
    with pytest.raises(ValueError, match="resnetv2_50"):
        load_pretrained(model, name="resnet50v2", source="imagenet")
