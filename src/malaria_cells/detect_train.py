"""Training the cell detector of :mod:`malaria_cells.detect` on field photos with boxes, and exporting it to ONNX.

The network is small on purpose (six 3 x 3 convolutions, ~40 k parameters): a field photo at 1/3 scale is 427 x 320
px and must be searched in a few milliseconds on two cores. Dilated convolutions give each output a receptive field
of ~60 px at that scale (three cells across), enough to see a cell's rim and its neighbours.

Augmentation is what lets a detector trained on one lab's photos work on another's: flips and transposes, scale
(x0.75-1.33: other microscopes and cameras), and strong stain changes (saturation x0.5-3, per-channel gain,
brightness and contrast), because the development photos are all pale and other slides are stained far more
strongly.

Photos are split by consecutive file names (neighbouring photos are fields of one slide): the last
``val_fraction`` of the sorted names validate (early stopping is not used; the threshold is chosen there).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from malaria_cells import progress
from malaria_cells.boxes import FieldBoxes, load_annotations, match, where_boxed
from malaria_cells.data import DataError
from malaria_cells.detect import DETECTOR_FORMAT, INPUT, OUTPUTS, DetectorMeta, decode
from malaria_cells.errors import ConfigError
from malaria_cells.io import atomic_write, atomic_write_json, atomic_write_text, jsonl_text

log = logging.getLogger(__name__)

SCALE = 1 / 3  # photo -> detector input; IML cells (~80 px) become ~27 px (1/4: recall 0.968 vs 0.973 held out)
STRIDE = 4  # output grid, px of the detector input


@dataclass(frozen=True)
class DetectorConfig:
    """How the detector is trained (defaults measured on the development photos; see docs/smear.md)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    crop: int = 160  # px of the detector input; training crops (the whole photo at inference)
    width: int = 32  # channels of the body
    val_fraction: float = 0.2  # last share of the sorted photo names, for validation and the threshold
    seed: int = 0
    threads: int | None = None
    threshold: float | None = None  # heatmap threshold; None: chosen on the validation photos (0.3 without any)
    scale: float = SCALE  # photo -> detector input

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr <= 1 or not 0 <= self.val_fraction < 0.9:
            raise ConfigError(f"invalid detector config: {self}")
        if self.crop % STRIDE or self.crop < 32:
            raise ConfigError(f"crop must be a multiple of {STRIDE} and at least 32, not {self.crop}")


