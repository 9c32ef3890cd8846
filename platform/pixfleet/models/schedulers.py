"""Schedulers by the short names configs use."""

from __future__ import annotations

import diffusers

SCHEDULERS: dict[str, tuple[type, dict]] = {
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
}


def swap_scheduler(pipe: diffusers.DiffusionPipeline, name: str) -> None:
    """Replace `pipe.scheduler` by scheduler `name`, keeping the model's noise schedule."""
    scheduler_class, extra = SCHEDULERS[name]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
