"""Load a ModelSpec into a ready diffusers pipeline, the way a user would by hand."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import diffusers
import torch
from diffusers import ControlNetModel, MultiControlNetModel

from pixfleet.config.model import ModelSpec
from pixfleet.console import quiet_libraries
from pixfleet.errors import one_line
from pixfleet.models.folders import ModelLoadError, check_model_folders, fetch_model_files
from pixfleet.models.optimizations import apply_optimizations
from pixfleet.models.schedulers import swap_scheduler
from pixfleet.models.tasks import TASKS, task_info

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (diffusers' own recipe for these models), float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# diffusers' refusal of weights whose shapes differ from the config; the advice it appends
# (load them anyway, random weights in their place) is not something a job can want.
_SHAPE_MISMATCH = re.compile(
    r"Cannot load .*? because (\S+) expected shape torch\.Size\((\[.*?\])\), but got torch\.Size\((\[.*?\])\)"
)


@contextlib.contextmanager
def loading(model: str, what: str) -> Iterator[None]:
    """A model the folder checks passed that `from_pretrained` still refuses (weights that do not
    fit their config, a hub id that does not exist, memory) fails as one line naming it."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{model}: cannot be loaded as {what}: {_load_failure(error)}") from error


def _load_failure(error: BaseException) -> str:
    mismatch = _SHAPE_MISMATCH.search(str(error))
    if mismatch is None:
        return one_line(error)
    name, expected, found = mismatch.groups()
    return f"weights that do not fit their config.json: {name} is {found} in the weights, {expected} by config"


def import_pipeline_classes() -> None:
    """Import what diffusers and transformers import lazily on a first `from_pretrained` (the
    pipeline classes, ControlNet, CLIP): seconds of work a process can do before it is given a
    model, so that loading one only reads weights."""
    import transformers

    for info in TASKS.values():
        _ = info.pipeline_class
    _ = (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.CLIPTokenizer)


def load_pipeline(spec: ModelSpec) -> diffusers.DiffusionPipeline:
    """Load `spec` through `from_pretrained`, then apply scheduler, switches and adapters."""
    quiet_libraries()
    spec = fetch_model_files(spec)
    check_model_folders(spec)
    info = task_info(spec.task)
    device = resolve_device(spec.device)
    load_kwargs = {
        "dtype": resolve_dtype(spec.dtype, device),
        "use_safetensors": spec.use_safetensors,
        "variant": spec.variant,
        "revision": spec.revision,
    }
    pipe_kwargs = {}
    if info.uses_controlnet:
        controlnets = []
        for path in spec.controlnets:
            with loading(path, "a ControlNet"):
                controlnets.append(ControlNetModel.from_pretrained(path, **load_kwargs))
        pipe_kwargs["controlnet"] = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    with loading(spec.base_model, f"the base model of task {spec.task!r}"):
        pipe = info.pipeline_class.from_pretrained(spec.base_model, **load_kwargs, **pipe_kwargs)

    if spec.scheduler is not None:
        swap_scheduler(pipe, spec.scheduler)
    if spec.loras:
        adapters = [lora.adapter_name or f"lora_{i}" for i, lora in enumerate(spec.loras)]
        for lora, adapter in zip(spec.loras, adapters, strict=True):
            pipe.load_lora_weights(lora.path, weight_name=lora.weight_name, adapter_name=adapter)
        pipe.set_adapters(adapters, adapter_weights=[lora.scale for lora in spec.loras])
    for embedding in spec.textual_inversions:
        pipe.load_textual_inversion(embedding.path, token=embedding.token)
    apply_optimizations(pipe, spec.optimizations, device, has_loras=bool(spec.loras))
    return pipe
