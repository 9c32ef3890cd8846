"""The published SD 1.5 and SDXL models that `pixfleet models make-random` rebuilds.

Each is the architecture of a published checkpoint: `runwayml/stable-diffusion-v1-5` with
`lllyasviel/sd-controlnet-*` (and its inpaint ControlNet), `timbrooks/instruct-pix2pix`,
`stabilityai/stable-diffusion-xl-base-1.0` with `diffusers/controlnet-canny-sdxl-1.0`, and
`diffusers/sdxl-instructpix2pix-768`. `random_weights` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pixfleet.models.tasks import TaskName

Family = Literal["sd15", "sdxl"]
ArchName = Literal["sd15-controlnet", "sd15-controlnet-inpaint", "sd15-pix2pix", "sdxl-controlnet", "sdxl-pix2pix"]


@dataclass(frozen=True)
class Architecture:
    """One published model: its family (SD 1.5 or SDXL), the task it runs, its UNet's input."""

    family: Family
    task: TaskName
    unet_in_channels: int = 4
    unet_sample_size: int | None = None  # the family's default unless the model was trained smaller


ARCHITECTURES: dict[str, Architecture] = {
    "sd15-controlnet": Architecture("sd15", "controlnet"),
    "sd15-controlnet-inpaint": Architecture("sd15", "controlnet_inpaint"),
    "sd15-pix2pix": Architecture("sd15", "pix2pix", unet_in_channels=8),
    "sdxl-controlnet": Architecture("sdxl", "sdxl_controlnet"),
    "sdxl-pix2pix": Architecture("sdxl", "sdxl_pix2pix", unet_in_channels=8, unet_sample_size=96),
}
assert set(ARCHITECTURES) == set(get_args(ArchName))

# Published parameter counts, in millions (the numbers the model cards and papers give).
PUBLISHED_PARAMETERS_M = {
    ("sd15", "unet"): 859.5,
    ("sd15", "controlnet"): 361.3,
    ("sd15", "text_encoder"): 123.1,
    ("sd15", "vae"): 83.7,
    ("sdxl", "unet"): 2567.5,
    ("sdxl", "text_encoder_2"): 694.7,
    ("sdxl", "vae"): 83.7,
}


def architecture(arch: str) -> Architecture:
    """The Architecture named `arch`, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
