"""Request and response bodies of the HTTP API (they are also its OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from pixfleet.config import GenerationParams

Base64Image = str  # raw base64 or a data URL ("data:image/png;base64,...")


class GenerateRequest(GenerationParams):
    """One generation: the parameters of a bulk job row, the images as base64, and the model.

    Unset parameters take the served model's defaults, then the pipeline's own. The same
    request with the same seed gives the same image as a generation job row or a direct
    diffusers call; without a seed the server picks one and returns it.
    """

    model: str = Field(description="Id of a served model (see GET /v1/models).")
    control_images: list[Base64Image] = Field(
        default_factory=list, description="Control image(s), one per ControlNet or one for all."
    )
    image: Base64Image | None = Field(None, description="Source image (img2img, inpaint, pix2pix).")
    mask_image: Base64Image | None = Field(None, description="Inpaint mask, white = repaint.")
    width: int | None = Field(
        None, ge=8, le=4096, description="Output width (multiple of 8); unset keeps the input's."
    )
    height: int | None = Field(
        None, ge=8, le=4096, description="Output height (multiple of 8); unset keeps the input's."
    )
    controlnet: str | None = Field(
        None, description="A registered ControlNet to use instead of the model's own: NAME@ALIAS or NAME/VERSION."
    )
    detector: str | None = Field(
        None,
        description="A model detector of the served model (its `detectors`, e.g. lineart) that turns the control "
        "images into control maps; unset: the model's `control` (ready-made maps, canny, ...).",
    )
    response_format: Literal["b64_json", "png"] = Field(
        "b64_json", description="JSON with base64 images, or the first image as PNG bytes."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    def params(self) -> dict[str, Any]:
        """The generation parameters the request set (unset ones fall back to defaults)."""
        return self.model_dump(include=set(GenerationParams.model_fields), exclude_unset=True)


class ControlMapsRequest(BaseModel):
    """The control maps a generation would get from these control images (uploaded as files)."""

    model_config = {"extra": "forbid"}

    model: str = Field(description="Id of a served model with ControlNets.")
    detector: str | None = Field(None, description="One of the model's detectors; unset: its `control`.")
    width: int | None = Field(None, ge=8, le=4096, description="Width the images are fitted to; unset keeps theirs.")
    height: int | None = Field(None, ge=8, le=4096, description="Height the images are fitted to.")


class ControlMap(BaseModel):
    b64_json: str = Field(description="PNG bytes, base64.")


class ControlMapsResponse(BaseModel):
    """Each ControlNet's control map, in ControlNet order."""

    model: str = Field(description="Model id.")
    detector: str | None = Field(description="The detector that made the maps in the engine, if one was asked for.")
    data: list[ControlMap] = Field(description="One map per ControlNet.")


class ImageData(BaseModel):
    """One generated image (the `data` items of OpenAI's images API)."""

    b64_json: str = Field(description="PNG bytes, base64.")
    seed: int = Field(description="Seed this image was generated with.")


class GenerateResponse(BaseModel):
    """Images and what made them."""

    created: int = Field(description="Unix time of the response.")
    model: str = Field(description="Model id that generated the images.")
    controlnet: str | None = Field(None, description="Registered ControlNet version used (NAME/VERSION), if any.")
    data: list[ImageData] = Field(description="The images, num_images_per_prompt of them.")
    parameters: dict[str, Any] = Field(description="Every parameter used, defaults resolved.")
    batch_size: int = Field(description="Requests that shared this request's pipeline call.")
    generate_s: float = Field(description="Seconds the pipeline call took.")


class EditResponse(BaseModel):
    """OpenAI images edit response, plus the seeds used."""

    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    """A served model, as in OpenAI's model list."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "pixfleet"
    task: str = Field(description="The pixfleet task (controlnet, pix2pix, ...).")
    multiplexed_controlnets: list[str] = Field(description="Registered ControlNets requests may pick.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: OpenAI's error shape, so its client raises with the message."""

    error: ErrorDetail
