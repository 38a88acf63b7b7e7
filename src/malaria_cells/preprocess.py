"""Image decoding and model-input preprocessing, in NumPy, Pillow and imagecodecs only.

This module is shared by training (the decoded-image cache), evaluation, prediction, export and the web
service, and it deliberately imports neither torch nor timm so the ONNX prediction path stays light.
A model's preprocessing is a :class:`Preprocessing` stored in its run's ``metadata.json``.

WebP (the share's format) decodes with imagecodecs' libwebp binding when it is installed: the same pixels as
Pillow for lossless files (tests/test_preprocess.py compares them on the share), 1.3-1.4x Pillow's speed on one
core (``python benchmarks/decode_speed.py``), and it releases the GIL while it decodes, which Pillow's WebP decoder
does not. Anything else, and any file imagecodecs refuses, goes through Pillow, whose error messages say what is
wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from malaria_cells.errors import EXIT_SOME_INPUTS_FAILED, MalariaCellsError
from malaria_cells.io import read_bytes

try:
    import imagecodecs
except ImportError:  # optional at import time; a dependency of the package
    imagecodecs = None

MAX_PIXELS = 40_000_000  # refuse images larger than this (decompression bombs); cells are ~130x130 px
MIN_SIDE = 8  # px; smaller images hold no cell worth classifying


class ImageError(MalariaCellsError, ValueError):
    """An image that cannot be used: the reason in words plus a machine code.

    Codes (HTTP status): ``empty_file`` (422), ``not_an_image`` (415), ``too_many_pixels`` (413),
    ``image_too_small`` (422), ``unreadable_image`` (422: truncated or corrupt), ``file_unreadable`` (422: the OS
    could not read it), ``unusable_image`` (422: anything else).
    """

    code = "unusable_image"
    status = 422
    exit_code = EXIT_SOME_INPUTS_FAILED


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: letterboxed to a square, scaled to [0, 1], then (x - mean) / std."""

    input_size: int  # px, square
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "letterbox"  # longest side to input_size, aspect kept, padded with black (cells sit on black)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Build from :meth:`to_dict` output."""
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=d.get("resize", "letterbox"),
        )


# The eight dihedral transforms as (quarter turns, horizontal flip): view k rotates by DIHEDRAL[k][0] quarter turns
# (from the height axis towards the width axis, as torch.rot90 and np.rot90 turn), then mirrors left-right where
# DIHEDRAL[k][1]. This is the one numbering of the views: the feature stores (:mod:`malaria_cells.transfer`) and
# test-time augmentation (:mod:`malaria_cells.ensemble`, ``predict --tta``) all use it. Here, in a torch-free module,
# so the inference path shares it. Ordered so that any prefix is spread over the
# group: with 2 views the second is a transposition, with 4 the rotations by 0/180 and both diagonals.
DIHEDRAL: tuple[tuple[int, bool], ...] = (
    (0, False),
    (1, True),
    (2, False),
    (3, True),
    (1, False),
    (0, True),
    (3, False),
    (2, True),
)
MAX_VIEWS = len(DIHEDRAL)


def check_view(number: int) -> tuple[int, bool]:
    """``DIHEDRAL[number]``, or a ValueError naming the valid range."""
    if not 0 <= number < MAX_VIEWS:
        raise ValueError(f"view must be 0-{MAX_VIEWS - 1}, not {number}")
    return DIHEDRAL[number]


def dihedral_view(images: np.ndarray, number: int) -> np.ndarray:
    """Numbered dihedral view ``number`` of a NumPy batch of square images, without colour jitter.

    The same transform as :func:`malaria_cells.augment.view` applies to a torch batch (``DIHEDRAL[number]``);
    test-time augmentation averages over these.

    Args:
        images: (N, S, S, C) array.
        number: 0 (the image itself) to ``MAX_VIEWS - 1``.

    Returns:
        The transformed batch (a view of ``images`` where NumPy can, else a copy).

    Raises:
        ValueError: ``number`` out of range.
    """
    turns, mirror = check_view(number)
    out = np.rot90(images, k=turns, axes=(1, 2))
    return out[:, :, ::-1] if mirror else out


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to 8-bit RGB, with a clear error for anything unusable.

    Grayscale, palette, RGBA (composited on black, like the cells' background) and 16-bit images are
    converted; truncated files, non-images, tiny and huge images raise.

    Args:
        data: the encoded file content.
        name: shown in error messages (usually the path).
        max_pixels: refuse images with more pixels than this (checked before decoding the pixels).

    Returns:
        The RGB image.

    Raises:
        ImageError: with the reason (empty, not an image, truncated, too small, too many pixels).
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)", code="empty_file")
    fast = _decode_webp(data, name=name, max_pixels=max_pixels)
    return fast if fast is not None else _decode_pillow(data, name=name, max_pixels=max_pixels)


