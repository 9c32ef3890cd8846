"""One loaded pipeline and the rows it runs: the call a user would write, shared by the
bulk generation stage and the serving replicas so both give the same image for a seed.

A row is a dict with prompt, params (JSON from `resolve_params`), seed and the task's
prepared image columns (HWC uint8). Rows share a pipeline call only when their size and
every scalar parameter match; each image gets its own generator seeded `seed + k`, so a
row's image does not depend on its batch. Generators live on the CPU, as diffusers advises
for results that do not depend on the device.

Images whose size is not a multiple of the VAE's scale factor are resized down to one with
Lanczos, exactly as the pipeline's own image processor would, so the call is the one a user
would write with the same images.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import numpy as np
import torch

from pixfleet.config import GenerationParams, ModelSpec
from pixfleet.engine import columns as C
from pixfleet.engine.batching import image_size
from pixfleet.engine.params import resolve_params
from pixfleet.engine.preprocess import fit_pil, generated_size, size_multiple, to_pil
from pixfleet.models.tasks import task_info

# Scheduler class -> the sampler name A1111 writes in its `parameters` text.
A1111_SAMPLERS = {
    "UniPCMultistepScheduler": "UniPC",
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "PNDMScheduler": "PLMS",
}


class DeadlineExceeded(TimeoutError):
    """A pipeline call stopped between steps because its deadline passed."""


def _sized(image: np.ndarray, size: tuple[int, int]):
    """A PIL image at `size`, resized as the pipeline's image processor resizes (Lanczos)."""
    return fit_pil(to_pil(image), *size, mode="resize", resample="lanczos")


