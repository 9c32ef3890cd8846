"""From an HTTP request to a generation row and back: image decoding with limits, the same
preprocessing and parameter resolution as a bulk job, PNG encoding. Runs in the ingress, on CPU.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from typing import Any

import numpy as np
from PIL import Image

from pixfleet.config.serving import LimitsConfig, ServedModelConfig
from pixfleet.engine import columns as C
from pixfleet.engine.images import ImageTooLarge, RowError, decode_image
from pixfleet.engine.params import resolve_params
from pixfleet.engine.preprocess import detect, fit_image
from pixfleet.models.tasks import task_info
from pixfleet.serving.errors import ApiError


def decode_base64(value: str, field: str) -> bytes:
    """Raw base64 or a data URL -> bytes; 400 naming `field` when it is not base64."""
    payload = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: not valid base64", field) from None


def decode_upload(data: bytes, field: str, limits: LimitsConfig, mode: str) -> np.ndarray:
    """Image bytes -> HWC uint8; 413 past the pixel limit, 400 when not an image."""
    try:
        return decode_image(data, field, limits.max_image_pixels, mode)
    except ImageTooLarge as error:
        raise ApiError(413, str(error), field) from None
    except RowError as error:
        raise ApiError(400, str(error), field) from None


def image_fields(served: ServedModelConfig) -> dict[str, str]:
    """Request field -> row column for the model's task, in the order images are sized."""
    info = task_info(served.model.task)
    fields = {}
    if info.needs_source_image:
        fields["image"] = C.SOURCE_IMAGE
    for i in range(served.model.num_controlnets):
        fields[f"control_images[{i}]"] = C.control_column(i)
    if info.needs_mask:
        fields["mask_image"] = C.MASK_IMAGE
    return fields


def control_fields(served: ServedModelConfig) -> dict[str, str]:
    """Request field -> row column of the model's control images only."""
    return {field: column for field, column in image_fields(served).items() if C.control_index(column) is not None}


def check_images(
    served: ServedModelConfig, given: dict[str, bytes], wanted: dict[str, str] | None = None
) -> dict[str, bytes]:
    """The images `wanted` (default: all the task takes) from `given` (field -> bytes); 422 for
    a missing or unexpected one.

    One control image feeds every ControlNet, as in a bulk job's single control column.
    """
    wanted = image_fields(served) if wanted is None else wanted
    if "control_images[0]" in given and "control_images[1]" not in given:
        copies = range(1, served.model.num_controlnets)  # not len(wanted): a source image or mask is no ControlNet's
        given = {**given, **{f"control_images[{i}]": given["control_images[0]"] for i in copies}}
    task = served.model.task
    for field in given:
        if field not in wanted:
            raise ApiError(422, f"{field}: model {served.name!r} (task {task}) takes no such image", field)
    for field in wanted:
        if field not in given:
            raise ApiError(422, f"{field}: model {served.name!r} (task {task}) needs this image", field)
    return given


def prepare_row(
    served: ServedModelConfig,
    limits: LimitsConfig,
    params: dict[str, Any],
    images: dict[str, bytes],
    size: tuple[int | None, int | None],
    detector: str | None = None,
) -> dict[str, Any]:
    """A generation row as the bulk job's decode and preprocess stages would make it.

    `params` are the request's own parameters; `images` maps request fields to bytes;
    `size` is the requested (width, height), or (None, None) to keep the first image's;
    `detector` names one of the model's `detectors`, which the engine process runs on the
    fitted control images (the model's `control` runs here otherwise).
    """
    spec = served.model
    images = check_images(served, images)
    check_detector(served, detector)
    try:
        resolved = resolve_params(served.defaults, params, spec.task, spec.num_controlnets)
    except RowError as error:
        field = str(error).removeprefix("parameter ").split(":")[0]
        raise ApiError(422, str(error), field) from None
    # A request's images share one pipeline call, so a batch must hold them all.
    most = min(limits.max_images_per_request, served.batching.max_batch_size)
    if resolved["num_images_per_prompt"] > most:
        raise ApiError(
            422, f"num_images_per_prompt: at most {most} per request for {served.name!r}", "num_images_per_prompt"
        )
    fields = image_fields(served)
    arrays = decoded(images, fields, limits)
    width, height = _output_size(size, arrays, limits)
    check_cost(served, width, height, resolved, size, next(iter(fields)))
    row = fitted(served, arrays, fields, (width, height), size == (None, None), detector)
    seed = resolved["seed"] if resolved["seed"] is not None else secrets.randbits(62)
    resolved["seed"] = seed
    return {
        **row,
        C.ROW_ID: secrets.token_hex(8),
        C.STATUS: C.OK,
        C.ERROR: "",
        C.SOURCE_REF: "request",
        C.PROMPT: resolved["prompt"],
        C.PARAMS: json.dumps(resolved),
        C.SEED: seed,
    }


