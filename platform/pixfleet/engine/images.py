"""Image decoding with the checks bad input needs, and the array form stages pass on."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


class RowError(ValueError):
    """A problem with one row; the row fails with this one-line reason, the job goes on."""


class ImageTooLarge(RowError):
    """An image over the pixel limit, or a decompression bomb."""


def empty_image(channels: int = 3) -> np.ndarray:
    """Placeholder for an absent image: keeps a column's arrays at the same rank."""
    return np.zeros((0, 0, channels), dtype=np.uint8)


def decode_image(data: bytes | None, what: str, max_pixels: int, mode: str = "RGB") -> np.ndarray:
    """Decode `data` into an HWC uint8 array; RowError for empty, bad, truncated or huge input."""
    if data is None:
        raise RowError(f"{what}: missing or unreadable file")
    if len(data) == 0:
        raise RowError(f"{what}: empty (zero-size) image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{what}: {width}x{height} exceeds max_image_pixels={max_pixels}")
            image.load()  # decodes fully: truncated files fail here, not later
    except RowError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{what}: image too large (decompression bomb)") from None
    except Exception as error:
        raise RowError(f"{what}: cannot decode image ({type(error).__name__}: {error})") from None
    array = np.asarray(image.convert(mode))
    return array[:, :, None] if array.ndim == 2 else array


def to_pil(array: np.ndarray) -> Image.Image:
    """HWC uint8 array -> PIL image (L for one channel)."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
