"""One Serve instance for the module's tests: the main app (ControlNet with registry
ControlNets, InstructPix2Pix) and a `tight` app (one slot, tiny queue, short timeout, API key)."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from pixfleet.config.serving import ServingConfig
from tests.helpers import register_controlnet, tiny_spec

API_KEY = "test-key-123"
REGISTERED = "tiny-cn"
MAX_PIXEL_STEPS = 64 * 64 * 100  # the main ControlNet model's budget


@dataclass
class Server:
    url: str
    config: ServingConfig
    tracking_uri: str
    registry_dir: Path

    def client(self, prefix: str = "", **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url + prefix, timeout=120, **kwargs)


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range
    (32768+), where Ray's own processes pick theirs: one of those could take a port the OS
    just handed out before Serve's proxy binds it (seen: "Failed to bind to address")."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32767")


def post_upload(base_url: str, **params) -> httpx.Response:
    """A tiny-controlnet generation through the multipart route, as a user's script sends it."""
    import json

    from tests.helpers import png_bytes, random_image

    return httpx.post(
        f"{base_url}/v1/generate/upload",
        data={"params": json.dumps({"model": "tiny-controlnet", "prompt": "a circle", **params})},
        files={"control_images": ("c.png", png_bytes(random_image(0)), "image/png")},
        timeout=120,
    )


def write_yaml(config: ServingConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def serving_config(
    tiny_dir: Path, tracking_uri: str, port: int, name: str, annotators: Path | None = None, **overrides
) -> ServingConfig:
    """The apps' config; with `annotators` (a folder holding HED's checkpoint), the ControlNet
    model holds the softedge_hed detector requests may ask for."""
    controlnet = tiny_spec(tiny_dir, "controlnet", scheduler="unipc").model_dump()
    detectors = [{"detector": "softedge_hed", "model": str(annotators), "detect_resolution": 64}] if annotators else []
    pix2pix = tiny_spec(tiny_dir, "pix2pix").model_dump()
    data = {
        "name": name,
        "route_prefix": f"/{name}",
        "http": {"port": port},
        "tracking_uri": tracking_uri,
        "ingress": {"num_cpus": 0.1},
        "limits": {"max_image_pixels": 128 * 128, "max_body_bytes": 2**20, "request_timeout_s": 30},
        "models": [
            {
                "name": "tiny-controlnet",
                "model": controlnet,
                "defaults": {"num_inference_steps": 2},
                "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5},
                "num_cpus": 0.1,
                "multiplex": {"registered_models": [REGISTERED], "max_models_per_replica": 2},
                "detectors": detectors,
                "max_pixel_steps": MAX_PIXEL_STEPS,
                "spare_engine": False,  # only the tight app's model replaces a stuck engine
            },
            {
                "name": "tiny-pix2pix",
                "model": pix2pix,
                "defaults": {"num_inference_steps": 2},
                "num_cpus": 0.1,
                "spare_engine": False,
            },
        ],
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return ServingConfig.model_validate(data)


@pytest.fixture(scope="package")
def server(ray_session, tiny_dir, tmp_path_factory):
    from ray import serve

    from pixfleet.models.annotators import make_random_annotator
    from pixfleet.models.tiny import make_tiny_pipeline
    from pixfleet.serving.app import build_app, http_options

    registry_dir = tmp_path_factory.mktemp("registry")
    tracking_uri = f"sqlite:///{registry_dir}/mlflow.db"
    make_tiny_pipeline("controlnet", registry_dir / "v1", seed=1)
    register_controlnet(registry_dir / "v1" / "controlnet", REGISTERED, tracking_uri, registry_dir / "artifacts")

    port = free_port()
    annotators = make_random_annotator("softedge_hed", registry_dir / "Annotators")
    main = serving_config(tiny_dir, tracking_uri, port, "main", annotators)
    tight = serving_config(
        tiny_dir,
        tracking_uri,
        port,
        "tight",
        api_key_env="PIXFLEET_TEST_API_KEY",
        limits={"request_timeout_s": 4, "stop_grace_s": 1, "max_image_pixels": 1024 * 1024},
        models=[
            {
                **main.models[0].model_dump(exclude={"multiplex", "max_pixel_steps", "detectors"}),
                "spare_engine": True,
                "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            }
        ],
    )
    serve.start(http_options=http_options(main))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PIXFLEET_TEST_API_KEY", API_KEY)
        apps = [(config, build_app(config)) for config in (main, tight)]
    for config, app in apps:
        serve.run(app, name=config.name, route_prefix=config.route_prefix)
    yield Server(f"http://127.0.0.1:{port}", main, tracking_uri, registry_dir)
    serve.shutdown()
