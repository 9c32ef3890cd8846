"""Decoding reads images as diffusers' `load_image` does (every mode, EXIF orientation), does
better on 16-bit images, and fails bad input with one line naming the column."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pixfleet.engine.images import ImageTooLarge, RowError, decode_image
from tests.helpers import random_image


def encoded(image: Image.Image, format: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


def oriented_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(random_image(4, (40, 24)), "JPEG", exif=exif, quality=95)


CASES = {
    "RGB": encoded(random_image(1, (30, 20))),
    "RGBA": encoded(random_image(1, (30, 20)).convert("RGBA")),
    "LA": encoded(random_image(1, (30, 20)).convert("LA")),
    "L": encoded(random_image(1, (30, 20)).convert("L")),
    "1": encoded(random_image(1, (30, 20)).convert("1")),
    "P": encoded(random_image(1, (30, 20)).convert("P")),
    "P with transparency": encoded(random_image(1, (30, 20)).convert("P"), transparency=0),
    "CMYK JPEG": encoded(random_image(1, (30, 20)).convert("CMYK"), "JPEG"),
    "WebP": encoded(random_image(1, (30, 20)), "WEBP", lossless=True),
    "EXIF 180": oriented_jpeg(3),
    "EXIF 90 cw": oriented_jpeg(6),
    "EXIF 90 ccw": oriented_jpeg(8),
    "EXIF mirrored": oriented_jpeg(2),
}


@pytest.mark.parametrize("case", CASES)
def test_decoding_equals_diffusers_load_image(case):
    from diffusers.utils import load_image

    data = CASES[case]
    expected = np.asarray(load_image(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(decode_image(data, "image", 10**6), expected)


def test_exif_orientation_turns_the_image_upright():
    assert decode_image(oriented_jpeg(6), "image", 10**6).shape == (40, 24, 3)
    assert decode_image(oriented_jpeg(3), "image", 10**6).shape == (24, 40, 3)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped_to_white(mode):
    ramp = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    data = encoded(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data, "depth", 10**6, mode)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert decoded.shape == (16, 64, 3 if mode == "RGB" else 1)
    assert np.abs(decoded[:, :, 0].astype(int) - expected).max() <= 1
    assert decoded.min() == 0 and decoded.max() == 255


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "mask: missing or unreadable file"),
        (b"", "mask: empty (zero-size) image"),
        (b"hello", "mask: cannot decode image (not a format Pillow reads)"),
        (encoded(random_image(1))[:60], "mask: cannot decode image ("),
    ],
)
def test_bad_input_is_one_line_naming_the_column_without_object_reprs(data, message):
    with pytest.raises(RowError) as raised:
        decode_image(data, "mask", 10**6)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value) and " at 0x" not in str(raised.value)


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match=r"image: 30x20 exceeds max_image_pixels=100"):
        decode_image(CASES["RGB"], "image", 100)
