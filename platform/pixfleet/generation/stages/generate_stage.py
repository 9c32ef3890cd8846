"""Generate stage (actor pool, one loaded pipeline per actor): rows -> images.

Needs: row_id, status, prompt, params, seed, source_ref, input_files and the task's image columns.
Adds:  image (HWC uint8), image_index, sampler, prompt_tokens, prompt_truncated, generate_s;
       the image columns a later stage asks for (`passed`: the evaluate stage's) go on with them;
one output row per image, so a row asking `num_images_per_prompt=k` yields k rows. Failed and
skipped rows pass through. `generate_s` is each image's share of its pipeline call, so the
column sums to the time the actor spent generating. The pipeline call itself is
`PipelineRunner`'s, shared with serving. A call that runs out of accelerator memory is retried
in halves; a row that does not fit even alone fails with the reason, and the job goes on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import ModelSpec, ResourcesConfig
from pixfleet.engine import columns as C
from pixfleet.engine.batching import group_rows
from pixfleet.engine.images import empty_image
from pixfleet.errors import one_line
from pixfleet.generation.stages import PlannedStage

logger = logging.getLogger(__name__)

ADDS = (
    C.IMAGE,
    C.IMAGE_INDEX,
    C.SAMPLER,
    C.PROMPT_TOKENS,
    C.PROMPT_TRUNCATED,
    C.GENERATE_SECONDS,
)


class GenerateStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(
        self,
        spec: ModelSpec,
        image_columns: list[str],
        size: tuple[int, int],
        batch_size: int,
        passed: tuple[str, ...] = (),
    ):
        from pixfleet.engine.runner import PipelineRunner  # here: the driver plans this stage without torch

        self.runner = PipelineRunner.load(spec)
        if spec.optimizations.torch_compile or self.runner.device.type == "cuda":
            # Compile (and let the GPU set itself up) at the job's one size before the first rows.
            seconds = self.runner.warm_up(*size, batch_size=batch_size)
            logger.info("generate actor warmed up in %.1f s at %dx%d, batch %d", seconds, *size, batch_size)
        self.image_columns = image_columns
        self.passed = passed
        self.needs = self.columns_needed(image_columns)

    @classmethod
    def plan(
        cls,
        spec: ModelSpec,
        image_columns: list[str],
        size: tuple[int, int],
        resources: ResourcesConfig,
        passed: tuple[str, ...] = (),
    ) -> PlannedStage:
        threads = {"env_vars": {"OMP_NUM_THREADS": str(resources.torch_threads)}} if resources.torch_threads else None
        options = {
            "fn_constructor_args": (spec, image_columns, size, resources.batch_size, passed),
            "batch_size": resources.batch_size,
            "num_cpus": resources.num_cpus_per_actor,
            "num_gpus": resources.num_gpus_per_actor,
            "compute": ray.data.ActorPoolStrategy(
                min_size=resources.min_actors, max_size=resources.max_actors, initial_size=resources.initial_actors
            ),
            "runtime_env": threads,
        }
        return PlannedStage(cls, cls.columns_needed(image_columns), (*ADDS, *passed), options)

    @staticmethod
    def columns_needed(image_columns: list[str]) -> tuple[str, ...]:
        return (C.ROW_ID, C.STATUS, C.PROMPT, C.PARAMS, C.SEED, C.SOURCE_REF, C.INPUT_FILES, *image_columns)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "generate stage")
        rows = batch.drop(columns=self.image_columns).to_dict("records")
        for row, images in zip(rows, batch[self.image_columns].to_dict("records"), strict=True):
            row.update(images)
        outputs = [self._output(row, 0, empty_image(), 0.0, 0) for row in rows if row[C.STATUS] != C.OK]
        for group in group_rows([row for row in rows if row[C.STATUS] == C.OK]):
            outputs += self._generate(group)
        return pd.DataFrame(outputs)

    def _generate(self, rows: list[dict]) -> list[dict]:
        import torch

        n = json.loads(rows[0][C.PARAMS])["num_images_per_prompt"]
        tokens = self.runner.prompt_tokens([row[C.PROMPT] for row in rows])
        start = time.perf_counter()
        try:
            images = self.runner.generate(rows)
        except torch.OutOfMemoryError as error:
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1:
                half = len(rows) // 2
                logger.warning("out of memory on %d rows; retrying as %d + %d", len(rows), half, len(rows) - half)
                return self._generate(rows[:half]) + self._generate(rows[half:])
            width, height = self.runner.working_size(rows[0])
            reason = f"out of memory even alone ({width}x{height}, {n} image(s)): {one_line(error)}"
            return self._failed(rows, tokens, reason)
        except Exception as error:  # the rows fail with the reason; the job goes on
            return self._failed(rows, tokens, f"pipeline error: {one_line(error)}")
        share = (time.perf_counter() - start) / len(images)
        return [
            self._output(row, k, images[i * n + k], share, tokens[i]) for i, row in enumerate(rows) for k in range(n)
        ]

    def _failed(self, rows: list[dict], tokens: list[int], reason: str) -> list[dict]:
        failed = [{**row, C.STATUS: C.FAILED, C.ERROR: reason} for row in rows]
        return [self._output(row, 0, empty_image(), 0.0, count) for row, count in zip(failed, tokens, strict=True)]

    def _output(self, row: dict, index: int, image: np.ndarray, seconds: float, tokens: int) -> dict[str, Any]:
        seed = row[C.SEED] + index if row[C.STATUS] == C.OK else row[C.SEED]
        return {
            C.ROW_ID: row[C.ROW_ID],
            C.IMAGE_INDEX: index,
            C.SOURCE_REF: row[C.SOURCE_REF],
            C.INPUT_FILES: row[C.INPUT_FILES],
            C.STATUS: row[C.STATUS],
            C.ERROR: row[C.ERROR],
            C.PROMPT: row[C.PROMPT],
            C.PARAMS: row[C.PARAMS],
            C.SEED: seed,
            C.IMAGE: image,
            C.SAMPLER: self.runner.sampler,
            C.PROMPT_TOKENS: tokens,
            C.PROMPT_TRUNCATED: tokens > self.runner.max_prompt_tokens,
            C.GENERATE_SECONDS: seconds,
            **{column: row[column] for column in self.passed},
        }
