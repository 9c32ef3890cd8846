"""Generate stage (actor pool, one loaded pipeline per actor): rows -> images.

Needs: row_id, status, prompt, params, seed, source_ref and the task's image columns.
Adds:  image (HWC uint8), image_index, sampler, generate_s; one output row per image, so a
row asking `num_images_per_prompt=k` yields k rows. Failed and skipped rows pass through.

Rows share a pipeline call only when their size and every scalar parameter match; each image
gets its own generator seeded `seed + k`, so a row's image does not depend on its batch.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import torch

from pixfleet.config import ModelSpec
from pixfleet.generation import columns as C
from pixfleet.generation.images import empty_image, to_pil
from pixfleet.models.tasks import task_info

# Scheduler class -> the sampler name A1111 writes in its `parameters` text.
A1111_SAMPLERS = {
    "UniPCMultistepScheduler": "UniPC",
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "PNDMScheduler": "PLMS",
}
# Parameters that may differ between rows of one pipeline call.
_PER_ROW = {"prompt", "negative_prompt", "seed"}


def batch_key(row: dict[str, Any]) -> str:
    """Rows with equal keys can share one pipeline call."""
    params = json.loads(row[C.PARAMS])
    shared = {k: v for k, v in params.items() if k not in _PER_ROW}
    shared["has_negative_prompt"] = params["negative_prompt"] is not None
    shared["size"] = _size_of(row)
    return json.dumps(shared, sort_keys=True)


def _size_of(row: dict[str, Any]) -> list[int]:
    image = row.get(C.SOURCE_IMAGE, row.get(C.control_column(0)))
    return [int(image.shape[1]), int(image.shape[0])]  # width, height


class GenerateStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, spec: ModelSpec, image_columns: list[str]):
        from pixfleet.models.loading import load_pipeline, resolve_device

        self.info = task_info(spec.task)
        self.num_controlnets = spec.num_controlnets
        self.device = resolve_device(spec.device)
        self.pipe = load_pipeline(spec)
        self.pipe.set_progress_bar_config(disable=True)
        self.accepts_size = "height" in inspect.signature(self.pipe.__call__).parameters
        self.sampler = A1111_SAMPLERS.get(type(self.pipe.scheduler).__name__, "")
        self.image_columns = image_columns
        self.needs = [C.ROW_ID, C.STATUS, C.PROMPT, C.PARAMS, C.SEED, C.SOURCE_REF, *image_columns]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "generate stage")
        rows = batch.drop(columns=self.image_columns).to_dict("records")
        for row, images in zip(rows, batch[self.image_columns].to_dict("records"), strict=True):
            row.update(images)
        groups: dict[str, list[dict]] = defaultdict(list)
        outputs = []
        for row in rows:
            if row[C.STATUS] == C.OK:
                groups[batch_key(row)].append(row)
            else:
                outputs.append(self._output(row, 0, empty_image(), 0.0))
        for group in groups.values():
            outputs += self._generate(group)
        return pd.DataFrame(outputs)

    def _generate(self, rows: list[dict]) -> list[dict]:
        params = json.loads(rows[0][C.PARAMS])
        n = params["num_images_per_prompt"]
        start = time.perf_counter()
        try:
            images = self.pipe(**self.call_kwargs(rows, params)).images
        except Exception as error:  # the rows fail with the reason; the job goes on
            reason = f"pipeline error: {type(error).__name__}: {error}".splitlines()[0]
            return [self._output({**r, C.STATUS: C.FAILED, C.ERROR: reason}, 0, empty_image(), 0.0) for r in rows]
        seconds = (time.perf_counter() - start) / len(rows)
        # Same float -> uint8 rounding as diffusers' numpy_to_pil.
        images = (images * 255).round().astype(np.uint8)
        return [self._output(row, k, images[i * n + k], seconds) for i, row in enumerate(rows) for k in range(n)]

    def call_kwargs(self, rows: list[dict], params: dict[str, Any]) -> dict[str, Any]:
        """The arguments a user would pass to the diffusers pipeline for these rows."""
        n = params["num_images_per_prompt"]
        kwargs: dict[str, Any] = {
            "prompt": [r[C.PROMPT] for r in rows],
            "num_inference_steps": params["num_inference_steps"],
            "guidance_scale": params["guidance_scale"],
            "num_images_per_prompt": n,
            "generator": [torch.Generator(self.device).manual_seed(r[C.SEED] + k) for r in rows for k in range(n)],
            "output_type": "np",
        }
        if params["negative_prompt"] is not None:
            kwargs["negative_prompt"] = [json.loads(r[C.PARAMS])["negative_prompt"] for r in rows]
        if self.accepts_size:
            kwargs["width"], kwargs["height"] = _size_of(rows[0])
        if self.info.uses_controlnet:
            for name in (
                "controlnet_conditioning_scale",
                "control_guidance_start",
                "control_guidance_end",
            ):
                kwargs[name] = params[name] if self.num_controlnets > 1 else params[name][0]
            kwargs["guess_mode"] = params["guess_mode"]
            controls = self._control_images(rows)
            if self.info.needs_source_image:
                kwargs["control_image"] = controls
            else:
                kwargs["image"] = controls
        if self.info.needs_source_image:
            kwargs["image"] = [to_pil(r[C.SOURCE_IMAGE]) for r in rows]
            if self.info.uses_controlnet:
                kwargs["strength"] = params["strength"]
            else:
                kwargs["image_guidance_scale"] = params["image_guidance_scale"]
        if self.info.needs_mask:
            kwargs["mask_image"] = [to_pil(r[C.MASK_IMAGE]) for r in rows]
        return kwargs

    def _control_images(self, rows: list[dict]) -> list:
        if self.num_controlnets == 1:
            return [to_pil(r[C.control_column(0)]) for r in rows]
        # diffusers takes one batch per ControlNet only as a tensor, in [0, 1] like its PIL path.
        return [
            torch.from_numpy(np.stack([r[C.control_column(i)] for r in rows])).permute(0, 3, 1, 2).float() / 255
            for i in range(self.num_controlnets)
        ]

    def _output(self, row: dict, index: int, image: np.ndarray, seconds: float) -> dict[str, Any]:
        seed = row[C.SEED] + index if row[C.STATUS] == C.OK else row[C.SEED]
        return {
            C.ROW_ID: row[C.ROW_ID],
            C.IMAGE_INDEX: index,
            C.SOURCE_REF: row[C.SOURCE_REF],
            C.STATUS: row[C.STATUS],
            C.ERROR: row[C.ERROR],
            C.PROMPT: row[C.PROMPT],
            C.PARAMS: row[C.PARAMS],
            C.SEED: seed,
            C.IMAGE: image,
            "sampler": self.sampler,
            C.GENERATE_SECONDS: seconds,
        }
