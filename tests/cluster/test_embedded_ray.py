"""The embedded Ray that `pixfleet generate|train|serve` start by default: every port it opens
is on loopback (Ray's Prometheus endpoints take no credential), Ray's token authentication
stays on for the local users beside it (a client without the token is refused by the GCS and
the agents), and a driver killed with SIGKILL leaves no Ray process behind.

This module sorts first in the session on purpose: Ray's job agent serves HTTP on port 52365
only in the first Ray of a machine (a later one runs without it), and it is what is tested.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)
JOB_AGENT_PORT = 52365  # Ray's fixed default

DRIVER = """
import json, os, time
import ray
from pixfleet.cluster import ensure_ray

ensure_ray()
node = ray._private.worker.global_worker.node
print(json.dumps({"gcs": node.gcs_address, "ip": node.node_ip_address}), flush=True)
time.sleep(600)
"""


def _status(url: str, data: bytes | None = None, token: str | None = None) -> int:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):  # not HTTP (a gRPC port)
        return 0


def _gcs_status(address: str, token: str | None) -> str:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def _listening(driver_pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket the driver's Ray processes listen on."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if os.getpgid(process.pid) != driver_pid:
                continue
            connections = process.net_connections("inet")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        found += [
            (process.info["name"], c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN
        ]
    return found


def _listening_ports(driver_pid: int, name: str) -> list[int]:
    ports = [port for process, _, port in _listening(driver_pid) if process == name]
    assert ports, f"no {name} listening"
    return ports


def _session_processes(driver_pid: int) -> list[str]:
    """Processes of the driver's process group still running (the driver started it)."""
    names = []
    for process in psutil.process_iter(["name"]):
        try:
            if os.getpgid(process.pid) == driver_pid and process.status() != psutil.STATUS_ZOMBIE:
                names.append(process.info["name"])
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return names


def test_the_embedded_ray_refuses_clients_without_its_token_and_dies_with_its_driver(tmp_path):
    if any(c.laddr.port == JOB_AGENT_PORT and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("inet")):
        pytest.skip(f"another Ray on this machine holds port {JOB_AGENT_PORT}: a new one would have no job agent")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the defaults a user gets
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, env=env, cwd=tmp_path, start_new_session=True
    )
    try:
        info = json.loads(driver.stdout.readline())
        token_file = Path.home() / ".ray" / "auth_token"
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"

        # Nothing reachable from another machine: the GCS, the raylet, the agents, the
        # dashboard and the three Prometheus endpoints all listen on loopback.
        assert info["ip"] == "127.0.0.1"
        sockets = _listening(driver.pid)
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {
            name for name, *_ in sockets
        }
        assert [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")] == []
        # Local users still need the token: the GCS answers only with it.
        assert _gcs_status(info["gcs"], None) == "UNAUTHENTICATED"
        assert _gcs_status(info["gcs"], "not-the-token") == "UNAUTHENTICATED"
        assert _gcs_status(info["gcs"], token) == "OK"
        # The job agent, which would run code for whoever submits a job, and the runtime env agent.
        assert JOB_AGENT_PORT in _listening_ports(driver.pid, "ray::DashboardAgent")
        agent = JOB_AGENT_PORT
        jobs = f"http://{info['ip']}:{agent}/api/job_agent/jobs/"
        assert _status(jobs, data=b"{}") == 401
        assert _status(jobs, data=b"{}", token="not-the-token") == 403
        assert _status(jobs, data=b"{}", token=token) != 401
        for port in _listening_ports(driver.pid, "ray::RuntimeEnvAgent"):
            assert _status(f"http://{info['ip']}:{port}/get_or_create_runtime_env", data=b"x") == 401

        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(
            _session_processes(driver.pid)
        )
        os.kill(driver.pid, signal.SIGKILL)
        deadline = time.time() + 20
        while _session_processes(driver.pid) and time.time() < deadline:
            time.sleep(0.5)
        # Without the reaper Ray's agents outlive a killed driver by a minute.
        assert _session_processes(driver.pid) == []
    finally:
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == driver.pid:
                    process.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
