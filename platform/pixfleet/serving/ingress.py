"""The HTTP ingress: routes; model work goes to the model deployments through their handles.

    POST /v1/generate          JSON, images as base64           every task
    POST /v1/generate/upload   multipart: files + `params` JSON every task
    POST /v1/images/edits      OpenAI images edit (multipart)   pix2pix tasks
    POST /v1/control-maps/upload  the control maps of uploaded images (what generation would get)
    GET  /                     the playground: a page to try each model in a browser
    GET  /v1/models            OpenAI model list
    GET  /healthz              200 when every model answers, else 503

The gate (`gate`) checks the API key and body size first, errors all take one shape
(`errors`), and a model already holding all it can take turns a request away at once (503),
before its images are decoded.
"""

# No `from __future__ import annotations`: FastAPI must see Request itself on Serve's rebuilt routes.
import asyncio
import base64
import json
import math
import time
from collections import Counter
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pixfleet import __version__
from pixfleet.config.serving import LimitsConfig, ServedModelConfig, ServingConfig
from pixfleet.engine import columns as C
from pixfleet.engine.params import pipeline_call_defaults
from pixfleet.models.registry import RegistryError, resolve_version
from pixfleet.models.tasks import task_info
from pixfleet.serving import metrics
from pixfleet.serving.errors import ApiError, from_validation_errors, install_error_handlers
from pixfleet.serving.gate import RequestGate
from pixfleet.serving.openai_images import generate_request, read_edit_form
from pixfleet.serving.playground import playground_page
from pixfleet.serving.replica import DEADLINE
from pixfleet.serving.replica_counts import RunningReplicas
from pixfleet.serving.requests import control_row, decode_base64, encode_png, prepare_row
from pixfleet.serving.schemas import (
    ControlMap,
    ControlMapsRequest,
    ControlMapsResponse,
    EditResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    ModelCard,
    ModelList,
)

RequestModel = TypeVar("RequestModel", bound=BaseModel)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503, 504)}

api = FastAPI(
    title="pixfleet",
    version=__version__,
    description="ControlNet generation and instruction editing on Ray Serve.",
    responses=_ERRORS,
)
api.add_middleware(RequestGate)
install_error_handlers(api)
# Replaced by Ingress.__init__; the defaults keep the gate working before it runs.
api.state.limits = LimitsConfig()
api.state.api_key_sha256 = None


# Helpers come before the class: Serve rebuilds its routes with the globals defined so far.
def _does_edits(served: ServedModelConfig) -> bool:
    info = task_info(served.model.task)
    return info.needs_source_image and not info.uses_controlnet


def _capacity(served: ServedModelConfig, running: int | None) -> int:
    """Requests the model deployment holds at most: on its running replicas, plus queued (with the
    count unknown, on all it may scale to). At zero replicas that is the queue: a cold start waits."""
    replicas = served.autoscaling.max_replicas if running is None else running
    return replicas * served.max_ongoing_requests + served.max_queued_requests


