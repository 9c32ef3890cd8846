"""Build the Serve application from a ServingConfig, run it, or write it as a Serve config
for `serve deploy` and KubeRay's RayService."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from ray import serve
from ray.serve import Application

from pixfleet.config import ConfigError, TrackingConfig, validate_config
from pixfleet.config.serving import ServedModelConfig, ServingConfig
from pixfleet.serving.ingress import Ingress
from pixfleet.serving.replica import ModelReplica

INGRESS = "ingress"
# Serve's own HTTP timeout (408) is a backstop behind the ingress's 504.
_PROXY_TIMEOUT_MARGIN_S = 5.0


def deployment_name(served: ServedModelConfig) -> str:
    return f"model-{served.name}"


def deployment_options(config: ServingConfig) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment, by deployment name."""
    ingress = config.ingress
    options = {
        INGRESS: {
            "num_replicas": ingress.num_replicas,
            "max_ongoing_requests": ingress.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": ingress.num_cpus},
        }
    }
    for served in config.models:
        options[deployment_name(served)] = {
            "autoscaling_config": served.autoscaling.model_dump(exclude_none=True),
            # A replica scaled down answers what it holds first: a request runs at most its
            # timeout, plus the grace after which its engine process is killed.
            "graceful_shutdown_timeout_s": config.limits.request_timeout_s + config.limits.stop_grace_s,
            "max_ongoing_requests": served.max_ongoing_requests,
            "max_queued_requests": served.max_queued_requests,
            "ray_actor_options": {"num_cpus": served.num_cpus, "num_gpus": served.num_gpus},
        }
    return options


def api_key_sha256(config: ServingConfig) -> str | None:
    """The hash of the API key: replicas compare hashes, so the key is not in Serve's config."""
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError(f"api_key_env: environment variable {config.api_key_env} is not set")
    return hashlib.sha256(key.encode()).hexdigest()


def build_app(config: ServingConfig) -> Application:
    """Ingress bound to one model deployment per served model."""
    from pixfleet.tracking import tracking_uri

    uri = tracking_uri(TrackingConfig(tracking_uri=config.tracking_uri))
    options = deployment_options(config)
    models = {
        served.name: serve.deployment(ModelReplica)
        .options(name=deployment_name(served), **options[deployment_name(served)])
        .bind(served, uri, config.limits.stop_grace_s)
        for served in config.models
    }
    ingress = serve.deployment(Ingress).options(name=INGRESS, **options[INGRESS])
    return ingress.bind(config, models, api_key_sha256(config), uri)


def app_from_args(args: dict[str, Any]) -> Application:
    """Serve's app builder (`import_path` of a Serve config): args = {"config": {...}}."""
    return build_app(validate_config(ServingConfig, args.get("config", {}), "serve config args.config"))


def http_options(config: ServingConfig) -> dict[str, Any]:
    return {
        "host": config.http.host,
        "port": config.http.port,
        "request_timeout_s": config.limits.request_timeout_s + _PROXY_TIMEOUT_MARGIN_S,
    }


def serve_config(config: ServingConfig) -> dict[str, Any]:
    """A Serve config file (ServeDeploySchema) that deploys `config` with `serve deploy`."""
    return {
        "proxy_location": config.http.proxy_location,
        "http_options": http_options(config),
        "applications": [
            {
                "name": config.name,
                "route_prefix": config.route_prefix,
                "import_path": "pixfleet.serving.app:app_from_args",
                "args": {"config": config.model_dump(mode="json", exclude_unset=True)},
                "deployments": [{"name": name, **opts} for name, opts in deployment_options(config).items()],
            }
        ],
    }


def start(config: ServingConfig, address: str | None = None) -> str:
    """Deploy `config` on Ray (embedded local by default) and return the API's base URL."""
    from pixfleet.cluster import ensure_ray
    from pixfleet.models.folders import check_model_folders

    for served in config.models:  # before Ray starts: a missing folder is a one-line error
        check_model_folders(served.model)
    app = build_app(config)  # checks the API key variable too
    ensure_ray(address)
    serve.start(http_options=http_options(config), proxy_location=config.http.proxy_location)
    serve.run(app, name=config.name, route_prefix=config.route_prefix)
    prefix = config.route_prefix.rstrip("/")
    return f"http://{config.http.host}:{config.http.port}{prefix}"


def serve_forever(config: ServingConfig) -> None:
    """`pixfleet serve` on an embedded Ray: deploy, then serve until Ctrl-C or SIGTERM."""
    from pixfleet.tracking import sigterm_raises

    url = start(config)
    print(f"serving {', '.join(m.name for m in config.models)} at {url} (docs: {url}/docs)", flush=True)
    with sigterm_raises():  # after ray.init, which installs its own SIGTERM handler
        try:
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
