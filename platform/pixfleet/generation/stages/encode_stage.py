"""Encode stage (CPU tasks): images -> PNG/JPEG/WebP bytes with their generation parameters.

Needs: image, prompt, params, seed, sampler, prompt_tokens, status.
Adds:  encoded (bytes; empty for rows that did not succeed), parameters (A1111 text), width, height.
Images carry the A1111 `parameters` text (a PNG text chunk; EXIF UserComment in JPEG and
WebP, with the character-code prefix the EXIF standard asks for), so the tools that read
A1111's images read how these were made: model and its hash, sampler, seed, and each
ControlNet's model, preprocessor and resize mode as sd-webui-controlnet writes them.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePath
from typing import Any

import pandas as pd
from PIL import Image, PngImagePlugin

from pixfleet.config import PreprocessConfig, SinkConfig
from pixfleet.config.paths import is_mlflow_uri, looks_local
from pixfleet.engine import columns as C
from pixfleet.generation.stages import LIGHT_CPU, PlannedStage
from pixfleet.models.identity import ModelIdentity, short_hash

ENCODED = "encoded"
PARAMETERS_TEXT = "parameters"
# sd-webui-controlnet's names for the resize modes.
_RESIZE_MODES = {"center_crop": "Crop and Resize", "resize": "Just Resize", "none": "Keep Size"}


def model_name(model: str) -> str:
    """How A1111 names a model: a local folder by its name, a hub id or registry URI as written."""
    return PurePath(model).name if looks_local(model) and not is_mlflow_uri(model) else model


def a1111_parameters(
    prompt: str,
    params: dict[str, Any],
    seed: int,
    sampler: str,
    size: tuple[int, int],
    model: ModelIdentity,
    preprocess: PreprocessConfig,
    truncated_tokens: int | None = None,
) -> str:
    """The text A1111 writes: prompt, `Negative prompt:` line, then `Key: value` pairs.

    `truncated_tokens` is the prompt's token count when the text encoder saw only its first ones.
    """
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = {
        "Steps": params["num_inference_steps"],
        "Sampler": sampler,
        "CFG scale": params["guidance_scale"],
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": short_hash(model.base_model_hash),
        "Model": model_name(model.base_model),
    }
    if params.get("strength") is not None:
        pairs["Denoising strength"] = params["strength"]
    if params.get("image_guidance_scale") is not None:
        pairs["Image CFG scale"] = params["image_guidance_scale"]
    if truncated_tokens:
        pairs |= {"Prompt tokens": truncated_tokens, "Prompt truncated": True}
    for i, (controlnet, digest) in enumerate(zip(model.controlnets, model.controlnet_hashes, strict=True)):
        control = preprocess.control_for(i)
        unit = {
            "Module": control.a1111_module,
            "Model": f"{model_name(controlnet)} [{digest[:8]}]",
            "Weight": params["controlnet_conditioning_scale"][i],
            "Resize Mode": _RESIZE_MODES[preprocess.resize_mode],
            "Resample": preprocess.resample,
        }
        unit |= control.a1111_settings()
        if control.uses_model:
            unit["Preprocessor model"] = model_name(control.model)
        unit |= {
            "Guidance Start": params["control_guidance_start"][i],
            "Guidance End": params["control_guidance_end"][i],
            "Guess Mode": params["guess_mode"],
        }
        pairs[f"ControlNet {i}"] = '"' + ", ".join(f"{k}: {v}" for k, v in unit.items()) + '"'
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def exif_with_parameters(text: str) -> bytes:
    """EXIF whose UserComment holds `text` as A1111 writes it: type UNDEFINED, an 8-byte
    character code ('UNICODE'), then UTF-16 (PIL cannot write that tag type itself)."""
    import piexif
    import piexif.helper

    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def encode_image(image: Image.Image, config: SinkConfig, parameters: str) -> bytes:
    """Encode in the configured format; PNG gets the `parameters` chunk, others EXIF UserComment."""
    buffer = io.BytesIO()
    if config.image_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_TEXT, parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = exif_with_parameters(parameters)
        image.save(buffer, format=config.image_format.upper(), quality=config.quality, exif=exif)
    return buffer.getvalue()


class EncodeStage:
    """Callable for `map_batches(batch_format="pandas")`."""

    needs = (C.IMAGE, C.PROMPT, C.PARAMS, C.SEED, C.SAMPLER, C.PROMPT_TOKENS, C.PROMPT_TRUNCATED, C.STATUS)

    def __init__(self, config: SinkConfig, model: ModelIdentity, preprocess: PreprocessConfig):
        self.config = config
        self.model = model
        self.preprocess = preprocess

    @classmethod
    def plan(cls, *args) -> PlannedStage:
        # Twice the light share: kept apart from decode's tasks, fused with the write stage's.
        return PlannedStage(
            cls(*args), cls.needs, (ENCODED, PARAMETERS_TEXT, C.WIDTH, C.HEIGHT), {"num_cpus": 2 * LIGHT_CPU}
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "encode stage")
        encoded, texts = [], []
        for row in batch.to_dict("records"):
            if row[C.STATUS] != C.OK:
                encoded.append(b"")
                texts.append("")
                continue
            image = Image.fromarray(row[C.IMAGE])
            truncated = row[C.PROMPT_TOKENS] if row[C.PROMPT_TRUNCATED] else None
            text = a1111_parameters(
                row[C.PROMPT],
                json.loads(row[C.PARAMS]),
                row[C.SEED],
                row[C.SAMPLER],
                image.size,
                self.model,
                self.preprocess,
                truncated,
            )
            encoded.append(encode_image(image, self.config, text))
            texts.append(text)
        sizes = [image.shape[:2] for image in batch[C.IMAGE]]
        return batch.drop(columns=[C.IMAGE]).assign(
            **{ENCODED: encoded, PARAMETERS_TEXT: texts},
            **{C.WIDTH: [width for _, width in sizes], C.HEIGHT: [height for height, _ in sizes]},
        )