def _form_params(schema: type[RequestModel], params: str) -> RequestModel:
    """A multipart route's `params` field: its JSON validated as `schema`, or the API's 400/422."""
    try:
        return schema.model_validate(json.loads(params))
    except json.JSONDecodeError as error:
        raise ApiError(400, f"params: not valid JSON ({error})", "params") from None
    except ValidationError as error:
        raise from_validation_errors(error.errors()) from None


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
        self.replicas = RunningReplicas(models)
        self.tracking_uri = tracking_uri
        self.in_flight: Counter[str] = Counter()  # per model, requests admitted and not yet answered
        for served in config.models:  # imports the pipeline classes now, not in racing request threads
            pipeline_call_defaults(served.model.task)
        api.state.limits = config.limits
        api.state.api_key_sha256 = api_key_sha256

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every model deployment answers within 5 s, else 503 naming the ones that did
        not. A model scaled to zero is healthy and not asked: a probe would start a replica, and
        a load balancer's health checks would then keep it up for good."""

        running = await self.replicas.all(max_age_s=0)

        async def probe(served: ServedModelConfig) -> Any:
            if running.get(served.name) == 0:
                if served.autoscaling.min_replicas == 0:
                    return {"model": served.name, "replicas": 0, "idle": "scaled to zero; a request starts a replica"}
                return {"error": "no replica running"}
            try:
                return await asyncio.wait_for(self.handles[served.name].ready.remote(), timeout=5)
            except Exception as error:
                return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}

        results = await asyncio.gather(*(probe(served) for served in self.served.values()))
        models = dict(zip(self.served, results, strict=True))
        healthy = all("error" not in r for r in models.values())
        body = {"status": "ok" if healthy else "unavailable", "models": models}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """A page to try each served model in a browser (see `playground`)."""
        return HTMLResponse(playground_page(self.config, api.state.api_key_sha256 is not None))

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
        request = _form_params(GenerateRequest, params)
        if request.control_images or request.image or request.mask_image:
            raise ApiError(422, "params: send images as files, not in params", "params")
        files = {f"control_images[{i}]": f for i, f in enumerate(control_images or [])}
        files |= {field: f for field, f in (("image", image), ("mask_image", mask_image)) if f is not None}
        return await self._generate(request, {field: await f.read() for field, f in files.items()})

    @api.post("/v1/control-maps/upload", response_model=ControlMapsResponse)
    async def control_maps(
        self,
        params: Annotated[str, Form(description="ControlMapsRequest fields as JSON.")],
        control_images: Annotated[list[UploadFile] | None, File(description="Control image(s).")] = None,
    ) -> Response:
        """The control maps a generation with these images gets: the model's `control` made here,
        or the detector the request names run in a replica's engine. What the playground shows
        before it generates."""
        request = _form_params(ControlMapsRequest, params)
        served = self._served(request.model)
        images = {f"control_images[{i}]": await f.read() for i, f in enumerate(control_images or [])}
        size = (request.width, request.height)
        row = await asyncio.to_thread(control_row, served, self.config.limits, images, size, request.detector)
        if request.detector:
            row[DEADLINE] = time.time() + self.config.limits.request_timeout_s
            cold = await self.replicas.of(served.name) == 0
            result = await self._result(served, self.handles[served.name].detect.remote(row), row[DEADLINE], cold)
            if "error" in result:
                raise ApiError(500, result["message"])
            row = result["maps"]
        maps = [row[C.control_column(i)] for i in range(served.model.num_controlnets)]
        pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in maps])
        data = [ControlMap(b64_json=_b64(png)) for png in pngs]
        return JSONResponse(ControlMapsResponse(model=served.name, detector=request.detector, data=data).model_dump())

    @api.post("/v1/images/edits", response_model=EditResponse)
    async def edit(self, request: Request) -> Response:
        """OpenAI-compatible instruction editing with an InstructPix2Pix model."""
        form, upload = read_edit_form(await request.form())
        generate = generate_request(form, self._edit_model(form.model).name)
        return await self._generate(generate, {"image": await upload.read()}, as_edit=True)

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
        tags, start, status = {"model": served.name}, time.perf_counter(), 500
        try:
            # Past what the deployment can hold, answer now: before decoding images or queueing.
            running = await self.replicas.of(served.name)
            if self.in_flight[served.name] >= _capacity(served, running):
                raise ApiError(503, f"model {served.name!r} is at capacity; retry later")
            self.in_flight[served.name] += 1
            metrics.requests_in_flight().set(self.in_flight[served.name], tags=tags)
            try:
                response = await self._admitted(served, request, images, as_edit, cold=running == 0)
            finally:
                self.in_flight[served.name] -= 1
                metrics.requests_in_flight().set(self.in_flight[served.name], tags=tags)
            status = response.status_code
            return response
        except ApiError as error:
            status = error.status
            raise
        finally:
            metrics.requests().inc(tags={**tags, "status": str(status)})
            metrics.request_seconds().observe(time.perf_counter() - start, tags=tags)

    async def _admitted(
        self, served: ServedModelConfig, request: GenerateRequest, images: dict[str, bytes], as_edit: bool, cold: bool
    ) -> Response:
        limits = self.config.limits
        deadline = time.time() + limits.request_timeout_s
        version = await asyncio.to_thread(self._controlnet_version, served, request.controlnet)
        size = (request.width, request.height)
        row = await asyncio.to_thread(prepare_row, served, limits, request.params(), images, size, request.detector)
        row[DEADLINE] = deadline
        handle = self.handles[served.name]
        if version:
            handle = handle.options(multiplexed_model_id=version)
        result = await self._result(served, handle.generate.remote(row), deadline, cold)
        if "error" in result:
            status = {"timeout": 504, "overloaded": 503}.get(result["error"], 500)
            raise ApiError(status, result["message"])
        pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in result["images"]])
        params = json.loads(row["params"])
        data = [ImageData(b64_json=_b64(png), seed=row["seed"] + k) for k, png in enumerate(pngs)]
        # Which replica answered: what a user follows a request by in Serve's logs and metrics.
        headers = {"x-pixfleet-replica": result["replica"]}
        if as_edit:
            return JSONResponse(EditResponse(created=int(time.time()), data=data).model_dump(), headers=headers)
        if request.response_format == "png":
            headers |= {"x-pixfleet-seed": str(row["seed"]), "x-pixfleet-batch-size": str(result["batch_size"])}
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
        return JSONResponse(body.model_dump(), headers=headers)

    async def _result(
        self, served: ServedModelConfig, response: DeploymentResponse, deadline: float, cold: bool
    ) -> dict[str, Any]:
        """The replica's answer by the deadline (504 past it). A request that found no replica
        running waits `cold_start_timeout_s` at most for one: still none then, 503 with
        Retry-After, and the replica it called for goes on starting for the next request."""
        pending = asyncio.ensure_future(response)
        try:
            if cold:
                wait_s = max(0.0, min(served.cold_start_timeout_s or math.inf, deadline - time.time()))
                done, _ = await asyncio.wait({pending}, timeout=wait_s)
                if not done and await self.replicas.of(served.name, max_age_s=0) == 0:
                    message = f"model {served.name!r}: no replica running after {wait_s:.3g} s; one is starting"
                    raise ApiError(503, message, headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
            return await asyncio.wait_for(pending, timeout=max(0.0, deadline - time.time()))
        except TimeoutError:
            raise ApiError(504, f"request timed out after {self.config.limits.request_timeout_s} s") from None
        except (BackPressureError, DeploymentUnavailableError):
            raise ApiError(503, f"model {served.name!r} is at capacity; retry later") from None
        finally:
            if not pending.done() or pending.cancelled():  # given up on: out of its queue or its replica
                pending.cancel()
                response.cancel()

    def _controlnet_version(self, served: ServedModelConfig, controlnet: str | None) -> str | None:
        """NAME@ALIAS or NAME/VERSION -> NAME/VERSION, checked against the registry (404 if absent).

        Resolved per request, so moving an alias serves the new version without a redeploy.
        """
        if controlnet is None:
            return None
        if served.multiplex is None:
            raise ApiError(422, f"controlnet: model {served.name!r} serves no registered ControlNets", "controlnet")
        name = controlnet.partition("@")[0].partition("/")[0]
        if name not in served.multiplex.registered_models:
            raise ApiError(404, f"controlnet: {name!r} is not served by {served.name!r}", "controlnet")
        try:
            name, version = resolve_version(controlnet, self.tracking_uri)
        except RegistryError:
            raise ApiError(404, f"controlnet: no registered version {controlnet!r}", "controlnet") from None
        return f"{name}/{version}"