class PipelineRunner:
    """A loaded diffusers pipeline of one task, called on groups of rows."""

    def __init__(self, pipe: Any, task: str, num_controlnets: int, device: torch.device):
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.task = task
        self.info = task_info(task)
        self.num_controlnets = num_controlnets
        self.device = device
        call_parameters = inspect.signature(pipe.__call__).parameters
        self.accepts_size = "height" in call_parameters
        self.step_callback_style = "on_step_end" if "callback_on_step_end" in call_parameters else "legacy"
        self.sampler = A1111_SAMPLERS.get(type(pipe.scheduler).__name__, "")
        self.size_multiple = size_multiple(task, pipe.vae_scale_factor)

    @classmethod
    def load(cls, spec: ModelSpec) -> PipelineRunner:
        from pixfleet.models.loading import load_pipeline, resolve_device

        return cls(load_pipeline(spec), spec.task, spec.num_controlnets, resolve_device(spec.device))

    def working_size(self, row: dict[str, Any]) -> tuple[int, int]:
        """(width, height) the pipeline generates for `row`: its images' size rounded down to the
        VAE's multiple, as diffusers' `get_default_height_width` rounds it (to 8 for inpainting)."""
        return generated_size(*image_size(row), self.size_multiple)

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt (start and end included); past `max_prompt_tokens` the text
        encoder sees only the first ones (diffusers truncates, with a warning in its log)."""
        return [len(ids) for ids in self.pipe.tokenizer(prompts).input_ids]

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: its UNet's latent size times the VAE's factor."""
        side = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return side, side

    def warm_up(self, width: int, height: int, batch_size: int = 1, steps: int = 2) -> float:
        """One call on blank images at the size and batch the work comes in, so compilation and
        a GPU's first-call set-up happen before the first real row; returns its seconds."""
        params = resolve_params(GenerationParams(), {"num_inference_steps": steps}, self.task, self.num_controlnets)
        blank = np.zeros((height, width, 3), np.uint8)
        images = {C.control_column(i): blank for i in range(self.num_controlnets)}
        if self.info.needs_source_image:
            images[C.SOURCE_IMAGE] = blank
        if self.info.needs_mask:
            images[C.MASK_IMAGE] = blank
        rows = [{C.PROMPT: "", C.SEED: 0, C.PARAMS: json.dumps(params), **images}] * batch_size
        start = time.perf_counter()
        self.generate(rows)
        return time.perf_counter() - start

    def with_controlnet(self, controlnet: Any) -> PipelineRunner:
        """A runner whose pipeline swaps in `controlnet` and shares every other component."""
        pipe = type(self.pipe)(**{**self.pipe.components, "controlnet": controlnet})
        return PipelineRunner(pipe, self.task, self.num_controlnets, self.device)

    def generate(self, rows: list[dict[str, Any]], deadline: float | None = None) -> np.ndarray:
        """Images of one group of rows (`group_rows`), `num_images_per_prompt` per row in row
        order, as uint8 NHWC. Past `deadline` (a `time.time()` value) the call stops between
        steps with DeadlineExceeded instead of holding the pipeline."""
        params = json.loads(rows[0][C.PARAMS])
        kwargs = self.call_kwargs(rows, params)
        if deadline is not None:
            kwargs.update(self._deadline_callback(deadline))
        images = self.pipe(**kwargs).images
        # Same float -> uint8 rounding as diffusers' numpy_to_pil.
        return (images * 255).round().astype(np.uint8)

    def call_kwargs(self, rows: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        """The arguments a user would pass to the diffusers pipeline for these rows."""
        n = params["num_images_per_prompt"]
        kwargs: dict[str, Any] = {
            "prompt": [r[C.PROMPT] for r in rows],
            "num_inference_steps": params["num_inference_steps"],
            "guidance_scale": params["guidance_scale"],
            "num_images_per_prompt": n,
            "generator": [torch.Generator().manual_seed(r[C.SEED] + k) for r in rows for k in range(n)],
            "output_type": "np",
        }
        if params["negative_prompt"] is not None:
            kwargs["negative_prompt"] = [json.loads(r[C.PARAMS])["negative_prompt"] for r in rows]
        size = self.working_size(rows[0])
        if self.accepts_size:
            kwargs["width"], kwargs["height"] = size
        if self.info.uses_controlnet:
            for name in (
                "controlnet_conditioning_scale",
                "control_guidance_start",
                "control_guidance_end",
            ):
                kwargs[name] = params[name] if self.num_controlnets > 1 else params[name][0]
            kwargs["guess_mode"] = params["guess_mode"]
            controls = self._control_images(rows, size)
            if self.info.needs_source_image:
                kwargs["control_image"] = controls
            else:
                kwargs["image"] = controls
        if self.info.needs_source_image:
            kwargs["image"] = [_sized(r[C.SOURCE_IMAGE], size) for r in rows]
            if self.info.uses_controlnet:
                kwargs["strength"] = params["strength"]
            else:
                kwargs["image_guidance_scale"] = params["image_guidance_scale"]
        if self.info.needs_mask:
            kwargs["mask_image"] = [_sized(r[C.MASK_IMAGE], size) for r in rows]
        return kwargs

    def _control_images(self, rows: list[dict], size: tuple[int, int]) -> list:
        if self.num_controlnets == 1:
            return [_sized(r[C.control_column(0)], size) for r in rows]
        # diffusers takes one batch per ControlNet only as a tensor, in [0, 1] like its PIL path.
        return [
            torch.from_numpy(np.stack([np.asarray(_sized(r[C.control_column(i)], size)) for r in rows]))
            .permute(0, 3, 1, 2)
            .float()
            / 255
            for i in range(self.num_controlnets)
        ]

    def _deadline_callback(self, deadline: float) -> dict[str, Any]:
        def check() -> None:
            if time.time() > deadline:
                raise DeadlineExceeded("request deadline passed during denoising")

        if self.step_callback_style == "on_step_end":

            def on_step_end(pipe, step, timestep, callback_kwargs):
                check()
                return callback_kwargs

            return {"callback_on_step_end": on_step_end}
        # SDXL InstructPix2Pix still has only the older per-step callback.
        return {"callback": lambda step, timestep, latents: check(), "callback_steps": 1}
