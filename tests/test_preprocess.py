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


def _pillow_decode(data: bytes) -> np.ndarray:
    """Pillow's pixels for an encoded image (the reference the imagecodecs WebP path must match)."""
    from malaria_cells.preprocess import to_rgb

    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(to_rgb(img))


def _webp_cases() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), "RGBA")
    buf = {}
    for name, img, kw in [
        ("lossless", noise, {"lossless": True}),
        ("lossy", noise, {"quality": 80}),
        ("alpha-lossless", rgba, {"lossless": True}),  # VP8X header, composited on black
        ("alpha-lossy", rgba, {"quality": 80}),
    ]:
        b = io.BytesIO()
        img.save(b, "WEBP", **kw)
        buf[name] = b.getvalue()
    return list(buf.items())


@pytest.mark.parametrize(("kind", "data"), _webp_cases())
def test_webp_header_size_and_fast_decode_match_pillow(kind, data):
    from malaria_cells import preprocess

    assert preprocess.webp_size(data) == Image.open(io.BytesIO(data)).size
    out = np.asarray(decode_image(data))
    ref = _pillow_decode(data)
    if kind.endswith("lossless"):
        assert np.array_equal(out, ref)
    else:  # lossy: two libwebp builds may round the YUV -> RGB conversion differently
        assert out.shape == ref.shape and np.abs(out.astype(int) - ref).max() <= 2


def test_webp_decode_uses_imagecodecs_and_matches_pillow_on_share(share):
    from malaria_cells import preprocess

    assert preprocess.imagecodecs is not None  # a dependency: without it WebP decoding is ~1.6x slower
    files = sorted((share / "Parasitized").glob("*.webp"))[:40] + sorted((share / "Uninfected").glob("*.webp"))[:40]
    for f in files:
        data = f.read_bytes()
        assert preprocess._decode_webp(data, name=str(f), max_pixels=preprocess.MAX_PIXELS) is not None
        assert np.array_equal(np.asarray(decode_image(data)), _pillow_decode(data)), f


@pytest.mark.parametrize("cut", [40, 200])
def test_truncated_webp_gets_pillows_reason(cut):
    data = _webp_cases()[0][1]
    with pytest.raises(ImageError, match="truncated|not an image"):
        decode_image(data[:cut], name="cut.webp")


def test_webp_bomb_refused_from_header():
    b = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(b, "WEBP", lossless=True)
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(b.getvalue(), name="bomb.webp", max_pixels=40_000_000)
