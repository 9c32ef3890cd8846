"""Validation images during training: the current ControlNet in a full pipeline, one grid."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import torch
from PIL import Image

from pixfleet.config.training import ControlNetTrainingArgs
from pixfleet.data.tables import read_image_bytes

if TYPE_CHECKING:
    from pixfleet.training.components import Components


def validation_pairs(args: ControlNetTrainingArgs) -> list[tuple[str, str]]:
    """(prompt, control image path) pairs; a single prompt or image is reused, as the script does."""
    prompts, images = list(args.validation_prompt), list(args.validation_image)
    if len(images) == 1:
        images = images * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    return list(zip(prompts, images, strict=True))


@torch.no_grad()
def validation_grid(parts: Components, controlnet, args: ControlNetTrainingArgs) -> Image.Image:
    """One row per pair: the control image, then `num_validation_images` samples."""
    pipe = parts.validation_pipeline(controlnet)
    pipe.set_progress_bar_config(disable=True)
    size = args.resolution
    was_training = controlnet.training
    controlnet.eval()
    rows = []
    for prompt, image_path in validation_pairs(args):
        control = Image.open(io.BytesIO(read_image_bytes(image_path))).convert("RGB").resize((size, size))
        generator = torch.Generator().manual_seed(args.seed or 0)
        images = pipe(
            [prompt] * args.num_validation_images,
            image=control,
            num_inference_steps=20,
            generator=generator,
            height=size,
            width=size,
        ).images
        rows.append([control, *images])
    controlnet.train(was_training)
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * size, r * size))
    return grid
