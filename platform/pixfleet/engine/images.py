"""Image decoding with the checks bad input needs, as diffusers' `load_image` reads files.

Like `load_image`, decoding applies the EXIF orientation and converts to RGB (an alpha channel
is dropped, CMYK and palette images are converted). Unlike it, 16-bit images are scaled to 8
bits instead of clipped to white.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixfleet.engine.preprocess import from_pil
from pixfleet.errors import one_line

# PIL's integer modes of 16-bit files (PNG, TIFF): values 0..65535.
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class RowError(ValueError):
    """A problem with one row; the row fails with this one-line reason, the job goes on."""


class ImageTooLarge(RowError):
    """An image over the pixel limit, or a decompression bomb."""


def empty_image(channels: int = 3) -> np.ndarray:
    """Placeholder for an absent image: keeps a column's arrays at the same rank."""
    return np.zeros((0, 0, channels), dtype=np.uint8)


def decode_image(data: bytes | None, what: str, max_pixels: int, mode: str = "RGB") -> np.ndarray:
    """Decode `data` into an HWC uint8 array of `mode` ('RGB' or 'L'), upright as its EXIF
    orientation says; RowError naming `what` for empty, bad, truncated or huge input."""
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
            image = ImageOps.exif_transpose(image)
    except RowError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{what}: image too large (decompression bomb)") from None
    except UnidentifiedImageError:
        raise RowError(f"{what}: cannot decode image (not a format Pillow reads)") from None
    except Exception as error:
        raise RowError(f"{what}: cannot decode image ({one_line(error)})") from None
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8_bit(image)
    return from_pil(image.convert(mode))


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits (PIL's own conversion clips it to white)."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
