"""Encode stage (CPU tasks): images -> PNG/JPEG/WebP bytes with their generation parameters.

Needs: image, prompt, params, seed, sampler, status.
Adds:  encoded (bytes; empty for rows that did not succeed), parameters (A1111 text).
PNGs carry the A1111 `parameters` text chunk, so existing tools read how an image was made.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
from PIL import Image, PngImagePlugin

from pixfleet.config import SinkConfig
from pixfleet.generation import columns as C

ENCODED = "encoded"
PARAMETERS_TEXT = "parameters"


def a1111_parameters(
    prompt: str, params: dict[str, Any], seed: int, sampler: str, size: tuple[int, int], model: dict
) -> str:
    """The text A1111 writes: prompt, `Negative prompt:` line, then `Key: value` pairs."""
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = {
        "Steps": params["num_inference_steps"],
        "Sampler": sampler,
        "CFG scale": params["guidance_scale"],
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model["base_model"],
    }
    if model["task"] in ("controlnet_img2img", "controlnet_inpaint"):
        pairs["Denoising strength"] = params["strength"]
    if model["task"].endswith("pix2pix"):
        pairs["Image CFG scale"] = params["image_guidance_scale"]
    for i, controlnet in enumerate(model["controlnets"]):
        pairs[f"ControlNet {i}"] = (
            f'"Model: {controlnet}, Weight: {params["controlnet_conditioning_scale"][i]}, '
            f"Guidance Start: {params['control_guidance_start'][i]}, "
            f'Guidance End: {params["control_guidance_end"][i]}, Guess Mode: {params["guess_mode"]}"'
        )
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def encode_image(image: Image.Image, config: SinkConfig, parameters: str) -> bytes:
    """Encode in the configured format; PNG gets the `parameters` chunk, others EXIF UserComment."""
    buffer = io.BytesIO()
    if config.image_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_TEXT, parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = parameters  # Exif IFD, UserComment
        image.save(buffer, format=config.image_format.upper(), quality=config.quality, exif=exif)
    return buffer.getvalue()


class EncodeStage:
    """Callable for `map_batches(batch_format="pandas")`."""

    needs = (C.IMAGE, C.PROMPT, C.PARAMS, C.SEED, "sampler", C.STATUS)

    def __init__(self, config: SinkConfig, model: dict[str, Any]):
        self.config = config
        self.model = model

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "encode stage")
        encoded, texts = [], []
        for row in batch.to_dict("records"):
            if row[C.STATUS] != C.OK:
                encoded.append(b"")
                texts.append("")
                continue
            image = Image.fromarray(row[C.IMAGE])
            text = a1111_parameters(
                row[C.PROMPT],
                json.loads(row[C.PARAMS]),
                row[C.SEED],
                row["sampler"],
                image.size,
                self.model,
            )
            encoded.append(encode_image(image, self.config, text))
            texts.append(text)
        return batch.drop(columns=[C.IMAGE]).assign(**{ENCODED: encoded, PARAMETERS_TEXT: texts})
