"""A synthetic set in the shape of fill50k: filled circles, their outlines, and a caption.

Written as an imagefolder with `metadata.jsonl`, so `datasets.load_dataset(DIR)` yields the
columns `image`, `conditioning_image` and `text`, as the ControlNet training example expects,
and `mask` (the circle white on black), so the inpaint pipelines repaint the circle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def fill50k_row(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image, str]:
    """One row: (filled circle image, outline control map, caption)."""
    names = list(COLORS)
    fill, background = rng.choice(len(names), size=2, replace=False)
    radius = int(rng.integers(size // 8, size // 3 + 1))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)

    image = Image.new("RGB", (size, size), COLORS[names[background]])
    ImageDraw.Draw(image).ellipse(box, fill=COLORS[names[fill]])
    outline = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(outline).ellipse(box, outline=(255, 255, 255), width=max(1, size // 64))
    return image, outline, f"{names[fill]} circle with {names[background]} background"


def circle_mask(image: Image.Image) -> Image.Image:
    """The circle of a `fill50k_row` image, white on black: every pixel not of the background's
    colour (a corner always is: the circle lies inside the image, and a corner outside any
    circle that fits)."""
    pixels = np.asarray(image)
    return Image.fromarray(np.where((pixels != pixels[0, 0]).any(axis=2), 255, 0).astype(np.uint8))


def make_fill50k(out_dir: str | Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write `n` rows to `out_dir` (deterministic for a given seed) and return the folder."""
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning_images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / "metadata.jsonl", "w") as manifest:
        for i in range(n):
            image, outline, text = fill50k_row(rng, size)
            name = f"{i:06d}.png"
            image.save(out / "images" / name)
            outline.save(out / "conditioning_images" / name)
            circle_mask(image).save(out / "masks" / name)
            row = {
                "file_name": f"images/{name}",
                "conditioning_image_file_name": f"conditioning_images/{name}",
                "mask_file_name": f"masks/{name}",
                "text": text,
            }
            manifest.write(json.dumps(row) + "\n")
    return out
