"""The HTTP ingress: FastAPI routes, API key, body limit, errors as JSON; model work goes to
the model deployments through their handles.

    POST /v1/generate          JSON, images as base64           every task
    POST /v1/generate/upload   multipart: files + `params` JSON every task
    POST /v1/images/edits      OpenAI images edit (multipart)   pix2pix tasks
    GET  /v1/models            OpenAI model list
    GET  /healthz              200 when every model answers, else 503
"""

# No `from __future__ import annotations`: FastAPI must see Request itself on Serve's rebuilt routes.
import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pixfleet import __version__
from pixfleet.config import GenerationParams
from pixfleet.config.base import StrictModel
from pixfleet.config.serving import LimitsConfig, ServedModelConfig, ServingConfig
from pixfleet.generation.params import pipeline_call_defaults
from pixfleet.models.tasks import task_info
from pixfleet.serving.replica import DEADLINE
from pixfleet.serving.requests import ApiError, decode_base64, encode_png, prepare_row
from pixfleet.serving.schemas import (
    EditResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    ModelCard,
    ModelList,
)

OPEN_PATHS = {"/healthz", "/docs", "/openapi.json"}  # reachable without the API key
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503, 504)}

api = FastAPI(
    title="pixfleet",
    version=__version__,
    description="ControlNet generation and instruction editing on Ray Serve.",
    responses=_ERRORS,
)


