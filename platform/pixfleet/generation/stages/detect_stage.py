"""Detect stage (actor pool, one set of detector models per actor): fitted images -> control maps.

Needs: row_id, status, error and the control image columns whose ControlNet asks for a model
detector (depth, segmentation); runs only when one does.
Adds:  nothing; those images are replaced by their maps, at the generation size.
The preprocess stage has fitted the images and left these columns to this stage. Each actor
loads its detector models once and runs them on whole batches, on a GPU (a fraction of one,
beside the generation actors) or on CPU. A batch the detector refuses is retried row by row,
so only the rows it cannot process fail, each with the reason.
"""

from __future__ import annotations

import pandas as pd
import ray.data

from pixfleet.config import ControlPreprocessConfig, ResourcesConfig, SinkConfig
from pixfleet.engine import columns as C
from pixfleet.errors import one_line
from pixfleet.generation.sink import save_control_map
from pixfleet.generation.stages import PlannedStage
from pixfleet.storage import Location


class DetectStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, controls: dict[str, ControlPreprocessConfig], sink: SinkConfig | None = None):
        import torch

        from pixfleet.engine.detectors import load_detector

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.controls = controls
        self.detectors = {column: load_detector(control, device) for column, control in controls.items()}
        self.control_maps = Location.of(sink.output_dir) if sink and sink.save_control_maps else None
        self.needs = self.columns_needed(controls)

    @classmethod
    def plan(
        cls, controls: dict[str, ControlPreprocessConfig], resources: ResourcesConfig, sink: SinkConfig
    ) -> PlannedStage:
        options = {
            "fn_constructor_args": (controls, sink),
            "batch_size": resources.batch_size,
            "num_cpus": resources.num_cpus_per_detector,
            "num_gpus": resources.num_gpus_per_detector,
            "compute": ray.data.ActorPoolStrategy(size=resources.detector_actors),
        }
        return PlannedStage(cls, cls.columns_needed(controls), (), options)

    @staticmethod
    def columns_needed(controls: dict[str, ControlPreprocessConfig]) -> tuple[str, ...]:
        return (C.ROW_ID, C.STATUS, C.ERROR, *controls)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "detect stage")
        batch = batch.copy()
        for column, detector in self.detectors.items():
            rows = batch.index[batch[C.STATUS] == C.OK]
            if len(rows) == 0:
                continue
            try:
                maps = detector(list(batch.loc[rows, column]))
            except Exception:  # find the rows it cannot process; the others keep their maps
                maps = [self._one(batch, row, column) for row in rows]
            for row, image in zip(rows, maps, strict=True):
                if image is not None:
                    batch.at[row, column] = image
        if self.control_maps:
            for row in batch[batch[C.STATUS] == C.OK].to_dict("records"):
                for column in self.detectors:
                    save_control_map(self.control_maps, row[C.ROW_ID], C.control_index(column), row[column])
        return batch

    def _one(self, batch: pd.DataFrame, row, column: str):
        try:
            return self.detectors[column]([batch.at[row, column]])[0]
        except Exception as error:
            detector = self.controls[column].detector
            batch.at[row, C.STATUS] = C.FAILED
            batch.at[row, C.ERROR] = f"{detector} detector: {one_line(error)}"
            return None
