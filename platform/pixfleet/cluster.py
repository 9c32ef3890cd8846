"""Where jobs run: an embedded local Ray by default, a cluster given an address; and submission
of the same jobs to a cluster through the Ray Jobs API.

`pixfleet submit` ships the project folder as the job's working_dir (without .venv, outputs,
mlruns) and the job's config as YAML text in the job's environment, so the config may live
anywhere on the submitting machine; `jobs/*.py` read it back and run the library code the CLI
runs. The config is validated on the cluster, where its paths must exist.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import ray
from pydantic import BaseModel

from pixfleet.config.loading import ConfigError, read_config_data, validate_config
from pixfleet.errors import user_error_within

ConfigT = TypeVar("ConfigT", bound=BaseModel)
T = TypeVar("T")

JOB_CONFIG_ENV = "PIXFLEET_JOB_CONFIG"  # the job's config as YAML text
JOB_CONFIG_SOURCE_ENV = "PIXFLEET_JOB_CONFIG_SOURCE"  # where it came from, for error messages
ENTRYPOINTS = {kind: f"jobs/{kind}.py" for kind in ("generate", "annotate", "train", "serve", "eval")}
# Never uploaded: environments, outputs, stores and caches can be gigabytes.
WORKING_DIR_EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "outputs",
    "mlruns",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]
# Forwarded from the submitting shell when set there.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "HF_TOKEN", "HF_HUB_OFFLINE")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start an embedded local Ray on loopback
    (`start_local_ray`).

    The embedded Ray keeps Ray's token authentication on: Ray generates the token for a local
    cluster (`~/.ray/auth_token`, readable by its owner only) and its own processes use it; a
    client without it is refused by the GCS, the raylets and the agents. An already
    initialised Ray (a test session, a Ray Job's driver) is reused as it is.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray warns at every start that it turned authentication on, with advice to turn it off:
    # pixfleet keeps it on, so the advice stays out of the job's console.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    start_local_ray(logging_level=logging.WARNING)
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_uid == os.getuid():
        token.chmod(0o600)  # Ray writes it world-readable; it is a credential
    _watch_for_a_killed_driver()


def start_local_ray(**options) -> None:
    """Start a Ray of this machine alone, on loopback, with its dashboard.

    Ray binds its Prometheus endpoints (the node agent's, the dashboard's, the autoscaler's),
    which take no credential, to 127.0.0.1 only when the node's address is loopback, and it
    keeps a loopback address only where it holds the machine to be no cluster (its macOS and
    Windows default, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`): otherwise it resolves 127.0.0.1 to
    the machine's address, in the driver and again in every process that connects (its agents
    do). A local Ray is no cluster: the setting holds for this start, and the processes it
    starts inherit it, the driver's own environment being restored after. The dashboard serves
    Ray's state API, which Ray Train's placement-group cleaner asks every second (without it,
    it warns every second and cannot free a dead run's resources): on loopback, behind the
    token like the rest.
    """
    from ray._private import ray_constants

    # One machine has no node to be preempted: Ray Train's preemption watcher would be one more
    # actor process per run (about 1.3 s of a tiny run's 19 s here). Ray Train passes the
    # driver's setting to its controller; a user's own setting stands.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before = os.environ.get(variable)
    cluster = ray_constants.ENABLE_RAY_CLUSTER  # read when ray was imported: set for this start too
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **options,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def _watch_for_a_killed_driver() -> None:
    """Start `pixfleet.reaper` beside the embedded Ray: should this driver be killed, it ends
    the Ray processes that would otherwise outlive it (see the reaper's docstring)."""
    import subprocess

    import psutil

    driver = psutil.Process()
    subprocess.Popen(
        [sys.executable, "-m", "pixfleet.reaper", str(driver.pid), str(driver.create_time())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the driver's process group
    )


def load_job_config(cls: type[ConfigT], path: str | None, overrides: list[str]) -> ConfigT:
    """A job entrypoint's config: the file at `path`, else the YAML `pixfleet submit` put in
    the job's environment."""
    if path:
        from pixfleet.config import load_config

        return load_config(cls, path, overrides)
    text = os.environ.get(JOB_CONFIG_ENV)
    if text is None:
        raise ConfigError(f"no config: pass a YAML path or set {JOB_CONFIG_ENV}")
    source = os.environ.get(JOB_CONFIG_SOURCE_ENV, JOB_CONFIG_ENV)
    return validate_config(cls, read_config_data(text, source, overrides), source)


def job_main(
    config_cls: type[ConfigT],
    run: Callable[..., str],
    description: str,
    argv: list[str] | None = None,
    options: dict[str, str] | None = None,
) -> int:
    """A `jobs/*.py` entrypoint: `[CONFIG] [--set a.b=value ...]` and the `--NAME VALUE` of
    `options` (name: help), then `run(config, NAME=VALUE...)`; a user error prints as one
    `error:` line and exits with its code, as the CLI does."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", nargs="?", help=f"YAML file; default: ${JOB_CONFIG_ENV}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    for name, help_text in (options or {}).items():
        parser.add_argument(f"--{name}", help=help_text)
    args = parser.parse_args(argv)
    extra = {name: getattr(args, name) for name in options or {}}
    try:
        print(run(load_job_config(config_cls, args.config, args.overrides), **extra))
    except Exception as error:  # a user error, or one an actor raised, which comes wrapped by Ray
        if (user_error := user_error_within(error)) is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return user_error.exit_code
    return 0


def auth_token() -> str | None:
    """Ray's token (RAY_AUTH_TOKEN, or the file at RAY_AUTH_TOKEN_PATH), for a cluster
    started with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).read_text().strip() if path else None


def job_client(address: str | None):
    """A Jobs API client of `address` (or $RAY_ADDRESS), sending the token when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # unreachable, refused (401/403), not a Jobs API
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot use the Jobs API at {address}: {message}") from None


def submit_job(
    kind: str,
    config_path: Path,
    address: str | None,
    overrides: list[str],
    env: dict[str, str],
    working_dir: Path,
    entrypoint_num_cpus: float = 0,
    entrypoint_num_gpus: float = 0,
    entrypoint_args: list[str] | None = None,
) -> str:
    """Submit `kind`'s entrypoint with the config (and `entrypoint_args` after it) and return the job id."""
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    if not (working_dir / ENTRYPOINTS[kind]).is_file():
        raise ConfigError(f"{working_dir}: no {ENTRYPOINTS[kind]}; run from the project folder or pass --working-dir")
    import yaml

    data = read_config_data(config_path.read_text(), str(config_path), overrides)  # a syntax check before upload
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env_vars.update(env)
    env_vars[JOB_CONFIG_ENV] = yaml.safe_dump(data, sort_keys=False)
    env_vars[JOB_CONFIG_SOURCE_ENV] = str(config_path)
    client = job_client(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=shlex.join(["python", ENTRYPOINTS[kind], *(entrypoint_args or [])]),
                runtime_env={"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars},
                metadata={"pixfleet_kind": kind, "pixfleet_config": str(config_path)},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )
        except RuntimeError as error:
            # A head that just started has no job agent for a few seconds.
            if "No available agent" in str(error) and time.time() < deadline:
                time.sleep(2)
                continue
            raise ConfigError(f"the Jobs API at {client.get_address()} refused the job: {error}") from None


def wait_for_job(client, job_id: str, poll_s: float = 1.0) -> str:
    """Block until the job ends; its final status."""
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def stream_logs(client, job_id: str) -> None:
    """Print the job's log as it is written, until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def quiet_ray_data(ray_progress: bool) -> None:
    """Ray Data's per-operator bars and plan printouts bury the job's own line; keep them off
    unless asked for."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = ray_progress
    context.print_on_execution_start = ray_progress
    # Else Ray Data warns once that its bars are off, which is the point.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if ray_progress else logging.ERROR)


BESIDE_THE_JOB_CPUS = 0.1


def run_beside(fn: Callable[..., T], *args, **kwargs) -> ray.ObjectRef:
    """`fn(*args)` as a Ray task with a sliver of a CPU: bookkeeping of a job's output (its
    resume index, the merge of its records) that reads rows runs there, not in the driver,
    and fits beside actors that hold whole CPUs. Returns the task's reference."""
    return ray.remote(num_cpus=BESIDE_THE_JOB_CPUS)(fn).remote(*args, **kwargs)
