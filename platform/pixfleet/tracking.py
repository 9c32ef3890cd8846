"""MLflow: one run per job, ended FAILED or KILLED (never left RUNNING) when interrupted; and
the duration format of the jobs' progress lines."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pixfleet.config import TrackingConfig

DEFAULT_STORE = Path("mlruns")
_MLFLOW_PARAM_LIMIT = 6000


class JobInterrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so runs end cleanly (like Ctrl-C)."""


def format_duration(seconds: float) -> str:
    """`42s`, `7m 08s`, `2h 05m`: for progress lines and ETAs."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def tracking_uri(config: TrackingConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a local sqlite store in ./mlruns."""
    if config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} as MLflow params (values cut at MLflow's limit)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:_MLFLOW_PARAM_LIMIT]
    return flat


@contextmanager
def sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise JobInterrupted(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_experiment(config: TrackingConfig) -> Any:
    """The mlflow module, pointed at the store (created, with its tables, when new) and at the
    experiment (created when new)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    if mlflow.get_experiment_by_name(config.experiment) is None:
        artifacts = None
        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///"):  # keep artifacts beside the database file
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        mlflow.create_experiment(config.experiment, artifact_location=artifacts)
    mlflow.set_experiment(config.experiment)
    return mlflow


_opening: dict[str, threading.Thread] = {}


def open_tracking_early(config: TrackingConfig) -> None:
    """Start MLflow's imports (2 s) in a thread while Ray starts, and open the store there too
    when it is a sqlite file that exists already. A new store is created by `mlflow_run` only,
    after the job's checks: a job that fails them leaves nothing behind. `mlflow_run` waits for
    the thread; a failure here is left for `mlflow_run` to raise, where the job reports it."""
    if not config.enabled:
        return
    uri = tracking_uri(config)

    def open_quietly() -> None:
        with suppress(Exception):  # raised again, and reported, by mlflow_run
            import mlflow  # noqa: F401

            if uri.startswith("sqlite:///"):
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401

                if Path(uri.removeprefix("sqlite:///")).is_file():
                    _open_experiment(config)

    _opening[config.experiment] = thread = threading.Thread(target=open_quietly, daemon=True)
    thread.start()


@contextmanager
def mlflow_run(config: TrackingConfig, run_name: str, params: Mapping[str, Any]) -> Iterator[Any]:
    """Open a run with `params`; yields the mlflow module (or None when tracking is off)."""
    if not config.enabled:
        with sigterm_raises():
            yield None
        return
    if opening := _opening.pop(config.experiment, None):
        opening.join()
    mlflow = _open_experiment(config)
    with sigterm_raises():
        mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)  # a child of `pixfleet eval`
        try:
            mlflow.log_params(flatten(params))
            yield mlflow
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")
