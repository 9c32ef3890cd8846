"""Fitting images to the generation size and making control maps, as diffusers would.

`fit_image` follows diffusers' `VaeImageProcessor.resize`: 'resize' is its default mode (a
plain resize to width x height), 'center_crop' its 'crop' mode (scale to cover with the integer
arithmetic of `_resize_and_crop`, then cut the center), and the filter is Lanczos unless the
config says otherwise. 'none' keeps the image as it is: the pipeline itself then rounds the
size down to its VAE's multiple (`PipelineRunner.working_size`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image

from pixfleet.config import ControlPreprocessConfig
from pixfleet.engine import columns as C

ResizeMode = Literal["center_crop", "resize", "none"]
Resample = Literal["lanczos", "bicubic", "bilinear", "nearest"]
RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def size_multiple(task: str, vae_scale_factor: int) -> int:
    """What a pipeline rounds image sizes down to: its VAE's scale factor (and 8 for the inpaint
    ControlNet pipeline, which checks for multiples of 8 whatever its VAE's factor)."""
    return math.lcm(int(vae_scale_factor), 8 if task == "controlnet_inpaint" else 1)


def generated_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) a pipeline generates for images of this size, rounded down as diffusers'
    `get_default_height_width` rounds it."""
    return width - width % multiple, height - height % multiple


def to_pil(array: np.ndarray) -> Image.Image:
    """HWC uint8 array -> PIL image (L for one channel)."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def from_pil(image: Image.Image) -> np.ndarray:
    """PIL image -> HWC uint8 array (one channel for L)."""
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def fit_pil(image: Image.Image, width: int, height: int, mode: ResizeMode, resample: Resample) -> Image.Image:
    """`image` fitted to width x height by `mode` (see the module docstring)."""
    if mode == "none" or image.size == (width, height):
        return image
    if mode == "resize":
        return image.resize((width, height), resample=RESAMPLING[resample])
    scaled, (left, top) = center_crop_plan(image.size, width, height)
    resized = image.resize(scaled, resample=RESAMPLING[resample])
    return resized.crop((left, top, left + width, top + height))


def center_crop_plan(size: tuple[int, int], width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled size, (left, top) of the cut) that cover width x height from an image of `size`
    and cut its center: the integer arithmetic of diffusers' `_resize_and_crop`."""
    if width / height > size[0] / size[1]:
        scaled = (width, size[1] * width // size[0])
    else:
        scaled = (size[0] * height // size[1], height)
    return scaled, (scaled[0] // 2 - width // 2, scaled[1] // 2 - height // 2)


def fit_image(image: np.ndarray, width: int, height: int, mode: ResizeMode, resample: Resample) -> np.ndarray:
    """`fit_pil` on an HWC uint8 array."""
    if mode == "none":
        return image
    return from_pil(fit_pil(to_pil(image), width, height, mode, resample))


def control_for(controls: list[ControlPreprocessConfig], column: str) -> ControlPreprocessConfig | None:
    """How the image column `column` becomes a control map (one entry per ControlNet, or one
    for all); None for columns that are not control images."""
    index = C.control_index(column)
    if index is None:
        return None
    return controls[index if len(controls) > 1 else 0]


def detect(image: np.ndarray, control: ControlPreprocessConfig) -> np.ndarray:
    """An RGB image turned into a control map by a detector without a model ('none' passes it
    through); the map has the image's size."""
    import cv2

    if control.detector == "none":
        return image
    if control.detector == "shuffle":
        return content_shuffle(image, control.detect_resolution)
    if control.detector == "tile":  # sd-webui's tile_resample, back at the image's size
        height, width = image.shape[:2]
        small = (max(1, round(width / control.tile_downsample)), max(1, round(height / control.tile_downsample)))
        reduced = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
        return cv2.resize(reduced, (width, height), interpolation=cv2.INTER_CUBIC)
    edges = cv2.Canny(image, control.low_threshold, control.high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


def content_shuffle(image: np.ndarray, detect_resolution: int) -> np.ndarray:
    """controlnet_aux's content shuffle (ControlNet 1.1 shuffle's input), seeded by the image:
    a rerun makes the same map."""
    import zlib

    from pixfleet.models.annotators import quietly

    with quietly():
        from controlnet_aux.shuffle import ContentShuffleDetector

    state = np.random.get_state()  # controlnet_aux draws from numpy's global generator
    np.random.seed(zlib.crc32(image.tobytes()))
    try:
        shuffled = ContentShuffleDetector()(
            image, detect_resolution=detect_resolution, image_resolution=min(image.shape[:2]), output_type="np"
        )
    finally:
        np.random.set_state(state)
    return at_size(shuffled, image.shape[:2])


def at_size(control_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An annotator's map (its sides rounded to 64 pixels) at the image's (height, width)."""
    import cv2

    if control_map.shape[:2] == tuple(size):
        return control_map
    return cv2.resize(control_map, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
