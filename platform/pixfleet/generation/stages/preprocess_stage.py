"""Preprocess stage (CPU actors): resize to the target size, detect control maps, binarize masks.

Needs: status and the task's image columns (HWC uint8 arrays).
Adds:  nothing; images are replaced by their prepared versions (all the same size per row).
Ready-made control maps and pix2pix/img2img source images are resized only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from pixfleet.config import ControlPreprocessConfig, PreprocessConfig
from pixfleet.generation import columns as C


def resize(image: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """Fit `image` to width x height: cover and center-crop, stretch, or keep (cropped to /8)."""
    h, w = image.shape[:2]
    if mode == "none":
        width, height = w - w % 8, h - h % 8
        top, left = (h - height) // 2, (w - width) // 2
        return image[top : top + height, left : left + width]
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if mode == "center_crop":
        scale = max(width / w, height / h)
        size = (max(width, round(w * scale)), max(height, round(h * scale)))
        pil = pil.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        pil = pil.crop((left, top, left + width, top + height))
    else:
        pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(pil)
    return array[:, :, None] if array.ndim == 2 else array


def detect(image: np.ndarray, config: ControlPreprocessConfig) -> np.ndarray:
    """Turn an RGB image into a control map ('none' passes it through)."""
    if config.detector == "none":
        return image
    import cv2

    edges = cv2.Canny(image, config.low_threshold, config.high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


class PreprocessStage:
    """Callable class for an actor pool of `map_batches(batch_format="pandas")`."""

    def __init__(self, config: PreprocessConfig, image_columns: list[str]):
        self.config = config
        self.image_columns = image_columns
        self.needs = [C.STATUS, *image_columns]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "preprocess stage")
        batch = batch.copy()
        for column in self.image_columns:
            batch[column] = [
                prepare_image(column, image, self.config) if status == C.OK else image
                for image, status in zip(batch[column], batch[C.STATUS], strict=True)
            ]
        return batch


def prepare_image(column: str, image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """One image of `column` made ready for the pipeline: resized, then binarized (mask) or
    turned into a control map (control columns)."""
    image = resize(image, config.width, config.height, config.resize_mode)
    if column == C.MASK_IMAGE:
        return np.where(image > 127, 255, 0).astype(np.uint8)
    if column.startswith("control_image_"):
        index = int(column.rsplit("_", 1)[1])
        return detect(image, config.control[index if len(config.control) > 1 else 0])
    return image