def _cbr(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CenterNet(nn.Module):
    """Heatmap of cell centres (1 channel) and box (4: dx, dy, log w, log h) at stride 4."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _cbr(3, 24, 2),
            _cbr(24, width, 2),
            _cbr(width, width),
            _cbr(width, width, dilation=2),
            _cbr(width, width, dilation=4),
            _cbr(width, width, dilation=2),
        )
        self.heat = nn.Conv2d(width, 1, 1)
        self.box = nn.Conv2d(width, 4, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - 0.1) / 0.1))  # start at p = 0.1: stable focal loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> heat logits (N, H/4, W/4), box (N, 4, H/4, W/4)."""
        f = self.body(x)
        return self.heat(f)[:, 0], self.box(f)


class _UInt8Input(nn.Module):
    """uint8 NHWC in, the network's outputs out: what the ONNX file takes."""

    def __init__(self, net: CenterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image.permute(0, 3, 1, 2).float() / 255.0)


@dataclass
class Photo:
    """A training photo at half resolution (cropping and scaling start from it) with its boxes (full-res px)."""

    name: str
    half: np.ndarray  # uint8 (H/2, W/2, 3)
    boxes: np.ndarray  # (N, 4) full-res px
    shape: tuple[int, int]  # (H, W) full res


def load_photos(folder: Path, annotations: dict[str, FieldBoxes]) -> list[Photo]:
    """Read the annotated photos of a folder at half resolution (JPEG draft mode: fast).

    Raises:
        DataError: no annotated photo in the folder.
    """
    photos = []
    names = sorted(n for n in annotations if (folder / n).is_file())
    with progress.task(f"reading {len(names)} photos", total=len(names), transient=True) as t:
        for name in names:
            with Image.open(folder / name) as im:
                w, h = im.size
                im.draft("RGB", (w // 2, h // 2))
                half = np.asarray(im.convert("RGB").resize((w // 2, h // 2), Image.BILINEAR))
            photos.append(Photo(name, half, annotations[name].boxes, (h, w)))
            t.advance()
    if not photos:
        raise DataError(f"{folder}: none of the annotated photos are there")
    return photos


def split_photos(photos: list[Photo], val_fraction: float) -> tuple[list[Photo], list[Photo]]:
    """Train / validation by consecutive names: the last ``val_fraction`` of the sorted names validate."""
    photos = sorted(photos, key=lambda p: p.name)
    n_val = round(len(photos) * val_fraction)
    return (photos[: len(photos) - n_val], photos[len(photos) - n_val :]) if n_val else (photos, [])


def _targets(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian centre heatmap, box regression and its mask for boxes in px of a ``size`` x ``size`` crop."""
    g = size // STRIDE
    heat = np.zeros((g, g), np.float32)
    reg = np.zeros((4, g, g), np.float32)
    mask = np.zeros((g, g), np.float32)
    yy, xx = np.mgrid[0:g, 0:g]
    for x, y, w, h in boxes:
        cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
        if not (0 <= cx < g and 0 <= cy < g) or w < 1 or h < 1:
            continue
        sigma = max(w, h) / STRIDE / 6  # ~ a sixth of the cell: peaks stay apart for touching cells
        heat = np.maximum(heat, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma)))
        ix, iy = int(cx), int(cy)
        heat[iy, ix] = 1.0
        reg[:, iy, ix] = (cx - ix, cy - iy, math.log(w / STRIDE), math.log(h / STRIDE))
        mask[iy, ix] = 1.0
    return heat, reg, mask


def augment_stain(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong stain and exposure changes on a float (H, W, 3) image in 0-255.

    Saturation x0.5-3 spans pale to saturated magenta stains; per-channel gain x0.8-1.2 shifts hue; brightness
    +-30 and contrast x0.7-1.3 cover exposure.
    """
    gray = x.mean(2, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.5, 3.0)
    x = x * rng.uniform(0.8, 1.2, 3) + rng.uniform(-30, 30)
    return (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean()


def training_batch(
    photos: list[Photo], rng: np.random.Generator, *, batch_size: int, crop: int, scale: float = SCALE
) -> tuple[torch.Tensor, ...]:
    """A batch of augmented crops and their targets."""
    xs, targets = [], []
    for i in rng.integers(0, len(photos), batch_size):
        p = photos[i]
        s = scale * float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))  # photo -> crop scale
        src = crop / (2 * s)  # crop side in px of the half-res photo
        hh, ww = p.half.shape[:2]
        src = min(src, hh, ww)
        y0 = rng.uniform(0, hh - src)
        x0 = rng.uniform(0, ww - src)
        patch = Image.fromarray(p.half).resize(
            (crop, crop), Image.BILINEAR, box=(x0, y0, x0 + src, y0 + src), reducing_gap=None
        )
        k = crop / src / 2  # full-res px -> crop px
        b = p.boxes.astype(np.float32).copy()
        b[:, 0] = (b[:, 0] - 2 * x0) * k
        b[:, 1] = (b[:, 1] - 2 * y0) * k
        b[:, 2:] *= k
        a = np.asarray(patch, np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
            b[:, 0] = crop - b[:, 0] - b[:, 2]
        if rng.random() < 0.5:
            a = a[::-1]
            b[:, 1] = crop - b[:, 1] - b[:, 3]
        if rng.random() < 0.5:
            a = a.transpose(1, 0, 2)
            b = b[:, [1, 0, 3, 2]]
        xs.append(np.clip(augment_stain(a, rng), 0, 255) / 255.0)
        targets.append(_targets(b, crop))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().contiguous()
    heat, reg, mask = (torch.from_numpy(np.stack([t[j] for t in targets])) for j in range(3))
    return x, heat, reg, mask


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), per positive."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def detect_photo(net: CenterNet, photo: Photo, *, threshold: float, scale: float = SCALE) -> Any:
    """Run the torch network on one photo as the ONNX detector would (at ``scale``, from the half-res copy)."""
    meta = DetectorMeta(scale=scale, stride=STRIDE, threshold=threshold, cell_px=0)
    h, w = photo.shape
    th, tw = round(h * scale), round(w * scale)
    small = np.asarray(Image.fromarray(photo.half).resize((tw, th), Image.BILINEAR))
    small = np.pad(small, ((0, -th % STRIDE), (0, -tw % STRIDE), (0, 0)))
    with torch.no_grad():
        heat, box = net(torch.from_numpy(small / 255.0).permute(2, 0, 1)[None].float())
    return decode(heat[0].numpy(), box[0].numpy(), meta=meta, shape=photo.shape)


def detection_scores(
    net: CenterNet, photos: list[Photo], *, threshold: float, scale: float = SCALE
) -> dict[str, float]:
    """Recall and precision at IoU 0.5 and 0.3 over photos; precision also without boxes cut by the border (the
    annotators boxed cells cut by the border rarely)."""
    t = dict(truth=0, found=0, inner=0, m5=0, m3=0, inner_m5=0, boxed=0, boxed_m5=0)
    for p in photos:
        det = detect_photo(net, p, threshold=threshold, scale=scale)
        r5, _ = match(det.boxes, p.boxes, iou=0.5)
        r3, _ = match(det.boxes, p.boxes, iou=0.3)
        inner = ~det.on_border
        t["truth"] += len(p.boxes)
        t["found"] += len(det)
        t["inner"] += int(inner.sum())
        t["m5"] += len(r5)
        t["m3"] += len(r3)
        t["inner_m5"] += int(inner[r5].sum())
        # "Where cells are boxed" (as smear-eval counts it, less its "Other" rule, which needs the classifier): inner
        # detections overlapping some annotated box. One that overlaps none sits where the annotators boxed nothing
        # (mostly cells they skipped).
        boxed = inner & where_boxed(det.boxes, p.boxes)  # a match (IoU >= 0.5) always overlaps
        t["boxed"] += int(boxed.sum())
        t["boxed_m5"] += int(boxed[r5].sum())
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "recall_iou50": div(t["m5"], t["truth"]),
        "precision_iou50": div(t["m5"], t["found"]),
        "precision_iou50_inner": div(t["inner_m5"], t["inner"]),
        "precision_iou50_boxed": div(t["boxed_m5"], t["boxed"]),
        "recall_iou30": div(t["m3"], t["truth"]),
        "precision_iou30": div(t["m3"], t["found"]),
        "photos": len(photos),
        "cells": t["truth"],
    }


@dataclass
class DetectorResult:
    """What :func:`train_detector` wrote and measured."""

    out: Path
    onnx: Path
    threshold: float
    val_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def train_detector(
    *, photos_dir: Path, annotations: Path, out: Path, config: DetectorConfig | None = None
) -> DetectorResult:
    """Train the cell detector on annotated field photos and export ``detector.onnx`` into ``out``.

    Args:
        photos_dir: folder of the photos.
        annotations: their boxes (the IML share's JSON or COCO).
        out: output folder: ``detector.onnx``, ``detector.safetensors``, ``history.jsonl``, ``metrics.json``.
        config: training settings (defaults: :class:`DetectorConfig`).

    Returns:
        The result, with validation metrics at the chosen threshold.
    """
    from safetensors.torch import save_file

    from malaria_cells.models import set_threads

    config = config or DetectorConfig()
    set_threads(config.threads)
    torch.manual_seed(config.seed)
    photos = load_photos(Path(photos_dir), load_annotations(annotations))
    train_p, val_p = split_photos(photos, config.val_fraction)
    log.info("detector: %d training photos, %d validation photos", len(train_p), len(val_p))
    net = CenterNet(config.width)
    steps_per_epoch = max(1, 4 * len(train_p) // config.batch_size)  # ~4 crops of each photo per epoch
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs, pct_start=0.1
    )
    rng = np.random.default_rng(config.seed)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    with progress.task("detector epochs", total=config.epochs) as ep_task:
        for epoch in range(config.epochs):
            net.train()
            losses = []
            for _ in range(steps_per_epoch):
                x, heat, reg, mask = training_batch(
                    train_p, rng, batch_size=config.batch_size, crop=config.crop, scale=config.scale
                )
                ph, pb = net(x)
                box_loss = F.l1_loss(pb * mask[:, None], reg * mask[:, None], reduction="sum") / mask.sum().clamp(min=1)
                loss = focal_loss(ph, heat) + 0.5 * box_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            net.eval()
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "elapsed_s": time.perf_counter() - t0}
            if val_p and (epoch % 5 == 4 or epoch == config.epochs - 1):
                scores = detection_scores(net, val_p, threshold=0.3, scale=config.scale)
                row.update({f"val_{k}": v for k, v in scores.items()})
            history.append(row)
            status = f"loss {row['train_loss']:.3f}"
            if "val_recall_iou50" in row:
                status += f"  val recall {row['val_recall_iou50']:.3f}  precision {row['val_precision_iou50']:.3f}"
            ep_task.update(completed=epoch + 1, status=status)
    if config.threshold is not None:
        threshold = config.threshold
        val_metrics = detection_scores(net, val_p, threshold=threshold, scale=config.scale) if val_p else {}
    else:
        threshold, val_metrics = choose_threshold(net, val_p, scale=config.scale)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "detector.safetensors", lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(out / "history.jsonl", jsonl_text(history))
    cell_px = float(np.median(np.concatenate([p.boxes[:, 2:].ravel() for p in photos])))
    meta = DetectorMeta(
        scale=config.scale,
        stride=STRIDE,
        threshold=threshold,
        cell_px=cell_px,
        trained_on=f"{len(train_p)} photos of {Path(photos_dir).name} ({Path(annotations).name})",
        metrics=val_metrics,
    )
    onnx_path = export_detector(net, out / "detector.onnx", meta=meta)
    atomic_write_json(
        out / "metrics.json",
        {"config": config.__dict__, "threshold": threshold, "val": val_metrics, "train_photos": len(train_p)},
    )
    return DetectorResult(out, onnx_path, threshold, val_metrics, history)


def choose_threshold(net: CenterNet, val: list[Photo], *, scale: float = SCALE) -> tuple[float, dict[str, float]]:
    """The heatmap threshold with the best F1 at IoU 0.5 (precision without border boxes) on validation photos.

    Returns:
        (threshold, the validation metrics there); (0.3, {}) without validation photos.
    """
    if not val:
        return 0.3, {}
    best: tuple[float, float, dict[str, float]] = (-1.0, 0.3, {})
    for thr in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        m = detection_scores(net, val, threshold=thr, scale=scale)
        r, p = m["recall_iou50"], m["precision_iou50_inner"]
        f1 = 2 * r * p / (r + p) if r + p else 0.0
        if f1 > best[0]:
            best = (f1, thr, m)
    return best[1], best[2]


def export_detector(net: CenterNet, path: Path, *, meta: DetectorMeta) -> Path:
    """Write the detector as ONNX (uint8 NHWC input of any size, multiples of the stride) with its metadata.

    Returns:
        ``path``.
    """
    import onnx

    net = net.eval()
    wrapped = _UInt8Input(net).eval()
    example = torch.zeros((1, 240, 320, 3), dtype=torch.uint8)
    tmp_dir = Path(path).parent
    tmp = tmp_dir / f".{Path(path).name}.export"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={INPUT: {1: "height", 2: "width"}, OUTPUTS[0]: {1: "h", 2: "w"}, OUTPUTS[1]: {2: "h", 3: "w"}},
            opset_version=17,
            do_constant_folding=True,
        )
    model = onnx.load(str(tmp))
    tmp.unlink()
    props = {"format": DETECTOR_FORMAT, "detector": json.dumps(meta.to_dict())}
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.doc_string = (
        f"malaria-cells red blood cell detector: centre heatmap and box at stride 4 of a {meta.scale:.3g}-scale photo"
    )
    atomic_write(Path(path), lambda t: onnx.save(model, str(t)))
    return Path(path)
