"""Heatmaps over a cell without gradients, and the drawing shared with Grad-CAM.

Occlusion sensitivity works with any backend (the shipped ONNX model included): each square patch of the cell is
painted over with the cell's own median colour and the model is asked again; a patch whose removal takes the logit
away from the predicted label holds evidence for that label. Grad-CAM (:mod:`malaria_cells.explain`) needs a torch
model; this needs only :meth:`~malaria_cells.predict.Classifier.predict_prepared`, so it imports neither torch nor
timm. It is one model call on at most 1 + 11 x 11 images (at the shipped model's 48 px: 8 px patches every 4 px).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_cells.predict import Classifier, ImageInput, Prediction

# A pixel darker than this in every channel is letterbox background: painting it changes nothing, so patches of
# background alone are not sent to the model, and patches at the cell's edge are painted only where the cell is.
BACKGROUND_MAX = 10
PATCH_FRACTION = 1 / 6  # patch side / input side: 8 px at 48 px, a parasite's size in NIH cells
STEPS = 11  # patch positions per side, evenly spread from edge to edge: ~half a patch apart, 121 patches in all
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the logit (float32 saturates at 1.0)


@dataclass
class Explanation:
    """A prediction with the model input it was made on and its heatmap."""

    prediction: Prediction
    image: np.ndarray  # uint8 (S, S, 3): the letterboxed model input
    heatmap: np.ndarray  # float32 (S, S) in [0, 1]


def occlusion_map(
    classifier: Classifier, image_u8: np.ndarray, *, patch: int | None = None, steps: int = STEPS
) -> tuple[np.ndarray, float]:
    """Occlusion sensitivity of one letterboxed model input, for its predicted label.

    Each patch is painted with the median colour of the cell's pixels (not black: a dark blot inside a cell looks
    like stained parasite); its score is how far the logit moves away from the predicted label (down for
    Parasitized, up for Uninfected), never negative. A pixel's heat is the mean score of the patches covering it,
    scaled so the hottest pixel is 1 (all zeros when no patch matters).

    Args:
        classifier: any classifier (ONNX or torch).
        image_u8: uint8 (S, S, 3), already letterboxed to the model's input size.
        patch: patch side in px; default input size x :data:`PATCH_FRACTION`.
        steps: patch positions per side, from one edge to the other.

    Returns:
        (heatmap float32 (S, S) in [0, 1], P(Parasitized) of the unoccluded input).
    """
    size = image_u8.shape[0]
    patch = min(size, patch or max(2, round(size * PATCH_FRACTION)))
    starts = np.unique(np.linspace(0, size - patch, max(1, steps)).round().astype(int)).tolist()
    cell = image_u8.max(axis=-1) > BACKGROUND_MAX
    fill = np.median(image_u8[cell], axis=0).astype(np.uint8) if cell.any() else np.zeros(3, np.uint8)
    windows = [(y, x) for y, x in product(starts, repeat=2) if cell[y : y + patch, x : x + patch].any()]
    batch = np.repeat(image_u8[None], 1 + len(windows), axis=0)
    for k, (y, x) in enumerate(windows, start=1):
        batch[k, y : y + patch, x : x + patch][cell[y : y + patch, x : x + patch]] = fill
    probs = classifier.predict_prepared(batch).astype(np.float64)
    logits = np.log(np.clip(probs, _EPS, 1 - _EPS)) - np.log1p(-np.clip(probs, _EPS, 1 - _EPS))
    sign = 1.0 if probs[0] >= classifier.threshold else -1.0
    scores = np.maximum(sign * (logits[0] - logits[1:]), 0.0)
    heat = np.zeros((size, size))
    covered = np.zeros((size, size))
    for (y, x), s in zip(windows, scores, strict=True):
        heat[y : y + patch, x : x + patch] += s
        covered[y : y + patch, x : x + patch] += 1
    heat = np.divide(heat, covered, out=np.zeros_like(heat), where=covered > 0)
    top = heat.max()
    if top > 0:
        heat /= top
    return heat.astype(np.float32), float(probs[0])


def occlusion(classifier: Classifier, image: ImageInput, *, name: str = "<image>") -> Explanation:
    """Predict one image and compute its occlusion heatmap for the predicted label.

    Args:
        classifier: any classifier (ONNX or torch).
        image: a path, encoded bytes, PIL image or uint8 array.
        name: the image's name in the prediction.

    Returns:
        The explanation.

    Raises:
        ImageError: unusable image.
    """
    u8 = classifier.prepare(image, name=name)
    heat, prob = occlusion_map(classifier, u8)
    return Explanation(Prediction(name, classifier.label_of(prob), prob, classifier.threshold), u8, heat)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a blue-cyan-yellow-red ramp (a jet-like map without matplotlib).

    Args:
        heatmap: float (H, W) in [0, 1].

    Returns:
        uint8 (H, W, 3).
    """
    h = np.clip(heatmap, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, scale: int = 1) -> np.ndarray:
    """Blend a colourised heatmap over the image.

    Args:
        image: uint8 (H, W, 3).
        heatmap: float (H, W) in [0, 1].
        alpha: heatmap opacity (0-1).
        scale: integer upscaling of the result (bilinear), for display.

    Returns:
        uint8 (H * scale, W * scale, 3).
    """
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(heatmap).astype(np.float32)
    out = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    if scale > 1:
        out = np.asarray(Image.fromarray(out).resize((out.shape[1] * scale, out.shape[0] * scale), Image.BILINEAR))
    return out


