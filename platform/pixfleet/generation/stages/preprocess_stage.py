"""Preprocess stage (CPU actors): fit images to the generation size, detect control maps.

Needs: row_id, status and the task's image columns (HWC uint8 arrays).
Adds:  nothing; images are replaced by their prepared versions.
Fitting follows diffusers' image processor (`engine.preprocess`); control maps are detected
on the fitted image, except by detectors with a model (depth, segmentation), which the detect stage runs on
the fitted image next. Masks are passed on as they are: the pipeline binarizes them itself.
With `sink.save_control_maps` the control maps are written to `control_maps/` as they are made.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import PreprocessConfig, ResourcesConfig, SinkConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import control_for, detect, fit_image
from pixfleet.generation.sink import save_control_map
from pixfleet.generation.stages import PlannedStage
from pixfleet.storage import Location


class PreprocessStage:
    """Callable class for an actor pool of `map_batches(batch_format="pandas")`."""

    def __init__(self, config: PreprocessConfig, image_columns: list[str], sink: SinkConfig | None = None):
        self.config = config
        self.image_columns = image_columns
        self.control_maps = Location.of(sink.output_dir) if sink and sink.save_control_maps else None
        self.needs = self.columns_needed(image_columns)

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
        return PlannedStage(cls, cls.columns_needed(image_columns), (), options)

    @staticmethod
    def columns_needed(image_columns: list[str]) -> tuple[str, ...]:
        return (C.ROW_ID, C.STATUS, *image_columns)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "preprocess stage")
        batch = batch.copy()
        for column in self.image_columns:
            batch[column] = [
                self.prepare(column, image) if status == C.OK else image
                for image, status in zip(batch[column], batch[C.STATUS], strict=True)
            ]
        if self.control_maps:
            self._save_control_maps(batch)
        return batch

    def _save_control_maps(self, batch: pd.DataFrame) -> None:
        for row in batch[batch[C.STATUS] == C.OK].to_dict("records"):
            for column in self.image_columns:
                control = control_for(self.config.control, column)
                if control is not None and not control.uses_model:
                    save_control_map(self.control_maps, row[C.ROW_ID], C.control_index(column), row[column])

    def prepare(self, column: str, image: np.ndarray) -> np.ndarray:
        config = self.config
        image = fit_image(image, config.width, config.height, config.resize_mode, config.resample)
        control = control_for(config.control, column)
        if control is None or control.uses_model:
            return image
        return detect(image, control)
