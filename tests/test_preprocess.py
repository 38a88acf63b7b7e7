"""Decoding with clear errors, mode conversion, letterboxing, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from malaria_cells.preprocess import ImageError, Preprocessing, decode_image, letterbox, normalize


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_letterbox_keeps_aspect_and_pads_black():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    out = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[16:48, :, 0] > 200).all()  # the image: 64 x 32, centred
    assert (out[:16] == 0).all() and (out[48:] == 0).all()  # black bars


@pytest.mark.parametrize(
    ("img", "expected_rgb"),
    [
        (Image.new("L", (20, 20), 128), (128, 128, 128)),
        (Image.new("RGBA", (20, 20), (200, 100, 50, 0)), (0, 0, 0)),  # transparent -> black background
        (Image.new("RGBA", (20, 20), (200, 100, 50, 255)), (200, 100, 50)),
        (Image.new("I;16", (20, 20), 65535), (255, 255, 255)),
        (Image.new("P", (20, 20), 3), None),
    ],
)
def test_modes_convert_to_rgb(img, expected_rgb):
    out = decode_image(_encode(img))
    assert out.mode == "RGB"
    if expected_rgb is not None:
        assert out.getpixel((5, 5)) == expected_rgb


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (_encode(Image.new("RGB", (64, 64)))[:60], "truncated"),
        (_encode(Image.new("RGB", (1, 1))), "too small"),
    ],
)
def test_unusable_images_raise_with_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, name="x.png")


def test_decompression_bomb_refused_before_decoding():
    data = _encode(Image.new("L", (8000, 8000)))  # 64 Mpx, compresses to a few kB
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(data, name="bomb.png")


def test_normalize_matches_formula():
    batch = np.full((2, 4, 4, 3), 255, np.uint8)
    prep = Preprocessing(input_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = normalize(batch, prep)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x, 1.0)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
