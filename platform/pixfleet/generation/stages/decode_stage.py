"""Decode stage (CPU tasks): image bytes -> arrays, per-row parameters, row ids and seeds.

Needs: row_id, source_ref, prompt, the task's image columns (bytes).
Adds:  params (JSON), seed, status, error; image columns become HWC uint8 arrays.
A row whose image or parameter is bad is marked failed with a one-line reason; a row whose
id an earlier run already wrote is marked skipped. Neither carries images further.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from pixfleet.config import GenerationJobConfig, GenerationParams
from pixfleet.generation import columns as C
from pixfleet.generation.images import RowError, decode_image, empty_image
from pixfleet.generation.params import (
    check_row_id,
    content_row_id,
    derive_seed,
    job_fingerprint,
    resolve_params,
    row_overrides,
)


class DecodeStage:
    """Callable for `map_batches(batch_format="pandas")`."""

    def __init__(
        self,
        task: str,
        image_columns: list[str],
        defaults: GenerationParams,
        num_controlnets: int,
        job_fingerprint: str,
        job_seed: int,
        max_image_pixels: int,
        finished_row_ids: frozenset[str] = frozenset(),
    ):
        self.task = task
        self.image_columns = image_columns
        self.defaults = defaults
        self.num_controlnets = num_controlnets
        self.job_fingerprint = job_fingerprint
        self.job_seed = job_seed
        self.max_image_pixels = max_image_pixels
        self.finished_row_ids = finished_row_ids
        self.needs = [C.ROW_ID, C.SOURCE_REF, C.PROMPT, *image_columns]

    @classmethod
    def for_job(
        cls, job: GenerationJobConfig, image_columns: list[str], finished_row_ids: frozenset[str] = frozenset()
    ) -> DecodeStage:
        return cls(
            job.model.task,
            image_columns,
            job.params,
            job.model.num_controlnets,
            job_fingerprint(job),
            job.seed,
            job.preprocess.max_image_pixels,
            finished_row_ids,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "decode stage")
        rows = [self._decode_row(row) for row in batch.to_dict("records")]
        return pd.DataFrame(rows)

    def _decode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {C.SOURCE_REF: row[C.SOURCE_REF], C.STATUS: C.OK, C.ERROR: ""}
        raw_images = [row[c] for c in self.image_columns]
        row = {**row, "prompt": _prompt_or_default(row[C.PROMPT], self.defaults.prompt)}
        out[C.ROW_ID] = row[C.ROW_ID] or content_row_id(raw_images, row_overrides(row), self.job_fingerprint)
        try:
            row_id = check_row_id(out[C.ROW_ID])
            params = resolve_params(self.defaults, row, self.task, self.num_controlnets)
            if row_id in self.finished_row_ids:
                return self._without_images({**out, C.STATUS: C.SKIPPED}, params)
            for column, data in zip(self.image_columns, raw_images, strict=True):
                mode = "L" if column == C.MASK_IMAGE else "RGB"
                out[column] = decode_image(data, column, self.max_image_pixels, mode)
        except RowError as error:
            return self._without_images({**out, C.STATUS: C.FAILED, C.ERROR: str(error)}, None)
        seed = params["seed"] if params["seed"] is not None else derive_seed(self.job_seed, row_id)
        out[C.SEED] = seed
        out[C.PARAMS] = json.dumps(params)
        out[C.PROMPT] = params["prompt"]
        return out

    def _without_images(self, out: dict[str, Any], params: dict | None) -> dict[str, Any]:
        for column in self.image_columns:
            out[column] = empty_image(1 if column == C.MASK_IMAGE else 3)
        out[C.SEED] = -1
        out[C.PARAMS] = json.dumps(params) if params else ""
        out[C.PROMPT] = params["prompt"] if params else ""
        return out


def _prompt_or_default(value: Any, default: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return default
    return str(value)