def heatmap_png(image: np.ndarray, heatmap: np.ndarray, *, scale: int = 3) -> bytes:
    """A heatmap blended over its image, as PNG bytes (what the web service returns).

    Args:
        image: uint8 (H, W, 3).
        heatmap: float (H, W) in [0, 1].
        scale: integer upscaling.

    Returns:
        PNG bytes.
    """
    buf = io.BytesIO()
    Image.fromarray(overlay(image, heatmap, scale=scale)).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(expl: Explanation, *, scale: int = 3) -> bytes:
    """An explanation's heatmap overlay as PNG bytes.

    Args:
        expl: an explanation.
        scale: integer upscaling.

    Returns:
        PNG bytes.
    """
    return heatmap_png(expl.image, expl.heatmap, scale=scale)


def figure_png(expl: Explanation, *, method: str, scale: int = 4) -> bytes:
    """The input and its heatmap overlay side by side, label and probability above: a PNG made with Pillow only.

    Args:
        expl: an explanation.
        method: the heatmap's name in the caption ("occlusion", "Grad-CAM").
        scale: integer upscaling of the (small) model input.

    Returns:
        PNG bytes.
    """
    from PIL import ImageDraw

    p = expl.prediction
    left = Image.fromarray(expl.image).resize((expl.image.shape[1] * scale, expl.image.shape[0] * scale), Image.NEAREST)
    right = Image.fromarray(overlay(expl.image, expl.heatmap, scale=scale))
    head = 44
    fig = Image.new("RGB", (left.width + right.width + 12, left.height + head), "white")
    fig.paste(left, (0, head))
    fig.paste(right, (left.width + 12, head))
    draw = ImageDraw.Draw(fig)
    draw.text((4, 4), f"{p.label}: P(Parasitized) = {p.probability:.3f} (threshold {p.threshold:.3f})", fill="black")
    draw.text((4, 22), f"input | {method} (evidence for the label)", fill="black")
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    return buf.getvalue()


def explain_files(
    classifier: Classifier,
    paths: list[str],
    *,
    out_dir: Path,
    explain: Callable[..., Explanation] | None = None,
    method: str = "occlusion",
) -> list[tuple[Prediction, Path | None]]:
    """Write one heatmap figure per image into ``out_dir``; unreadable images get their error instead.

    Args:
        classifier: any classifier (ONNX or torch).
        paths: image files.
        out_dir: output folder (created); figures are named ``<stem>_<method>.png``.
        explain: the heatmap (default :func:`occlusion`; :func:`malaria_cells.explain.explain` for Grad-CAM).
        method: its name, in file names and captions.

    Returns:
        (prediction, figure path or None) per image.
    """
    from malaria_cells.io import atomic_write
    from malaria_cells.preprocess import ImageError

    explain = explain or occlusion
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = method.lower().replace("-", "")
    results: list[tuple[Prediction, Path | None]] = []
    used: set[str] = set()
    for path in paths:
        try:
            expl = explain(classifier, path, name=str(path))
        except ImageError as e:
            results.append((Prediction(str(path), None, None, classifier.threshold, error=str(e)), None))
            continue
        stem = Path(path).stem
        name, k = f"{stem}_{suffix}.png", 1
        while name in used:  # same file name in two folders
            k += 1
            name = f"{stem}_{k}_{suffix}.png"
        used.add(name)
        png = figure_png(expl, method=method)
        results.append((expl.prediction, atomic_write(out_dir / name, lambda tmp, b=png: tmp.write_bytes(b))))
    return results
