"""Per-row parameters, seeds and row ids: derived so that results do not depend on batching."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import ValidationError

from pixfleet.config import GenerationJobConfig, GenerationParams, ModelSpec
from pixfleet.generation.images import RowError
from pixfleet.models.tasks import task_info

# Parameters only some tasks' pipelines take.
TASK_SPECIFIC = (
    "image_guidance_scale",
    "strength",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
)
PER_CONTROLNET = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def resolve_params(
    defaults: GenerationParams, row: Mapping[str, Any], task: str, num_controlnets: int
) -> dict[str, Any]:
    """Config defaults overridden by the row's own values, validated, with every unset value
    taken from the task's pipeline.

    Per-ControlNet values become lists of `num_controlnets` floats, so every row has the same
    shape of parameters; parameters the task does not use are None.
    """
    try:
        params = GenerationParams.model_validate({**defaults.model_dump(), **row_overrides(row)})
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(p) for p in problem["loc"])
        raise RowError(f"parameter {field}: {problem['msg']}") from None
    resolved = params.model_dump()
    pipeline_defaults = pipeline_call_defaults(task)
    for name, value in resolved.items():
        if name in pipeline_defaults:
            resolved[name] = pipeline_defaults[name] if value is None else value
        elif name in TASK_SPECIFIC:
            resolved[name] = None  # the task's pipeline has no such argument
    for name in PER_CONTROLNET:
        value = resolved[name]
        if value is None:
            resolved[name] = []
            continue
        values = value if isinstance(value, list) else [float(value)] * num_controlnets
        if len(values) != num_controlnets:
            raise RowError(f"parameter {name}: {len(values)} values for {num_controlnets} controlnet(s)")
        resolved[name] = [float(v) for v in values]
    return resolved


@functools.cache
def pipeline_call_defaults(task: str) -> dict[str, Any]:
    """The defaults of the task's pipeline `__call__`, for the parameters pixfleet exposes."""
    signature = inspect.signature(task_info(task).pipeline_class.__call__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name in GenerationParams.model_fields and p.default is not inspect.Parameter.empty
    }


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What makes two models produce different images (for hashing and manifests)."""
    fields = {"task", "base_model", "controlnets", "scheduler", "dtype", "variant", "revision"}
    return {**spec.model_dump(include=fields), "loras": [lora.model_dump() for lora in spec.loras]}


def job_fingerprint(job: GenerationJobConfig) -> str:
    """Everything besides a row's own inputs that decides its images."""
    return json.dumps(
        {
            "model": model_identity(job.model),
            "preprocess": job.preprocess.model_dump(),
            "params": job.params.model_dump(),
            "seed": job.seed,
        },
        sort_keys=True,
    )


def row_overrides(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's own parameter values (prompt included), before defaults and validation.

    Missing values (None, NaN from a sparse table column) fall back to the defaults; numpy
    scalars and arrays from Arrow become plain Python values.
    """
    overrides = {}
    for name in GenerationParams.model_fields:
        value = row.get(name)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        overrides[name] = value
    return overrides


def content_row_id(images: list[bytes | None], overrides: Mapping[str, Any], job: str) -> str:
    """A hash of everything that decides the output: input bytes, the row's own parameters,
    and the job's fingerprint (model, preprocessing, parameter defaults, job seed)."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(hashlib.sha256(data or b"").digest())
    digest.update(json.dumps(overrides, sort_keys=True, default=str).encode())
    digest.update(job.encode())
    return digest.hexdigest()[:24]


def check_row_id(value: Any) -> str:
    """A row id from the source, usable as a file name."""
    text = str(value)
    if not _SAFE_ID.match(text):
        raise RowError(f"row id {text!r}: use letters, digits, '.', '_', '-' (max 128)")
    return text


def derive_seed(job_seed: int, row_id: str) -> int:
    """A 63-bit seed from the job seed and the row id: independent of batch, order, actor."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
