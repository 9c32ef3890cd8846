"""An HTTP serving app on Ray Serve: the models it serves, their replicas, and its limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.generation import (
    MODEL_DETECTORS,
    ControlPreprocessConfig,
    GenerationParams,
    check_params_for_model,
)
from pixfleet.config.model import ModelSpec

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class BatchingConfig(StrictModel):
    """`@serve.batch`: requests that can share a pipeline call wait briefly for each other."""

    max_batch_size: int = Field(4, ge=1, description="Most images in one pipeline call (1 turns batching off).")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long the first request of a batch waits for more."
    )


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of a model's replicas: Serve's own settings, names and defaults."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deployment; unset: min_replicas."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests (running and queued) per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="How long the load must call for more replicas first.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long the load must call for fewer replicas (above 0) first."
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="How long an idle model keeps its last replica; unset: downscale_delay_s."
    )
    look_back_period_s: float = Field(30.0, gt=0, description="Window the ongoing requests are averaged over.")
    aggregation_function: Literal["mean", "max", "min"] = Field(
        "mean", description="How the window's samples are summed up."
    )
    upscaling_factor: float | None = Field(
        None, gt=0, description="Gain on each upscaling decision (below 1: smaller steps); unset: 1."
    )
    downscaling_factor: float | None = Field(
        None, gt=0, description="Gain on each downscaling decision (below 1: smaller steps); unset: 1."
    )

    @model_validator(mode="after")
    def _replica_range(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class MultiplexConfig(StrictModel):
    """Fine-tuned ControlNets from the MLflow registry, picked per request, sharing the base model."""

    registered_models: list[str] = Field(
        min_length=1,
        description="Registered model names whose versions a request may name (NAME@ALIAS or NAME/VERSION).",
    )
    max_models_per_replica: int = Field(3, ge=1, description="ControlNets kept per replica; least recently used go.")


class ServedModelConfig(StrictModel):
    """One model behind the API: its pipeline, request defaults and replicas."""

    name: str = Field(pattern=_NAME_PATTERN, description="Model id clients send in `model`.")
    model: ModelSpec = Field(description="The pipeline to load (local folder, hub id or models:/ URI).")
    control: list[ControlPreprocessConfig] = Field(
        default_factory=lambda: [ControlPreprocessConfig()],
        description="How control images become control maps: one per ControlNet, or one for all.",
    )
    detectors: list[ControlPreprocessConfig] = Field(
        default_factory=list,
        description="Model detectors (depth, segmentation, the annotators) a request may ask for by name "
        "(`detector`): loaded once in the replica's engine process, beside the pipeline, and run there on the "
        "request's control images.",
    )
    defaults: GenerationParams = Field(
        default_factory=GenerationParams, description="Parameter defaults for fields a request leaves unset."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica: 0 on CPU, 1 or a fraction on GPU.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    max_ongoing_requests: int = Field(
        8, ge=1, description="Requests a replica holds at once (at least max_batch_size for batches to form)."
    )
    max_queued_requests: int = Field(
        16, ge=1, description="Requests waiting for a replica; past this, new ones get 503 at once."
    )
    cold_start_timeout_s: float | None = Field(
        None,
        gt=0,
        description=(
            "How long a request that finds no replica running (a model scaled to zero) waits for one to start; "
            "still none then, 503 with Retry-After while the start goes on. Unset: up to limits.request_timeout_s."
        ),
    )
    max_pixel_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "Most width x height x steps x images one request may cost (what the model finishes within "
            "limits.request_timeout_s); past it, 422 before any work. Unset: no budget."
        ),
    )
    multiplex: MultiplexConfig | None = Field(None, description="Serve registered ControlNets per request.")
    spare_engine: bool = Field(
        True,
        description=(
            "Keep a second engine process with torch and diffusers imported, so the one replacing a call "
            "stuck past its deadline loads the model at once (host memory only, no GPU memory)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServedModelConfig:
        check_params_for_model(self.defaults, self.model, "defaults")
        if self.multiplex and self.model.num_controlnets != 1:
            raise ValueError("multiplex needs a model with exactly one ControlNet")
        n = self.model.num_controlnets
        if n and len(self.control) not in (1, n):
            raise ValueError(f"control has {len(self.control)} entries for {n} controlnets")
        if any(control.uses_model for control in self.control):
            raise ValueError(
                "control: a model detector runs in the engine process when a request asks for it: list it under "
                "`detectors` (requests name it in `detector`)"
            )
        names = [detector.detector for detector in self.detectors]
        if refused := [name for name in names if name not in MODEL_DETECTORS]:
            raise ValueError(f"detectors: {', '.join(refused)} needs no model; give it in `control`")
        if len(set(names)) < len(names):
            raise ValueError(f"detectors: each detector once ({', '.join(names)})")
        if self.detectors and not self.model.num_controlnets:
            raise ValueError(f"detectors: task {self.model.task!r} takes no control image")
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= batching.max_batch_size")
        return self


class HttpConfig(StrictModel):
    """Where Serve's HTTP proxy listens."""

    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 exposes the API to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Serve HTTP proxies on every node, or on the head only."
    )


class IngressConfig(StrictModel):
    """The HTTP ingress deployment: decodes, preprocesses and encodes on CPU."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one ingress replica holds at once.")


class LimitsConfig(StrictModel):
    """What one request may ask for; past these it gets a 4xx (or 504) and the server goes on."""

    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body (413 past it).")
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Largest decoded image, width x height (413).")
    max_images_per_request: int = Field(4, ge=1, description="Most images one request may ask for (422).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still running after this gets 504.")
    stop_grace_s: float = Field(
        2.0,
        ge=0,
        description=(
            "Past its deadline a call stops at the next denoising step; one still running this much later "
            "(a single step can take minutes) is killed with its engine process, which restarts."
        ),
    )


class ServingConfig(StrictModel):
    """A Serve application, as written in `pipelines_cfg/serve_*.yaml`."""

    name: str = Field("pixfleet", pattern=_NAME_PATTERN, description="Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the API.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP proxy address.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request limits.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key; requests then need 'Authorization: Bearer'."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP ingress deployment.")
    tracking_uri: str | None = Field(
        None, description="MLflow URI for models:/ and runs:/ models; unset uses $MLFLOW_TRACKING_URI or ./mlruns."
    )
    models: list[ServedModelConfig] = Field(min_length=1, description="The models served.")

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ServingConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique: {', '.join(duplicates)}")
        return self
