"""Task names and the diffusers pipeline each one runs."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

TaskName = Literal[
    "controlnet",
    "controlnet_img2img",
    "controlnet_inpaint",
    "sdxl_controlnet",
    "sdxl_controlnet_img2img",
    "sdxl_controlnet_inpaint",
    "pix2pix",
    "sdxl_pix2pix",
]


# Generation parameters every task's pipeline takes; the others belong to some tasks only.
COMMON_PARAMETERS = frozenset(
    {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "seed"}
)
CONTROLNET_PARAMETERS = frozenset(
    {"controlnet_conditioning_scale", "guess_mode", "control_guidance_start", "control_guidance_end"}
)
# Pipeline parts a built (not downloaded) pipeline leaves out.
_OPTIONAL_COMPONENTS = {
    "safety_checker": None,
    "feature_extractor": None,
    "image_encoder": None,
    "requires_safety_checker": False,
    "add_watermarker": False,
}


@dataclass(frozen=True)
class TaskInfo:
    """What a task runs and which images each row must carry."""

    pipeline_class_name: str
    sdxl: bool
    uses_controlnet: bool
    needs_source_image: bool
    needs_mask: bool

    @property
    def parameters(self) -> frozenset[str]:
        """The generation parameters (`GenerationParams` fields) this task's pipeline takes."""
        names = set(COMMON_PARAMETERS)
        if self.uses_controlnet:
            names |= CONTROLNET_PARAMETERS
            if self.needs_source_image:
                names.add("strength")
        elif self.needs_source_image:
            names.add("image_guidance_scale")
        return frozenset(names)

    @property
    def pipeline_class(self) -> type:
        import diffusers  # deferred: configs validate task names without loading diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def assemble(self, components: dict[str, Any]) -> Any:
        """The pipeline of this task from its models, tokenizers and scheduler, with the
        optional parts (safety checker, image encoder, watermarker) left out."""
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        optional = {name: value for name, value in _OPTIONAL_COMPONENTS.items() if name in accepted}
        return self.pipeline_class(**components, **optional)


TASKS: dict[str, TaskInfo] = {
    "controlnet": TaskInfo("StableDiffusionControlNetPipeline", False, True, False, False),
    "controlnet_img2img": TaskInfo("StableDiffusionControlNetImg2ImgPipeline", False, True, True, False),
    "controlnet_inpaint": TaskInfo("StableDiffusionControlNetInpaintPipeline", False, True, True, True),
    "sdxl_controlnet": TaskInfo("StableDiffusionXLControlNetPipeline", True, True, False, False),
    "sdxl_controlnet_img2img": TaskInfo("StableDiffusionXLControlNetImg2ImgPipeline", True, True, True, False),
    "sdxl_controlnet_inpaint": TaskInfo("StableDiffusionXLControlNetInpaintPipeline", True, True, True, True),
    "pix2pix": TaskInfo("StableDiffusionInstructPix2PixPipeline", False, False, True, False),
    "sdxl_pix2pix": TaskInfo("StableDiffusionXLInstructPix2PixPipeline", True, False, True, False),
}


def unused_parameters(task: str, names: Iterable[str]) -> list[str]:
    """The names among `names` that `task`'s pipeline does not take, in their order."""
    used = task_info(task).parameters
    return [name for name in names if name not in used]


def task_info(task: str) -> TaskInfo:
    """The TaskInfo of `task`, or a ValueError listing the known task names."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None
