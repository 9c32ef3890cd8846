"""Per-row parameters, seeds and row ids: derived so that results do not depend on batching.

A row's seed derives from the job seed and what the row brings (its images' bytes and its own
parameters, or the id the source gives it), never from the model or where files lie: the same
input keeps its seed when the model changes or moves. Its id adds the job's fingerprint (model
content, preprocessing, defaults), so a rerun recognises exactly the rows it already made.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pixfleet.config import GenerationParams
from pixfleet.config.generation import PER_CONTROLNET, broadcast, check_guidance_window, given_parameters
from pixfleet.config.loading import describe_errors
from pixfleet.engine.images import RowError
from pixfleet.models.tasks import task_info, unused_parameters

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULTS_CACHE = Path.home() / ".cache" / "pixfleet" / "pipeline_defaults"


def resolve_params(
    defaults: GenerationParams,
    overrides: Mapping[str, Any],
    task: str,
    num_controlnets: int,
    pipeline_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Config defaults overridden by the row's own values, validated, with every unset value
    taken from the task's pipeline; RowError naming the parameter when one cannot work.

    Per-ControlNet values become lists of `num_controlnets` floats, so every row has the same
    shape of parameters; parameters the task does not take are None, and a row that sets one
    is refused rather than silently ignored. `pipeline_defaults` (`pipeline_call_defaults(task)`,
    read once where diffusers is imported anyway) spares light workers importing it.
    """
    unused = unused_parameters(task, given_parameters(overrides))
    if unused:
        raise RowError(f"parameter {unused[0]}: task {task!r} does not take this parameter")
    try:
        params = GenerationParams.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as error:
        field, message = describe_errors(error.errors())[0]
        raise RowError(f"parameter {field}: {message}") from None
    resolved = params.model_dump()
    pipeline_defaults = pipeline_call_defaults(task) if pipeline_defaults is None else pipeline_defaults
    taken = task_info(task).parameters
    for name, value in resolved.items():
        if name not in taken:
            resolved[name] = None
        elif value is None and name in pipeline_defaults:
            resolved[name] = pipeline_defaults[name]
    for name in PER_CONTROLNET:
        value = resolved[name]
        values = [] if value is None else broadcast(value if isinstance(value, list) else [value], num_controlnets)
        if len(values) != num_controlnets and name in taken:
            raise RowError(f"parameter {name}: {len(values)} values for {num_controlnets} controlnet(s)")
        resolved[name] = [float(v) for v in values]
    if resolved["control_guidance_start"]:
        try:  # again with the pipeline's defaults filled in: a row's start may pass the default end
            check_guidance_window(resolved["control_guidance_start"], resolved["control_guidance_end"])
        except ValueError as error:
            raise RowError(f"parameter control_guidance_start: {error}") from None
    return resolved


@functools.cache
def pipeline_call_defaults(task: str) -> dict[str, Any]:
    """The defaults of the task's pipeline `__call__`, for the parameters pixfleet exposes.

    Read from the signature once per diffusers version and kept in ~/.cache/pixfleet: importing
    a pipeline's module costs a job's driver, or a serving ingress, 3-5 s at every start."""
    cached = DEFAULTS_CACHE / f"diffusers-{importlib.metadata.version('diffusers')}" / f"{task}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cached.read_text())
    signature = inspect.signature(task_info(task).pipeline_class.__call__)
    defaults = {
        name: p.default
        for name, p in signature.parameters.items()
        if name in GenerationParams.model_fields and p.default is not inspect.Parameter.empty
    }
    with contextlib.suppress(OSError, TypeError):  # not kept when unwritable or not JSON
        text = json.dumps(defaults)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(text)
        staging.replace(cached)  # whole or absent for a process reading it meanwhile
        return json.loads(text)  # as a later start reads it
    return defaults


def input_key(images: list[bytes | None], overrides: Mapping[str, Any]) -> str:
    """A hash of what a row brings: its images' bytes and its own parameters (prompt included)."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(hashlib.sha256(data or b"").digest())
    digest.update(json.dumps(overrides, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def row_id_for(key: str, job_fingerprint: str) -> str:
    """A row id from the row's key (`input_key`, or its source reference) and everything else
    that decides its images: 24 hex digits."""
    return hashlib.sha256(f"{key}|{job_fingerprint}".encode()).hexdigest()[:24]


def check_row_id(value: Any) -> str:
    """A row id from the source, usable as a file name."""
    text = str(value)
    if not _SAFE_ID.match(text):
        raise RowError(f"row id {text!r}: use letters, digits, '.', '_', '-' (max 128)")
    return text


def derive_seed(job_seed: int, key: str) -> int:
    """A 63-bit seed from the job seed and a row's key: independent of batch, order, actor, model."""
    digest = hashlib.sha256(f"{job_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
