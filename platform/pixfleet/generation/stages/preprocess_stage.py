"""Preprocess stage (CPU actors): fit images to the generation size, detect control maps.

Needs: status and the task's image columns (HWC uint8 arrays).
Adds:  nothing; images are replaced by their prepared versions.
Fitting follows diffusers' image processor (`engine.preprocess`); control maps are detected
on the fitted image. Masks are passed on as they are: the pipeline binarizes them itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pixfleet.config import PreprocessConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import detect, fit_image


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
                self.prepare(column, image) if status == C.OK else image
                for image, status in zip(batch[column], batch[C.STATUS], strict=True)
            ]
        return batch

    def prepare(self, column: str, image: np.ndarray) -> np.ndarray:
        config = self.config
        image = fit_image(image, config.width, config.height, config.resize_mode, config.resample)
        index = C.control_index(column)
        if index is None:
            return image
        return detect(image, config.control[index if len(config.control) > 1 else 0])
