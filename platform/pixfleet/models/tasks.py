"""Task names and the diffusers pipeline each one runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskName = Literal[
    "controlnet",
    "controlnet_img2img",
    "controlnet_inpaint",
    "sdxl_controlnet",
    "pix2pix",
    "sdxl_pix2pix",
]


@dataclass(frozen=True)
class TaskInfo:
    """What a task runs and which images each row must carry."""

    pipeline_class_name: str
    sdxl: bool
    uses_controlnet: bool
    needs_source_image: bool
    needs_mask: bool

    @property
    def pipeline_class(self) -> type:
        import diffusers  # deferred: configs validate task names without loading diffusers

        return getattr(diffusers, self.pipeline_class_name)


TASKS: dict[str, TaskInfo] = {
    "controlnet": TaskInfo("StableDiffusionControlNetPipeline", False, True, False, False),
    "controlnet_img2img": TaskInfo("StableDiffusionControlNetImg2ImgPipeline", False, True, True, False),
    "controlnet_inpaint": TaskInfo("StableDiffusionControlNetInpaintPipeline", False, True, True, True),
    "sdxl_controlnet": TaskInfo("StableDiffusionXLControlNetPipeline", True, True, False, False),
    "pix2pix": TaskInfo("StableDiffusionInstructPix2PixPipeline", False, False, True, False),
    "sdxl_pix2pix": TaskInfo("StableDiffusionXLInstructPix2PixPipeline", True, False, True, False),
}


def task_info(task: str) -> TaskInfo:
    """The TaskInfo of `task`, or a ValueError listing the known task names."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None