def _decode_pillow(data: bytes, *, name: str, max_pixels: int) -> Image.Image:
    """Decode with Pillow (any format it knows), with :func:`decode_image`'s checks and messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            _check_pixels(w, h, name=name, max_pixels=max_pixels)
            ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb limit (178,956,970 px) is not ours: quote ours, which is what the caller can act on.
        raise ImageError(
            f"{name}: too many pixels (over {max_pixels:,}); refusing to decode", code="too_many_pixels", status=413
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (format not recognised)", code="not_an_image", status=415) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: unreadable or truncated image ({e})", code="unreadable_image") from None
    _check_side(w, h, name=name)
    return to_rgb(img)


def _check_pixels(w: int, h: int, *, name: str, max_pixels: int) -> None:
    """Refuse, before decoding, an image with more pixels than ``max_pixels``."""
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: too many pixels ({w}x{h} > {max_pixels:,}); refusing to decode",
            code="too_many_pixels",
            status=413,
        )


def _check_side(w: int, h: int, *, name: str) -> None:
    """Refuse an image with a side shorter than :data:`MIN_SIDE`."""
    if min(w, h) < MIN_SIDE:
        raise ImageError(
            f"{name}: image too small ({w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} px)", code="image_too_small"
        )


def webp_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP file's header (no decoding), or None if it is not a WebP file we can read.

    Args:
        data: the encoded file content.

    Returns:
        (width, height) in px, or None.
    """
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended format: 24-bit canvas size minus one
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit width and height minus one after the signature
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: key frame start code, then 14-bit sizes
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _decode_webp(data: bytes, *, name: str, max_pixels: int) -> Image.Image | None:
    """Decode a WebP file with imagecodecs (GIL released), or None to let Pillow decode it."""
    if imagecodecs is None:
        return None
    size = webp_size(data)
    if size is None:
        return None
    _check_pixels(*size, name=name, max_pixels=max_pixels)
    _check_side(*size, name=name)
    try:
        a = imagecodecs.webp_decode(data)
    except imagecodecs.WebpError:
        return None  # truncated or corrupt: Pillow's decoder says which
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        return None
    return Image.fromarray(a, "RGB") if a.shape[2] == 3 else to_rgb(Image.fromarray(a, "RGBA"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on black, 16-bit scaled to 8-bit).

    Args:
        img: a decoded image.

    Returns:
        An RGB image.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode an image file (or a ``archive.zip::member`` path) to RGB.

    Args:
        path: a file path, or ``ARCHIVE.zip::MEMBER`` for an image inside a zip archive.
        max_pixels: see :func:`decode_image`.

    Returns:
        The RGB image.

    Raises:
        ImageError: unreadable file or unusable image.
    """
    try:
        data = read_bytes(str(path))
    except OSError as e:
        raise ImageError(f"{path}: cannot read file ({e.strerror or e})", code="file_unreadable") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def letterbox(img: Image.Image, size: int) -> np.ndarray:
    """Resize so the longest side is ``size`` (aspect kept) and pad to a square with black.

    Args:
        img: an RGB image.
        size: output side in px.

    Returns:
        ``uint8`` array of shape (size, size, 3).
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        # Pillow's bilinear filter antialiases when shrinking (its support grows with the scale).
        img = img.resize((nw, nh), Image.BILINEAR)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(img, dtype=np.uint8)
    return out


def normalize(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Turn a uint8 NHWC batch into the float32 NCHW model input.

    Args:
        batch: ``uint8`` array (N, H, W, 3).
        prep: the model's preprocessing.

    Returns:
        ``float32`` array (N, 3, H, W).
    """
    x = batch.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
