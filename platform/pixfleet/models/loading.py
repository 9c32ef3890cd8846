"""Load a ModelSpec into a ready diffusers pipeline, the way a user would by hand."""

from __future__ import annotations

import json
import os

import diffusers
import torch
from diffusers import ControlNetModel, MultiControlNetModel

from pixfleet.config.model import ModelSpec
from pixfleet.config.paths import looks_local
from pixfleet.console import quiet_model_loading
from pixfleet.errors import UserError
from pixfleet.models.optimizations import apply_optimizations
from pixfleet.models.schedulers import swap_scheduler
from pixfleet.models.tasks import TASKS, task_info

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(UserError, ValueError):
    """A model that cannot be loaded for its task; the message names the folder and the part."""


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


def required_components(task: str) -> list[str]:
    """Components the base folder of `task` must hold (ControlNets come from the spec)."""
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if task_info(task).sdxl:
        names += ["text_encoder_2", "tokenizer_2"]
    return names


def check_model_folders(spec: ModelSpec) -> None:
    """Fail fast, before any work, on a local folder that lacks what the task needs."""
    check_model_folder(spec.base_model, spec.task, spec.controlnets)


def check_model_folder(base_model: str, task: str, controlnets: list[str]) -> None:
    """`check_model_folders` for a base model and ControlNets not (yet) in a ModelSpec."""
    if looks_local(base_model):
        index_path = os.path.join(os.path.expanduser(base_model), "model_index.json")
        if not os.path.isfile(index_path):
            raise ModelLoadError(f"{base_model}: no model_index.json (not a diffusers pipeline)")
        with open(index_path) as f:
            index = json.load(f)
        missing = [name for name in required_components(task) if not index.get(name, [None])[0]]
        if missing:
            raise ModelLoadError(f"{base_model}: task {task!r} needs component(s) {', '.join(missing)}")
        if task.endswith("pix2pix") and _unet_in_channels(base_model) != 8:
            raise ModelLoadError(f"{base_model}: task {task!r} needs an 8-channel UNet")
    for path in controlnets:
        if looks_local(path) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise ModelLoadError(f"{path}: no config.json (not a ControlNet folder)")


def _unet_in_channels(folder: str) -> int | None:
    config_path = os.path.join(os.path.expanduser(folder), "unet", "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return json.load(f).get("in_channels")


def import_pipeline_classes() -> None:
    """Import what diffusers and transformers import lazily on a first `from_pretrained` (the
    pipeline classes, ControlNet, CLIP): seconds of work a process can do before it is given a
    model, so that loading one only reads weights."""
    import transformers

    for info in TASKS.values():
        _ = info.pipeline_class
    _ = (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.CLIPTokenizer)


def fetch_model_files(spec: ModelSpec) -> ModelSpec:
    """`spec` with its models in object storage (`s3://...`) replaced by this node's copies,
    downloaded once per node and cached: what `from_pretrained` and the folder checks need."""
    from pixfleet.models.registry import local_model

    return spec.model_copy(
        update={
            "base_model": local_model(spec.base_model, ""),
            "controlnets": [local_model(c, "") for c in spec.controlnets],
            "loras": [lora.model_copy(update={"path": local_model(lora.path, "")}) for lora in spec.loras],
            "textual_inversions": [
                ti.model_copy(update={"path": local_model(ti.path, "")}) for ti in spec.textual_inversions
            ],
        }
    )


def load_pipeline(spec: ModelSpec) -> diffusers.DiffusionPipeline:
    """Load `spec` through `from_pretrained`, then apply scheduler, switches and adapters."""
    quiet_model_loading()
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
        controlnets = [ControlNetModel.from_pretrained(p, **load_kwargs) for p in spec.controlnets]
        pipe_kwargs["controlnet"] = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
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
