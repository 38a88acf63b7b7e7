"""The README's smear overlay: a drawn field (no photo of anyone's slide), run through the real pipeline.

The development photos may not be committed (their licence is unknown), so the picture is of a synthetic field:
drawn red cells with a rim and central pallor, four with a ring-form-like dot, on a pale background, then blurred
and noised like a camera image. Everything after that is the shipped pipeline (detector, crops, classifier), so the
picture shows what it does, mistakes included.

    python benchmarks/smear_figure.py --out docs/images/smear-overlay.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from malaria_cells.overlay import draw_overlay
from malaria_cells.smear import analyze_smear


def drawn_field(seed: int = 3, size: tuple[int, int] = (1280, 960)) -> np.ndarray:
    """A drawn thin-smear field: uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    width, height = size
    img = np.empty((height, width, 3), np.float32)
    img[:] = (223, 229, 219)
    yy, xx = np.mgrid[0:height, 0:width]
    centres: list[tuple[float, float, float]] = []
    for y in np.arange(30, height, 86):
        for x in np.arange(30, width, 86):
            if rng.random() < 0.3:
                continue
            cx, cy, r = x + rng.uniform(-12, 12), y + rng.uniform(-12, 12), rng.uniform(34, 42)
            if all((cx - a) ** 2 + (cy - b) ** 2 > (r + q - 6) ** 2 for a, b, q in centres):
                centres.append((cx, cy, r))
    body, rim, pallor = np.array([176, 150, 172]), np.array([150, 120, 150]), np.array([200, 180, 198])
    for cx, cy, r in centres:
        y0, y1, x0, x1 = (
            int(max(0, cy - r - 2)),
            int(min(height, cy + r + 2)),
            int(max(0, cx - r - 2)),
            int(min(width, cx + r + 2)),
        )
        d = np.sqrt((xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2)
        t = np.clip(d / r, 0, 1)[..., None]
        colour = np.where(t < 0.45, pallor * (1 - t / 0.45) + body * (t / 0.45), np.where(t > 0.88, rim, body))
        cell = d <= r
        img[y0:y1, x0:x1][cell] = colour[cell]
    for k in rng.choice(len(centres), 4, replace=False):
        cx, cy, r = centres[k]
        px, py = cx + rng.uniform(-r / 2, r / 2), cy + rng.uniform(-r / 2, r / 2)
        d2 = (xx - px) ** 2 + (yy - py) ** 2
        img[d2 <= (r / 5) ** 2] = (95, 35, 125)
        img[(d2 <= (r / 3) ** 2) & (d2 >= (r / 4) ** 2)] = (140, 80, 160)
    img += rng.normal(0, 3, img.shape)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(pil)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/images/smear-overlay.jpg"))
    args = ap.parse_args()
    field = drawn_field()
    r = analyze_smear(field)
    title = (
        f"drawn field: {r.n_infected} called infected / {r.n_cells} counted cells "
        f"(red: Parasitized, green: Uninfected, grey: cut by the border, yellow: no usable mask)"
    )
    img = draw_overlay(field, r.cells, title=title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.resize((960, 720), Image.LANCZOS).save(args.out, quality=88)
    print(f"{r.n_cells} cells, {r.n_infected} called infected -> {args.out}")


if __name__ == "__main__":
    main()
