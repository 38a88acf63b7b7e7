"""Grad-CAM heatmaps for torch models: which part of the cell drove the prediction.

The heatmap explains the predicted label: for Parasitized it follows the gradient of the logit, for Uninfected
the gradient of minus the logit. The layer is the custom CNN's last convolution (taken after its batch norm
and ReLU), or a timm backbone's last feature stage (from timm's ``feature_info``). ONNX models have no
gradients here: pass a run folder, or use occlusion sensitivity (:mod:`malaria_cells.heatmaps`, any backend). The
:class:`Explanation` record and the drawing (:func:`colorize`, :func:`overlay`, :func:`overlay_png`) live there,
torch-free, and are re-exported here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from malaria_cells import heatmaps
from malaria_cells.heatmaps import Explanation, colorize, overlay, overlay_png
from malaria_cells.models import exact_fp32, to_input
from malaria_cells.predict import Classifier, ImageInput, Prediction

__all__ = [
    "Explanation",
    "colorize",
    "explain",
    "explain_files",
    "grad_cam",
    "overlay",
    "overlay_png",
    "target_layer",
]

_LOCK = threading.Lock()  # the hook lives on the shared model: one Grad-CAM at a time (the service has threads)


def target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM looks at: the custom CNN's last convolution (its block output, after batch norm and ReLU),
    a timm model's last feature stage.

    Args:
        model: a registry model.

    Returns:
        The module whose output is used.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None and getattr(backbone, "feature_info", None):
        return backbone.get_submodule(backbone.feature_info[-1]["module"])
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution for Grad-CAM")
    # The last convolution's block output (after batch norm and ReLU): Grad-CAM assumes non-negative feature
    # maps; the raw convolution output can be negative everywhere and then gives an empty map.
    after = [m for m in modules[convs[-1] + 1 :] if isinstance(m, nn.ReLU)]
    return after[0] if after else modules[convs[-1]]


def grad_cam(
    model: nn.Module, x: torch.Tensor, *, layer: nn.Module | None = None, sign: float | None = None
) -> tuple[np.ndarray, float]:
    """Grad-CAM of one normalised input.

    Args:
        model: the model (kept in eval mode; its parameters get no gradients).
        x: float (1, 3, S, S), normalised as the model expects.
        layer: default :func:`target_layer`.
        sign: +1 explains Parasitized (the logit), -1 Uninfected (minus the logit); default: the sign of the
            logit (the label at threshold 0.5; :func:`explain` uses the model's threshold).

    Returns:
        (heatmap float32 (S, S) in [0, 1], logit).
    """
    layer = layer or target_layer(model)
    saved: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:  # a prediction running in another thread passes through untouched
            saved["act"] = output

    model.eval()
    with _LOCK:
        handle = layer.register_forward_hook(hook)
        try:
            # exact_fp32: on CUDA the heatmap's logit is the one predictions give (no TF32); a no-op on the CPU
            with torch.enable_grad(), exact_fp32("fp32", x.device):
                x = x.detach().clone().requires_grad_(True)  # so the graph is built even with frozen weights
                logit = model(x)[0]
                s = sign if sign is not None else (1.0 if logit.item() >= 0 else -1.0)
                # autograd.grad, not backward(): no .grad accumulates on the shared model's parameters.
                (grad,) = torch.autograd.grad(s * logit, saved["act"])
        finally:
            handle.remove()
    act, grad = saved["act"].detach()[0], grad.detach()[0]  # (C, h, w)
    weights = grad.mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((weights * act).sum(0))[None, None]
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    top = cam.max()
    cam = cam / top if top > 0 else cam
    return cam.cpu().numpy().astype(np.float32), float(logit.item())


def explain(classifier: Classifier, image: ImageInput, *, name: str = "<image>") -> Explanation:
    """Predict one image and compute its Grad-CAM for the predicted label.

    Args:
        classifier: a classifier loaded from a run folder (torch).
        image: a path, encoded bytes, PIL image or uint8 array.
        name: the image's name in the prediction.

    Returns:
        The explanation.

    Raises:
        ImageError: unusable image.
        ModelError: the classifier is not a torch model.
    """
    model = classifier.torch_model
    u8 = classifier.prepare(image, name=name)
    device = next(model.parameters()).device  # CUDA when the run was loaded there
    x = to_input(torch.from_numpy(u8[None]).to(device), classifier.prep).contiguous()
    # The probability the classifier itself reports (its backend applies the stored temperature and TTA), so the
    # label explained is the label predicted, on the threshold's own scale.
    prob = float(classifier.predict_prepared(u8[None])[0])
    positive = prob >= classifier.threshold
    cam, _ = grad_cam(model, x, sign=1.0 if positive else -1.0)
    pred = Prediction(name, classifier.label_of(prob), prob, classifier.threshold)
    return Explanation(pred, u8, cam)


def explain_files(classifier: Classifier, paths: list[str], *, out_dir: Path) -> list[tuple[Prediction, Path | None]]:
    """Write one Grad-CAM figure per image into ``out_dir``; unreadable images get their error instead.

    Args:
        classifier: a torch classifier.
        paths: image files.
        out_dir: output folder (created); figures are named ``<stem>_gradcam.png``.

    Returns:
        (prediction, figure path or None) per image.
    """
    return heatmaps.explain_files(classifier, paths, out_dir=out_dir, explain=explain, method="Grad-CAM")
