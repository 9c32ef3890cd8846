"""What a model folder must hold, checked from its JSON files and its weight files' headers alone:
drivers check a job's models before any work without importing torch or diffusers (seconds of
every command's start-up), and a weight file cut short (a copy or download that stopped) is
named here rather than by a traceback from `from_pretrained` inside an actor."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from pixfleet.config.model import ModelSpec
from pixfleet.config.paths import looks_local
from pixfleet.errors import UserError
from pixfleet.models.tasks import task_info


class ModelLoadError(UserError, ValueError):
    """A model that cannot be loaded for its task; the message names the folder and the part."""


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
        for component in index:
            check_weight_files(Path(base_model).expanduser() / component)
    for path in controlnets:
        if looks_local(path) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise ModelLoadError(f"{path}: no config.json (not a ControlNet folder)")
        if looks_local(path):
            check_weight_files(Path(path).expanduser())


def check_weight_files(folder: Path) -> None:
    """Each safetensors file in `folder` holds the bytes its header describes (the file's first
    8 bytes give the header's length N, the next N bytes are JSON giving each tensor's byte range)."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        if problem := _weight_file_problem(file):
            raise ModelLoadError(f"{file}: {problem}")


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _weight_file_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else MAX_HEADER_BYTES + 1
        if header_size > MAX_HEADER_BYTES:
            return "not a safetensors file (no header length in its first 8 bytes)"
        if 8 + header_size > size:
            return f"cut short: {size} bytes, its header alone takes {8 + header_size} (an unfinished copy?)"
        try:
            header = json.loads(f.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            return "not a safetensors file (its header is not the JSON of its tensors)"
    if size < 8 + header_size + end:
        return f"cut short: {size} bytes, its header describes {8 + header_size + end} (an unfinished copy?)"
    return None


def _unet_in_channels(folder: str) -> int | None:
    config_path = os.path.join(os.path.expanduser(folder), "unet", "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return json.load(f).get("in_channels")


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
