"""Decode stage (CPU tasks): image bytes -> arrays, per-row parameters, row ids and seeds.

Needs: row_id, source_ref, row_params, load_errors, input_files, the task's image columns (bytes).
Adds:  params (JSON), prompt, seed, status, error; image columns become HWC uint8 arrays.
A row whose image or parameter is bad is marked failed with a one-line reason naming the
user's column; a row whose id an earlier run already wrote is marked skipped. Neither carries
images further. A failed row's id derives from where it came from, so every failed input
keeps a manifest row of its own (two empty files do not share the id of "no bytes").
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

import pandas as pd

from pixfleet.config import GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.engine.images import RowError, decode_image, empty_image
from pixfleet.engine.params import (
    check_row_id,
    derive_seed,
    input_key,
    pipeline_call_defaults,
    resolve_params,
    row_id_for,
)
from pixfleet.generation.stages import LIGHT_CPU, PlannedStage, caption_columns


class DecodeStage:
    """Callable for `map_batches(batch_format="pandas")`, run as tasks."""

    def __init__(
        self,
        job: GenerationJobConfig,
        image_labels: dict[str, str],
        job_fingerprint: str,
        finished_row_ids: Container[str] = frozenset(),
    ):
        self.task = job.model.task
        self.image_labels = image_labels  # canonical image column -> the user's name for it
        self.image_columns = list(image_labels)
        self.defaults = job.params
        # Read here, on the driver: the tasks then never import diffusers.
        self.pipeline_defaults = pipeline_call_defaults(self.task)
        self.num_controlnets = job.model.num_controlnets
        self.job_fingerprint = job_fingerprint
        self.job_seed = job.seed
        self.max_image_pixels = job.preprocess.max_image_pixels
        self.finished_row_ids = finished_row_ids
        self.texts = tuple(caption_columns(job))  # passed on as they are, for the evaluate stage
        self.needs = (
            C.ROW_ID,
            C.SOURCE_REF,
            C.ROW_PARAMS,
            C.LOAD_ERRORS,
            C.INPUT_FILES,
            *self.image_columns,
            *self.texts,
        )

    @classmethod
    def plan(cls, *args, **kwargs) -> PlannedStage:
        stage = cls(*args, **kwargs)
        adds = (C.PARAMS, C.PROMPT, C.SEED, C.STATUS, C.ERROR)
        return PlannedStage(stage, stage.needs, adds, {"num_cpus": LIGHT_CPU})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "decode stage")
        return pd.DataFrame([self._decode_row(row) for row in batch.to_dict("records")])

    def _decode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {C.SOURCE_REF: row[C.SOURCE_REF], C.INPUT_FILES: row[C.INPUT_FILES], C.STATUS: C.OK, C.ERROR: ""}
        out |= {column: row[column] for column in self.texts}
        own = json.loads(row[C.ROW_PARAMS])
        raw_images = [row[c] for c in self.image_columns]
        has_content = all(raw_images)
        key = row[C.ROW_ID] or (input_key(raw_images, own) if has_content else self._source_key(row, own))
        out[C.ROW_ID] = row[C.ROW_ID] or row_id_for(key, self.job_fingerprint)
        try:
            row_id = check_row_id(out[C.ROW_ID])
            params = resolve_params(self.defaults, own, self.task, self.num_controlnets, self.pipeline_defaults)
            if row_id in self.finished_row_ids:
                return self._without_images({**out, C.STATUS: C.SKIPPED}, params)
            load_errors = json.loads(row[C.LOAD_ERRORS])
            if C.UNREADABLE_ROW in load_errors:
                raise RowError(load_errors[C.UNREADABLE_ROW])
            for column, data in zip(self.image_columns, raw_images, strict=True):
                label = self.image_labels[column]
                if data is None:
                    raise RowError(f"{label}: {load_errors.get(column, 'missing')}")
                mode = "L" if column == C.MASK_IMAGE else "RGB"
                out[column] = decode_image(data, label, self.max_image_pixels, mode)
        except RowError as error:
            if not row[C.ROW_ID] and has_content:  # content that fails: one manifest row per input
                out[C.ROW_ID] = row_id_for(self._source_key(row, own), self.job_fingerprint)
            return self._without_images({**out, C.STATUS: C.FAILED, C.ERROR: str(error)}, None)
        params["seed"] = params["seed"] if params["seed"] is not None else derive_seed(self.job_seed, key)
        out[C.SEED] = params["seed"]
        out[C.PARAMS] = json.dumps(params)
        out[C.PROMPT] = params["prompt"]
        return out

    @staticmethod
    def _source_key(row: dict[str, Any], own: dict[str, Any]) -> str:
        return "source:" + json.dumps([row[C.SOURCE_REF], own], sort_keys=True, default=str)

    def _without_images(self, out: dict[str, Any], params: dict | None) -> dict[str, Any]:
        for column in self.image_columns:
            out[column] = empty_image(1 if column == C.MASK_IMAGE else 3)
        out[C.SEED] = -1
        out[C.PARAMS] = json.dumps(params) if params else ""
        out[C.PROMPT] = params["prompt"] if params else ""
        return out
