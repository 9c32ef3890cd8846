"""Validation images during training: the current ControlNet in a full pipeline, one grid, and
with `validation_metrics`, their scores."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pixfleet.config.training import ControlNetTrainingArgs, ValidationMetricsConfig
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
def validation_images(parts: Components, controlnet, args: ControlNetTrainingArgs) -> list[ValidationRow]:
    """Each pair's control image and its `num_validation_images` samples, as the script makes them."""
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
        rows.append(ValidationRow(prompt, control, images))
    controlnet.train(was_training)
    return rows


@dataclass
class ValidationRow:
    prompt: str
    control: Image.Image
    images: list[Image.Image]


def validation_grid(rows: list[ValidationRow]) -> Image.Image:
    """One row per pair: the control image, then its samples."""
    size = rows[0].control.width
    grid = Image.new("RGB", (size * (1 + len(rows[0].images)), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate([row.control, *row.images]):
            grid.paste(image, (c * size, r * size))
    return grid


class ValidationScorer:
    """`validation_metrics`: the evaluation's scorers, loaded once (on the first validation),
    averaged over every validation image."""

    def __init__(self, config: ValidationMetricsConfig, device: torch.device):
        from pixfleet.evaluation.controllability import ControllabilityScorer
        from pixfleet.evaluation.metrics import ClipScorer

        self.controllability = ControllabilityScorer(config.control, device) if config.control else None
        self.clip = ClipScorer(config.clip_model, device) if config.clip_model else None

    def __call__(self, rows: list[ValidationRow]) -> dict[str, float]:
        images = [np.asarray(image) for row in rows for image in row.images]
        scores = {}
        if self.controllability:
            controls = [np.asarray(row.control) for row in rows for _ in row.images]
            scores[f"validation/control_0.{self.controllability.metric}"] = self.controllability(images, controls)
        if self.clip:
            prompts = [row.prompt for row in rows for _ in row.images]
            scores["validation/clip_score"] = self.clip.clip_scores(images, prompts).tolist()
        return {name: float(np.mean(values)) for name, values in scores.items()}