def control_row(
    served: ServedModelConfig,
    limits: LimitsConfig,
    images: dict[str, bytes],
    size: tuple[int | None, int | None],
    detector: str | None,
) -> dict[str, Any]:
    """A request's control images as `prepare_row` prepares them, without the rest of a row:
    what the control-map preview shows before generating."""
    if not served.model.num_controlnets:
        raise ApiError(422, f"model: {served.name!r} (task {served.model.task}) takes no control image", "model")
    check_detector(served, detector)
    fields = control_fields(served)
    arrays = decoded(check_images(served, images, fields), fields, limits)
    return fitted(served, arrays, fields, _output_size(size, arrays, limits), size == (None, None), detector)


def decoded(images: dict[str, bytes], fields: dict[str, str], limits: LimitsConfig) -> dict[str, np.ndarray]:
    """Each field's image decoded (masks as grey), within the limits."""
    return {
        field: decode_upload(images[field], field, limits, "L" if column == C.MASK_IMAGE else "RGB")
        for field, column in fields.items()
    }


def fitted(
    served: ServedModelConfig,
    arrays: dict[str, np.ndarray],
    fields: dict[str, str],
    size: tuple[int, int],
    keep_size: bool,
    detector: str | None,
) -> dict[str, Any]:
    """Row columns: each image fitted to `size` (kept as it is with `keep_size`, as resize_mode
    'none' in a job: the pipeline rounds it down), control images made maps by the model's
    `control` unless `detector` names one of its detectors, which the engine runs."""
    row: dict[str, Any] = {}
    for field, column in fields.items():
        image = fit_image(arrays[field], *size, "none" if keep_size else "center_crop", "lanczos")
        index = C.control_index(column)
        if index is not None and detector is None:
            image = detect(image, served.control[index if len(served.control) > 1 else 0])
        row[column] = image
    if detector is not None:
        row[C.DETECTOR] = detector
    return row


def check_detector(served: ServedModelConfig, detector: str | None) -> None:
    """422 naming `detector` when the model holds no such detector."""
    if detector is None:
        return
    held = [control.detector for control in served.detectors]
    if detector not in held:
        offered = f"it holds {', '.join(held)}" if held else "it holds none (its `detectors` is empty)"
        raise ApiError(422, f"detector: model {served.name!r} has no detector {detector!r}; {offered}", "detector")


def _output_size(
    size: tuple[int | None, int | None], arrays: dict[str, np.ndarray], limits: LimitsConfig
) -> tuple[int, int]:
    """The requested size, or the inputs' own (all inputs the same size)."""
    width, height = size
    if (width is None) != (height is None):
        raise ApiError(422, "width and height: give both or neither", "width" if width is None else "height")
    if width is None:
        (first_field, first), *others = arrays.items()
        for field, array in others:
            if array.shape[:2] != first.shape[:2]:
                raise ApiError(
                    422,
                    f"{field}: {array.shape[1]}x{array.shape[0]} differs from {first_field} "
                    f"{first.shape[1]}x{first.shape[0]}; give width and height to resize both",
                    field,
                )
        height, width = first.shape[:2]
        if width < 8 or height < 8:
            raise ApiError(422, f"{first_field}: smaller than 8x8 pixels", first_field)
    if width * height > limits.max_image_pixels:
        raise ApiError(422, f"width x height: {width}x{height} exceeds max_image_pixels", "width")
    return width, height


def check_cost(
    served: ServedModelConfig,
    width: int,
    height: int,
    params: dict[str, Any],
    size: tuple[int | None, int | None],
    image_field: str,
) -> None:
    """422 before any work for a request whose width x height x steps x images is over the
    model's `max_pixel_steps`: one that cannot finish in time is refused, not started. The
    message names what to lower: the size when one step alone is over, else the steps."""
    budget = served.max_pixel_steps
    steps, images = params["num_inference_steps"], params["num_images_per_prompt"]
    cost = width * height * steps * images
    if budget is None or cost <= budget:
        return
    if width * height > budget:
        field = "width" if size != (None, None) else image_field
    else:
        field = "num_images_per_prompt" if width * height * steps <= budget else "num_inference_steps"
    raise ApiError(
        422,
        f"{field}: {width}x{height} px x {steps} steps x {images} images = {cost:,} pixel-steps exceeds "
        f"max_pixel_steps={budget:,} of {served.name!r}",
        field,
    )


def encode_png(image: np.ndarray) -> bytes:
    """HWC uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
