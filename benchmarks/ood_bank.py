"""The out-of-distribution bank: how often each kind of input that is not an NIH-style cell gets a flag, and how
often real cells of validation patients get one by mistake. ``--fit`` first fits the limits of
``src/malaria_cells/ood.py`` on the training patients' cells (never on the bank or the validation patients).

Kinds in the bank: field photos (IML development photos), uniform and purple noise, purple blobs on white, natural
images (scikit-image's sample photos), rendered text, blank images (black, white, grey), grayscale copies of
validation cells, loose crops (a validation cell with a 50 % light margin), a cell filling a third of a black canvas,
and raw box crops from the other lab's photos (light background).

    python benchmarks/ood_bank.py --fit        # fit the limits on training patients, then evaluate
    python benchmarks/ood_bank.py              # evaluate the committed limits
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from harness import command_line, machine_info, save_result, spread
from loose_crops import loose
from PIL import Image, ImageDraw, ImageFont

from malaria_cells.boxes import load_annotations
from malaria_cells.data import scan
from malaria_cells.io import atomic_write_json
from malaria_cells.ood import REFERENCE, check, colour_distance, load_reference, signals
from malaria_cells.preprocess import load_image
from malaria_cells.split import make_split

RESULTS = Path(__file__).resolve().parent / "results"
BLACK_MARGIN = 10.0  # levels above the training cells' border brightness before "background not black"


def nih_split(share: Path) -> dict[str, list]:
    """The images of the default patient split (seed 0, 15 % validation, 15 % test), by part."""
    found = scan(share)
    split = make_split(found.images, kind="patient", val_fraction=0.15, test_fraction=0.15, seed=0)
    return {w: [found.images[i] for i in split.indices(found.images, w)] for w in ("train", "val", "test")}


def rgb_of(im, root: str) -> np.ndarray:
    return np.asarray(load_image(Path(root) / im.rel))


def fit(train: list, root: str, n: int) -> dict:
    """Limits from the training cells: 0.1st / 99.9th percentiles, widened."""
    sig = [signals(rgb_of(im, root)) for im in spread(train, n)]
    side = np.array([max(s.width, s.height) for s in sig])
    border = np.array([s.border for s in sig])
    fill = np.array([s.fill for s in sig])
    chroma = np.array([s.chroma for s in sig])
    colour = np.array([s.colour for s in sig])
    mean, cov = colour.mean(0), np.cov(colour.T)
    inv = np.linalg.inv(cov)
    dist = np.sqrt(np.einsum("ij,jk,ik->i", colour - mean, inv, colour - mean))
    blobs = Counter(s.blobs for s in sig)
    texture = np.array([s.texture for s in sig])
    return {
        "fitted_on": f"{len(sig)} cells of the training patients (default split, seed 0)",
        "max_side": float(np.percentile(side, 99.9) * 1.5),  # px: NIH cells are 46-394 px
        "max_border": float(max(BLACK_MARGIN, np.percentile(border, 99.9) + BLACK_MARGIN)),
        "min_fill": float(np.percentile(fill, 0.1) * 0.8),
        "max_fill": 1.01,  # a cell touching every edge still fills < 100 %: not used as a limit
        "min_chroma": float(np.percentile(chroma, 0.1) * 0.5),
        "colour_mean": mean.tolist(),
        "colour_inv_cov": inv.tolist(),
        "max_colour_distance": float(np.percentile(dist, 99.9) * 1.25),
        "max_texture": float(np.percentile(texture, 99.9) * 1.5),
        "train_blob_counts": {str(k): v for k, v in sorted(blobs.items())},
        "train_percentiles": {
            "fill_0.1": float(np.percentile(fill, 0.1)),
            "chroma_0.1": float(np.percentile(chroma, 0.1)),
            "colour_distance_99.9": float(np.percentile(dist, 99.9)),
            "border_99.9": float(np.percentile(border, 99.9)),
            "texture_99.9": float(np.percentile(texture, 99.9)),
        },
    }


def bank(val: list, root: str, iml: Path, n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """The out-of-distribution inputs, by kind."""
    out: dict[str, list[np.ndarray]] = {}
    photos = sorted((iml / "fields").glob("*.JPG"))
    out["field photos"] = [np.asarray(Image.open(p).convert("RGB")) for p in spread(photos, min(n, 20))]
    out["uniform noise"] = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(n)]
    purple = np.array([150, 60, 160])
    out["purple noise"] = [
        np.clip(purple + rng.normal(0, 40, (128, 128, 3)), 0, 255).astype(np.uint8) for _ in range(n)
    ]
    blobs = []
    for _ in range(n):
        img = Image.new("RGB", (128, 128), "white")
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x, y, r = rng.integers(10, 118), rng.integers(10, 118), rng.integers(8, 30)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(int(rng.integers(100, 180)), 40, int(rng.integers(120, 200))))
        blobs.append(np.asarray(img))
    out["purple blobs on white"] = blobs
    from skimage import data as skdata

    natural = []
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "cat",
        "retina",
        "immunohistochemistry",
        "hubble_deep_field",
    ):
        try:
            im = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a sample image missing from this scikit-image: skip it
            continue
        natural.append(im if im.ndim == 3 else np.stack([im] * 3, -1))
    out["natural images"] = natural
    # Harder: cell-shaped objects on black, so only the object's content can give them away.
    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 64) ** 2 + (xx - 64) ** 2 <= 50**2
    noise_disks, natural_disks = [], []
    for i in range(n):
        img = np.zeros((128, 128, 3), np.uint8)
        img[disk] = rng.integers(0, 256, (int(disk.sum()), 3), dtype=np.uint8)
        noise_disks.append(img)
        nat = natural[i % len(natural)] if natural else img
        y0, x0 = int(rng.integers(0, nat.shape[0] - 128)), int(rng.integers(0, nat.shape[1] - 128))
        img = np.zeros((128, 128, 3), np.uint8)
        img[disk] = nat[y0 : y0 + 128, x0 : x0 + 128][disk]
        natural_disks.append(img)
    out["noise disk on black"] = noise_disks
    out["natural-image disk on black"] = natural_disks
    texts = []
    font = ImageFont.load_default(size=18)
    for i in range(n):
        bg, fg = ("white", "black") if i % 2 else ("black", "white")
        img = Image.new("RGB", (160, 64), bg)
        ImageDraw.Draw(img).text((6, 20), f"sample {i}: no cell", fill=fg, font=font)
        texts.append(np.asarray(img))
    out["text"] = texts
    out["blank"] = [np.full((100, 100, 3), v, np.uint8) for v in (0, 255, 128, 30)]
    cells = [rgb_of(im, root) for im in spread(val, n)]
    out["grayscale cells"] = [np.repeat(c.mean(2, keepdims=True), 3, 2).astype(np.uint8) for c in cells]
    out["loose crops (50 % light margin)"] = [loose(c) for c in cells]
    small = []
    for c in cells:
        h, w = c.shape[:2]
        canvas = np.zeros((h * 3, w * 3, 3), np.uint8)  # the cell fills a third of the side: 1/9 of the area
        canvas[h : 2 * h, w : 2 * w] = c
        small.append(canvas)
    out["cell in a third of a black canvas"] = small
    boxes = load_annotations(iml / "annotations.json")
    raw = []
    for name in spread(sorted(boxes), 10):
        rgb = np.asarray(Image.open(iml / "fields" / name).convert("RGB"))
        for x, y, w, h in boxes[name].boxes[:: max(1, len(boxes[name].boxes) // 5)][:5]:
            x, y, w, h = (int(v) for v in (x, y, w, h))
            raw.append(rgb[y : y + h, x : x + w])
    out["other lab's box crops"] = raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/nih-cell-images"))
    ap.add_argument("--iml", type=Path, default=Path("../shared/iml-malaria"))
    ap.add_argument("--fit", action="store_true", help="fit the limits on the training patients first")
    ap.add_argument("--fit-cells", type=int, default=4000)
    ap.add_argument("--bank-size", type=int, default=50, help="inputs per generated kind")
    ap.add_argument("--out", type=Path, default=RESULTS / "ood_bank.json")
    args = ap.parse_args()
    machine = machine_info(("malaria-cells", "numpy", "scipy", "pillow"))
    parts = nih_split(args.data)
    root = str(scan(args.data).root)
    if args.fit:
        ref = fit(parts["train"], root, args.fit_cells)
        atomic_write_json(REFERENCE, ref)
        load_reference.cache_clear()
        print(f"fitted {REFERENCE} on {ref['fitted_on']}")
    ref = load_reference()
    val_reasons = Counter()
    dists = []
    for im in parts["val"]:
        s = signals(rgb_of(im, root))
        val_reasons[check(s, ref) or "ok"] += 1
        dists.append(colour_distance(s, ref))
    n_val = sum(val_reasons.values())
    results = {
        "nih_validation": {
            "cells": n_val,
            "flagged": n_val - val_reasons["ok"],
            "flag_rate": (n_val - val_reasons["ok"]) / n_val,
            "reasons": dict(val_reasons),
        }
    }
    print(f"NIH validation cells flagged: {n_val - val_reasons['ok']} of {n_val} "
          f"({100 * (n_val - val_reasons['ok']) / n_val:.2f} %) {dict(val_reasons)}")  # fmt: skip
    rng = np.random.default_rng(0)
    kinds = {}
    total = flagged = 0
    for kind, images in bank(parts["val"], root, args.iml, args.bank_size, rng).items():
        reasons = Counter(check(signals(x), ref) or "ok" for x in images)
        k_flag = len(images) - reasons["ok"]
        kinds[kind] = {"inputs": len(images), "flagged": k_flag, "flag_rate": k_flag / max(1, len(images)),
                       "reasons": dict(reasons)}  # fmt: skip
        total += len(images)
        flagged += k_flag
        print(f"{kind:36s} {k_flag:4d} / {len(images):4d} flagged  {dict(reasons)}")
    results["bank"] = kinds
    results["bank_total"] = {"inputs": total, "flagged": flagged, "flag_rate": flagged / total}
    print(f"{'all out-of-distribution inputs':36s} {flagged:4d} / {total:4d} flagged ({100 * flagged / total:.1f} %)")
    save_result(
        args.out,
        name="ood_bank",
        command=command_line(),
        params={"fit": args.fit, "bank_size": args.bank_size, "reference": ref.get("fitted_on")},
        results=results,
        machine=machine,
    )


if __name__ == "__main__":
    main()
