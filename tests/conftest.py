"""Session fixtures: tiny models of every task and a fill50k set, built once and saved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pixfleet.models.tasks import TASKS
from tests.helpers import MULTI_CONTROLNET_TASKS


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
    """One local Ray for the session, sized like the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