class RequestGate:
    """ASGI middleware: API key and body size are checked before any body byte is read.

    A body must declare its Content-Length (411 otherwise), so an oversized upload is refused
    from its headers and never buffered.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        headers = dict(scope["headers"])
        error = None
        if state.api_key_sha256 and scope["path"].removeprefix(scope.get("root_path", "")) not in OPEN_PATHS:
            presented = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(hashlib.sha256(presented).hexdigest(), state.api_key_sha256):
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get(b"content-length")
            if declared is None:
                error = ApiError(411, "the request body needs a Content-Length header")
            elif int(declared) > state.limits.max_body_bytes:
                error = ApiError(
                    413, f"body of {int(declared)} bytes exceeds max_body_bytes={state.limits.max_body_bytes}"
                )
        if error is None:
            return await self.app(scope, receive, send)
        extra = {"www-authenticate": "Bearer"} if error.status == 401 else None
        response = JSONResponse(error.body(), status_code=error.status, headers=extra)
        await response(scope, receive, send)


api.add_middleware(RequestGate)
# Replaced by Ingress.__init__; the defaults keep the gate working before it runs.
api.state.limits = LimitsConfig()
api.state.api_key_sha256 = None


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _api_error_from_pydantic(error.errors())


def _api_error_from_pydantic(errors: list[dict[str, Any]]) -> JSONResponse:
    first = errors[0]
    if first["type"] == "json_invalid":  # loc is ("body", offset): the body as a whole is bad
        return JSONResponse(ApiError(400, f"body: not valid JSON ({first['msg']})", "body").body(), status_code=400)
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return JSONResponse(ApiError(422, f"{field}: {message}", field).body(), status_code=422)


class EditForm(StrictModel):
    """The form fields of OpenAI's images edit, plus InstructPix2Pix's parameters."""

    prompt: str = Field(description="The edit instruction.")
    model: str | None = Field(None, description="Served pix2pix model; optional when only one serves edits.")
    n: int = Field(1, ge=1, le=16, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' or 'auto' (the input's size).")
    response_format: str = Field("b64_json", description="Only 'b64_json' (no image hosting).")
    user: str | None = Field(None, description="Accepted and ignored.")
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    image_guidance_scale: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)


# Helpers come before the class: Serve rebuilds its routes with the globals defined so far.
def _does_edits(served: ServedModelConfig) -> bool:
    info = task_info(served.model.task)
    return info.needs_source_image and not info.uses_controlnet


def _size_fields(size: str | None) -> dict[str, int]:
    if size in (None, "auto"):
        return {}
    width, x, height = size.partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise ApiError(422, f"size: expected 'WIDTHxHEIGHT' or 'auto', got {size!r}", "size")
    return {"width": int(width), "height": int(height)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@serve.ingress(api)
class Ingress:
    """A Serve deployment class; `app.build_app` sets its options and binds the model handles."""

    def __init__(
        self,
        config: ServingConfig,
        models: dict[str, DeploymentHandle],
        api_key_sha256: str | None,
        tracking_uri: str,
    ):
        self.config = config
        self.served = {m.name: m for m in config.models}
        self.handles = models
        self.tracking_uri = tracking_uri
        for served in config.models:  # imports the pipeline classes now, not in racing request threads
            pipeline_call_defaults(served.model.task)
        api.state.limits = config.limits
        api.state.api_key_sha256 = api_key_sha256

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every model deployment answers within 5 s, else 503 naming the ones that did not."""

        async def probe(handle: DeploymentHandle) -> Any:
            try:
                return await asyncio.wait_for(handle.ready.remote(), timeout=5)
            except Exception as error:
                return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}

        results = await asyncio.gather(*(probe(h) for h in self.handles.values()))
        models = dict(zip(self.handles, results, strict=True))
        healthy = all("error" not in r for r in models.values())
        body = {"status": "ok" if healthy else "unavailable", "models": models}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @api.get("/v1/models")
    async def list_models(self) -> ModelList:
        """The served models, OpenAI-style."""
        return ModelList(
            data=[
                ModelCard(
                    id=m.name,
                    task=m.model.task,
                    multiplexed_controlnets=m.multiplex.registered_models if m.multiplex else [],
                )
                for m in self.config.models
            ]
        )

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, request: GenerateRequest) -> Response:
        """Generate with any served model; images as base64 in JSON."""
        images = {
            f"control_images[{i}]": decode_base64(v, f"control_images[{i}]")
            for i, v in enumerate(request.control_images)
        }
        for field in ("image", "mask_image"):
            if getattr(request, field) is not None:
                images[field] = decode_base64(getattr(request, field), field)
        return await self._generate(request, images)

    @api.post("/v1/generate/upload", response_model=GenerateResponse)
    async def generate_upload(
        self,
        params: Annotated[str, Form(description="GenerateRequest fields as JSON, without the images.")],
        control_images: Annotated[list[UploadFile] | None, File(description="Control image(s).")] = None,
        image: Annotated[UploadFile | None, File(description="Source image.")] = None,
        mask_image: Annotated[UploadFile | None, File(description="Inpaint mask.")] = None,
    ) -> Response:
        """Generate with images uploaded as multipart files."""
        try:
            request = GenerateRequest.model_validate(json.loads(params))
        except json.JSONDecodeError as error:
            raise ApiError(400, f"params: not valid JSON ({error})", "params") from None
        except ValidationError as error:
            return _api_error_from_pydantic(error.errors())
        if request.control_images or request.image or request.mask_image:
            raise ApiError(422, "params: send images as files, not in params", "params")
        images = {f"control_images[{i}]": await f.read() for i, f in enumerate(control_images or [])}
        for field, upload in (("image", image), ("mask_image", mask_image)):
            if upload is not None:
                images[field] = await upload.read()
        return await self._generate(request, images)

    @api.post("/v1/images/edits", response_model=EditResponse)
    async def edit(self, request: Request) -> Response:
        """OpenAI-compatible instruction editing with an InstructPix2Pix model."""
        form = await request.form()
        uploads = form.getlist("image") or form.getlist("image[]")
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
        try:
            edit = EditForm.model_validate(fields)
        except ValidationError as error:
            return _api_error_from_pydantic(error.errors())
        if len(uploads) != 1 or isinstance(uploads[0], str):
            raise ApiError(422, "image: send exactly one image file", "image")
        if "mask" in form:
            raise ApiError(422, "mask: InstructPix2Pix edits the whole image; masks are not supported", "mask")
        if edit.response_format != "b64_json":
            raise ApiError(422, "response_format: only 'b64_json' is supported", "response_format")
        served = self._edit_model(edit.model)
        params = edit.model_dump(include=set(GenerationParams.model_fields), exclude_unset=True)
        params["num_images_per_prompt"] = edit.n
        try:
            generate = GenerateRequest.model_validate({"model": served.name, **params, **_size_fields(edit.size)})
        except ValidationError as error:
            return _api_error_from_pydantic(error.errors())
        return await self._generate(generate, {"image": await uploads[0].read()}, as_edit=True)

    def _edit_model(self, name: str | None) -> ServedModelConfig:
        editors = [m for m in self.config.models if _does_edits(m)]
        if name is None:
            if len(editors) != 1:
                raise ApiError(422, f"model: required; edit models: {', '.join(m.name for m in editors)}", "model")
            return editors[0]
        served = self._served(name)
        if not _does_edits(served):
            raise ApiError(422, f"model: {name!r} (task {served.model.task}) does not edit; use /v1/generate", "model")
        return served

    def _served(self, name: str) -> ServedModelConfig:
        if name not in self.served:
            raise ApiError(404, f"model: no model {name!r}; served: {', '.join(self.served)}", "model")
        return self.served[name]

    async def _generate(self, request: GenerateRequest, images: dict[str, bytes], as_edit: bool = False) -> Response:
        served = self._served(request.model)
        limits = self.config.limits
        deadline = time.time() + limits.request_timeout_s
        version = await asyncio.to_thread(self._controlnet_version, served, request.controlnet)
        size = (request.width, request.height)
        row = await asyncio.to_thread(prepare_row, served, limits, request.params(), images, size)
        row[DEADLINE] = deadline
        handle = self.handles[served.name]
        if version:
            handle = handle.options(multiplexed_model_id=version)
        response = handle.generate.remote(row)
        try:
            result = await asyncio.wait_for(response, timeout=max(0.0, deadline - time.time()))
        except TimeoutError:
            response.cancel()
            raise ApiError(504, f"request timed out after {limits.request_timeout_s} s") from None
        except (BackPressureError, DeploymentUnavailableError):
            raise ApiError(503, f"model {served.name!r} is at capacity; retry later") from None
        if "error" in result:
            status = 504 if result["error"] == "timeout" else 500
            raise ApiError(status, result["message"])
        pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in result["images"]])
        params = json.loads(row["params"])
        data = [ImageData(b64_json=_b64(png), seed=row["seed"] + k) for k, png in enumerate(pngs)]
        if as_edit:
            return JSONResponse(EditResponse(created=int(time.time()), data=data).model_dump())
        if request.response_format == "png":
            headers = {"x-pixfleet-seed": str(row["seed"]), "x-pixfleet-batch-size": str(result["batch_size"])}
            return Response(pngs[0], media_type="image/png", headers=headers)
        body = GenerateResponse(
            created=int(time.time()),
            model=served.name,
            controlnet=version,
            data=data,
            parameters=params,
            batch_size=result["batch_size"],
            generate_s=result["generate_s"],
        )
        return JSONResponse(body.model_dump())

    def _controlnet_version(self, served: ServedModelConfig, controlnet: str | None) -> str | None:
        """NAME@ALIAS or NAME/VERSION -> NAME/VERSION, checked against the registry (404 if absent).

        Resolved per request, so moving an alias serves the new version without a redeploy.
        """
        if controlnet is None:
            return None
        if served.multiplex is None:
            raise ApiError(422, f"controlnet: model {served.name!r} serves no registered ControlNets", "controlnet")
        name, at, alias = controlnet.partition("@")
        if not at:
            name, _, alias = controlnet.partition("/")
        if name not in served.multiplex.registered_models:
            raise ApiError(404, f"controlnet: {name!r} is not served by {served.name!r}", "controlnet")
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        try:
            version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
        except Exception:
            raise ApiError(404, f"controlnet: no registered version {controlnet!r}", "controlnet") from None
        return f"{name}/{version.version}"
