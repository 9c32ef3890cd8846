"""Session fixtures: tiny models of every task and a fill50k set, built once and saved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pixfleet.cluster import start_local_ray
from pixfleet.models.tasks import TASKS
from tests.helpers import MULTI_CONTROLNET_TASKS

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The object store the tests use: an S3 API server on loopback (moto's), started when a test
# first asks for a bucket. Its address and a key pair go into the environment now, before any
# Ray starts, so every worker and every node the tests start reads the same store, through the
# standard AWS variables users set; a developer's own AWS settings never reach a real bucket.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(
    {
        "AWS_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": "pixfleet-tests",
        "AWS_SECRET_ACCESS_KEY": "pixfleet-tests-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
    os.environ.pop(variable, None)
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


def start_s3_server(endpoint: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """moto's standalone S3 (and IAM) server on `endpoint`, answering once it is up."""
    port = endpoint.rsplit(":", 1)[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_server(S3_ENDPOINT)
    yield S3_ENDPOINT
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket: its `s3://` URI."""
    import boto3

    name = f"pixfleet-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def pytest_collection_modifyitems(config, items):
    # The cluster tests start Rays of their own (a two-node cluster, embedded ones) whose agents
    # take Ray's default ports: they run first, before the session's in-process Ray holds them.
    items.sort(key=lambda item: not item.nodeid.startswith("tests/cluster/"))
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the CPU test of the same path runs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def project_dir(tmp_path_factory) -> Path:
    """A folder laid out as `make demo` leaves it: outputs/tiny/<task>, outputs/fill50k, and the
    README's tiny annotators: outputs/tiny/dpt, outputs/tiny/blip."""
    from pixfleet.data.fill50k import make_fill50k
    from pixfleet.models.tiny import make_tiny_captioner, make_tiny_depth_estimator, make_tiny_pipeline

    root = tmp_path_factory.mktemp("project")
    for task in TASKS:
        controlnets = 2 if task in MULTI_CONTROLNET_TASKS else 1
        make_tiny_pipeline(task, root / "outputs" / "tiny" / task, num_controlnets=controlnets)
    make_fill50k(root / "outputs" / "fill50k", n=16, size=64, seed=0)
    make_tiny_depth_estimator(root / "outputs" / "tiny" / "dpt")
    make_tiny_captioner(root / "outputs" / "tiny" / "blip")
    return root


@pytest.fixture(scope="session")
def tiny_dir(project_dir) -> Path:
    return project_dir / "outputs" / "tiny"


@pytest.fixture(scope="session")
def fill50k_dir(project_dir) -> Path:
    return project_dir / "outputs" / "fill50k"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session, sized like the CI machine, started as the embedded Ray is
    (on loopback, with its dashboard)."""
    import ray

    # Serve's handles and replicas report their load every 10 s by default, the autoscaler's
    # input: every half second, autoscaling tests see replicas follow load in seconds.
    for reporter in ("HANDLE", "REPLICA"):
        os.environ.setdefault(f"RAY_SERVE_{reporter}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    # Ray Train's controller polls its workers every 2 s: a finished run, a registered checkpoint
    # or a dead worker is seen up to 2 s late. Every half second, each training test ends sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
