"""Helpers shared by tests: tiny model specs and direct pipeline calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pixfleet.config import ModelSpec
from pixfleet.models.tasks import TASKS

MULTI_CONTROLNET_TASKS = {"sdxl_controlnet"}


def tiny_spec(tiny_dir: Path, task: str, **overrides) -> ModelSpec:
    """A ModelSpec of the tiny `task` pipeline saved under `tiny_dir`."""
    names = ["controlnet", "controlnet_1"] if task in MULTI_CONTROLNET_TASKS else ["controlnet"]
    controlnets = [str(tiny_dir / task / n) for n in names] if TASKS[task].uses_controlnet else []
    return ModelSpec(task=task, base_model=str(tiny_dir / task), controlnets=controlnets, **overrides)


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A seeded noise RGB image of (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def call_tiny(pipe, task: str, prompts: list[str], seeds: list[int], size=(64, 64), **params):
    """Call `pipe` directly, as a user would, on seeded noise inputs; returns uint8 images.

    Control maps and source images are `random_image(seed)` of `size`; the mask keeps the
    left half. Built independently of pixfleet's own argument plumbing, as a reference.
    """
    import inspect

    import torch

    info = TASKS[task]
    width, height = size
    controls = [random_image(s, size) for s in seeds]
    kwargs = {"prompt": prompts, "num_inference_steps": 2, "output_type": "np", **params}
    kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    if "height" in inspect.signature(pipe.__call__).parameters:
        kwargs.update(height=height, width=width)
    if task in MULTI_CONTROLNET_TASKS:
        batch = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in controls])
        kwargs["image"] = [batch.float() / 255] * 2
    elif task == "controlnet":
        kwargs["image"] = controls
    elif info.uses_controlnet:
        kwargs["image"] = [random_image(s + 1000, size) for s in seeds]
        kwargs["control_image"] = controls
    else:
        kwargs["image"] = controls
    if info.needs_mask:
        mask = np.zeros((height, width), np.uint8)
        mask[:, : width // 2] = 255
        kwargs["mask_image"] = [Image.fromarray(mask)] * len(seeds)
    images = pipe(**kwargs).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
