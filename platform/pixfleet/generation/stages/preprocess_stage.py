"""Preprocess stage (CPU actors): fit images to the generation size, detect control maps.

Needs: row_id, status and the task's image columns (HWC uint8 arrays).
Adds:  nothing; images are replaced by their prepared versions.
Fitting follows diffusers' image processor (`engine.preprocess`); control maps are detected
on the fitted image. Masks are passed on as they are: the pipeline binarizes them itself.
With `sink.save_control_maps` the control maps are written to `control_maps/` as they are made.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import PreprocessConfig, ResourcesConfig, SinkConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import detect, fit_image, to_pil
from pixfleet.generation.sink import atomic_write, control_map_path
from pixfleet.generation.stages import PlannedStage


class PreprocessStage:
    """Callable class for an actor pool of `map_batches(batch_format="pandas")`: detectors
    (today canny) keep their state in the actor."""

    def __init__(self, config: PreprocessConfig, image_columns: list[str], sink: SinkConfig | None = None):
        self.config = config
        self.image_columns = image_columns
        self.sink = sink if sink and sink.save_control_maps else None
        self.needs = [C.ROW_ID, C.STATUS, *image_columns]

    @classmethod
    def plan(
        cls, config: PreprocessConfig, image_columns: list[str], resources: ResourcesConfig, sink: SinkConfig
    ) -> PlannedStage:
        options = {
            "fn_constructor_args": (config, image_columns, sink),
            "batch_size": resources.batch_size,
            "num_cpus": resources.num_cpus_per_preprocess,
            "compute": ray.data.ActorPoolStrategy(size=resources.preprocess_actors),
        }
        return PlannedStage(cls, (C.ROW_ID, C.STATUS, *image_columns), (), options)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "preprocess stage")
        batch = batch.copy()
        for column in self.image_columns:
            batch[column] = [
                self.prepare(column, image) if status == C.OK else image
                for image, status in zip(batch[column], batch[C.STATUS], strict=True)
            ]
        if self.sink:
            self._save_control_maps(batch)
        return batch

    def _save_control_maps(self, batch: pd.DataFrame) -> None:
        for row in batch[batch[C.STATUS] == C.OK].to_dict("records"):
            for column in self.image_columns:
                index = C.control_index(column)
                if index is not None:
                    buffer = io.BytesIO()
                    to_pil(row[column]).save(buffer, format="PNG")
                    atomic_write(control_map_path(self.sink, row[C.ROW_ID], index), buffer.getvalue())

    def prepare(self, column: str, image: np.ndarray) -> np.ndarray:
        config = self.config
        image = fit_image(image, config.width, config.height, config.resize_mode, config.resample)
        index = C.control_index(column)
        if index is None:
            return image
        return detect(image, config.control[index if len(config.control) > 1 else 0])
