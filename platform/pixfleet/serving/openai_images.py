"""OpenAI's images edit API (`POST /v1/images/edits`) mapped onto a pixfleet generation request,
so the `openai` client edits images with a served InstructPix2Pix model."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from pixfleet.config import GenerationParams
from pixfleet.config.base import StrictModel
from pixfleet.config.generation import SEED_LIMIT
from pixfleet.serving.errors import ApiError, from_validation_errors
from pixfleet.serving.schemas import GenerateRequest


class EditForm(StrictModel):
    """The form fields of OpenAI's images edit, plus InstructPix2Pix's parameters."""

    prompt: str = Field(description="The edit instruction.")
    model: str | None = Field(None, description="Served pix2pix model; optional when only one serves edits.")
    n: int = Field(1, ge=1, le=16, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' or 'auto' (the input's size).")
    response_format: str = Field("b64_json", description="Only 'b64_json' (no image hosting).")
    user: str | None = Field(None, description="Accepted and ignored.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    num_inference_steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance scale.")
    image_guidance_scale: float | None = Field(None, ge=0, description="Pull towards the source image.")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Seed of the first image.")


def read_edit_form(form: FormData) -> tuple[EditForm, UploadFile]:
    """The validated form and its one image; 422 naming the field otherwise."""
    uploads = form.getlist("image") or form.getlist("image[]")
    fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
    non_text = [k for k, v in fields.items() if not isinstance(v, str)]
    if non_text:
        raise ApiError(422, f"{non_text[0]}: expected a text field, got a file", non_text[0])
    try:
        edit = EditForm.model_validate(fields)
    except ValidationError as error:
        raise from_validation_errors(error.errors()) from None
    if len(uploads) != 1 or isinstance(uploads[0], str):
        raise ApiError(422, "image: send exactly one image file", "image")
    if "mask" in form:
        raise ApiError(422, "mask: InstructPix2Pix edits the whole image; masks are not supported", "mask")
    if edit.response_format != "b64_json":
        raise ApiError(422, "response_format: only 'b64_json' is supported", "response_format")
    return edit, uploads[0]


def generate_request(edit: EditForm, model: str) -> GenerateRequest:
    """The pixfleet request an edit stands for, with `model` chosen by the ingress."""
    params: dict[str, Any] = edit.model_dump(include=set(GenerationParams.model_fields), exclude_unset=True)
    params["num_images_per_prompt"] = edit.n
    try:
        return GenerateRequest.model_validate({"model": model, **params, **_size_fields(edit.size)})
    except ValidationError as error:
        raise from_validation_errors(error.errors()) from None


def _size_fields(size: str | None) -> dict[str, int]:
    if size in (None, "auto"):
        return {}
    width, x, height = size.partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise ApiError(422, f"size: expected 'WIDTHxHEIGHT' or 'auto', got {size!r}", "size")
    return {"width": int(width), "height": int(height)}
