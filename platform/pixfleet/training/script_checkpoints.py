"""Resuming from a `checkpoint-N/` folder that diffusers' training scripts wrote (accelerate's
`save_state`), for users who move their runs over.

The scripts' save hook puts the ControlNet in diffusers format under `controlnet/`; accelerate
adds `optimizer.bin` and `scheduler.bin` (torch state dicts; under DeepSpeed it writes its own
folder instead) and the step is the folder's suffix. The ControlNet is where training starts
(the driver points `controlnet_model_name_or_path` at it), the step count and the schedule
continue, and the optimizer's moments too where the layout is the same (torch AdamW over the
ControlNet's parameters, as the `ddp` strategy runs it).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pixfleet.config import ConfigError
from pixfleet.storage import Location

CONTROLNET_DIR = "controlnet"
OPTIMIZER_STATE = "optimizer.bin"
SCHEDULER_STATE = "scheduler.bin"
_NAME = re.compile(r"checkpoint-(\d+)")


def is_script_checkpoint(folder: str | Path) -> bool:
    """A `checkpoint-N/` the scripts write (looked at where it lies, a bucket too, unfetched)."""
    location = Location.of(folder)
    return bool(_NAME.fullmatch(location.name)) and (location / CONTROLNET_DIR / "config.json").is_file()


def script_checkpoint_controlnet(folder: str | Path) -> str:
    """The ControlNet folder inside, checked: the weights training starts from."""
    path = Path(folder) / CONTROLNET_DIR
    if not any(path.glob("diffusion_pytorch_model*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"train.resume_from_checkpoint: {path} holds a config but no weights")
    return str(path)


def script_checkpoint_step(folder: str | Path) -> int:
    """The optimizer steps the script had made: N of checkpoint-N."""
    return int(_NAME.fullmatch(Path(folder).name).group(1))


def load_script_checkpoint(strategy, folder: str | Path) -> int:
    """The schedule (and, with the ddp strategy, the optimizer) restored; the step reached."""
    folder = Path(folder)
    step = script_checkpoint_step(folder)
    if (folder / SCHEDULER_STATE).is_file():
        strategy.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_STATE, weights_only=False))
    optimizer = getattr(strategy, "optimizer", None)
    if (folder / OPTIMIZER_STATE).is_file() and isinstance(optimizer, torch.optim.Optimizer):
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_STATE, map_location="cpu", weights_only=False))
    return step
