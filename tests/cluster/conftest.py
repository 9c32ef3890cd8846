"""A real two-node Ray cluster on this machine, started with `ray start` as a user would:
a head (1 CPU, dashboard and Jobs API on 127.0.0.1) and a worker node (1 CPU, its own temp
dir), with Ray's token authentication on. Stopped by killing the process groups it started."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import kill_group
from tests.serving.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class LocalCluster:
    address: str  # the Jobs API
    token: str

    def env(self, with_token: bool = True) -> dict[str, str]:
        """The submitting shell's environment: the cluster's token, or none."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(RAY_ADDRESS="")
        if with_token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def state(self, resource: str) -> list[dict]:
        """Ray's state API (`/api/v0/nodes`, `/api/v0/actors`), with the token."""
        response = httpx.get(
            f"{self.address}/api/v0/{resource}",
            params={"limit": 1000},
            headers={"authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def nodes_of(self, class_fragment: str) -> set[str]:
        """Nodes that ran an actor whose class name contains `class_fragment`."""
        return {a["node_id"] for a in self.state("actors") if class_fragment in a["class_name"]}


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        # A small object store each: CI machines may have little shared memory.
        [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=300000000",
            *args,
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # As from an activated environment: job entrypoints run `python`, found on the nodes' PATH.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(RAY).parent}:{env.get('PATH', '')}")
    logs = tmp_path_factory.mktemp("cluster_logs")
    gcs_port, dashboard_port = free_port(), free_port()
    # Short temp dirs: Ray's socket paths must stay under 107 characters.
    head_dir, worker_dir = tempfile.mkdtemp(prefix="pxh-"), tempfile.mkdtemp(prefix="pxw-")
    head = _ray_start(
        [
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=1",
            f"--temp-dir={head_dir}",
            # Its own job agent port: another Ray on this machine (the tests' in-process one) may
            # hold the default, and a head without its agent refuses every job.
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env,
        logs / "head.log",
    )
    processes = [head]
    try:
        local = LocalCluster(f"http://127.0.0.1:{dashboard_port}", token)
        _wait(lambda: len(local.state("nodes")) == 1, head, logs / "head.log")
        worker = _ray_start(
            [
                f"--address=127.0.0.1:{gcs_port}",
                "--num-cpus=1",
                f"--temp-dir={worker_dir}",
                f"--dashboard-agent-listen-port={free_port()}",
            ],
            env,
            logs / "worker.log",
        )
        processes.append(worker)
        _wait(
            lambda: len([n for n in local.state("nodes") if n["state"] == "ALIVE"]) == 2, worker, logs / "worker.log"
        )
        yield local
    finally:
        for process in processes:
            kill_group(process)
        for folder in (head_dir, worker_dir):
            shutil.rmtree(folder, ignore_errors=True)


def _wait(ready, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray did not come up: {log.read_text()[-2000:]}")
