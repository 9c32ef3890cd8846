"""`pixfleet serve` as a user runs it: its own embedded Ray, real HTTP, SIGTERM to stop; and
the Serve config it writes for `serve deploy`, checked against Ray's own schema."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from pixfleet.console import is_chatter
from tests.helpers import kill_group, start_cli
from tests.serving.conftest import free_port, post_upload, serving_config, write_yaml


@pytest.mark.timeout(240)
def test_pixfleet_serve_answers_then_stops_on_sigterm(tmp_path, tiny_dir):
    port = free_port()
    config = serving_config(tiny_dir, f"sqlite:///{tmp_path}/mlflow.db", port, "cli", route_prefix="/")
    process = start_cli("serve", write_yaml(config, tmp_path / "serve.yaml"), tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.decode() for line in process.stdout), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        # The line is printed once deployed; SIGTERM before it meets Ray's own handler.
        while not any(f"at {url}" in line for line in lines):
            assert process.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.5)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        response = post_upload(url)
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        kill_group(process)
    time.sleep(0.5)  # the reader thread drains the last lines
    assert process.returncode == 130, "".join(lines)
    assert "stopped serving" in "".join(lines)
    assert not [line for line in lines if is_chatter(line.encode())]  # Serve's INFO lines: in the log


def test_written_serve_config_validates_against_serves_schema(tmp_path, tiny_dir):
    from ray.serve.schema import ServeDeploySchema

    config = serving_config(tiny_dir, f"sqlite:///{tmp_path}/mlflow.db", 8000, "deployed")
    out = tmp_path / "serve_config.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixfleet.cli",
            "serve",
            str(write_yaml(config, tmp_path / "s.yaml")),
            "--write-serve-config",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    app = schema.applications[0]
    assert app.import_path == "pixfleet.serving.app:app_from_args"
    assert {d.name for d in app.deployments} == {"ingress", "model-tiny-controlnet", "model-tiny-pix2pix"}
    assert schema.http_options.host == "127.0.0.1"
    # The args rebuild the same application.
    from pixfleet.serving.app import app_from_args

    assert app_from_args(app.args) is not None


def test_missing_api_key_variable_is_a_clear_error(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.delenv("PIXFLEET_NO_SUCH_KEY", raising=False)
    config = serving_config(tiny_dir, f"sqlite:///{tmp_path}/mlflow.db", 8000, "k", api_key_env="PIXFLEET_NO_SUCH_KEY")
    result = subprocess.run(
        [sys.executable, "-m", "pixfleet.cli", "serve", str(write_yaml(config, tmp_path / "s.yaml"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "api_key_env: environment variable PIXFLEET_NO_SUCH_KEY is not set" in result.stderr


def test_autoscaling_takes_every_serve_setting_with_serves_names_and_defaults():
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    from pixfleet.config.serving import AutoscalingConfig

    ours, serves = AutoscalingConfig().model_dump(), ServeAutoscaling()
    deprecated = {"metrics_interval_s", "smoothing_factor", "upscale_smoothing_factor", "downscale_smoothing_factor"}
    assert set(ours) == set(ServeAutoscaling.model_fields) - deprecated - {"policy"}
    for name, value in ours.items():
        default = getattr(serves, name)
        assert getattr(default, "value", default) == value, name
    tuned = AutoscalingConfig(
        min_replicas=0, max_replicas=3, initial_replicas=1, upscale_delay_s=1, downscaling_factor=0.5
    )
    assert ServeAutoscaling(**tuned.model_dump()).downscaling_factor == 0.5  # Serve takes what we pass


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be >= min_replicas"),
        ({"target_ongoing_requests": 0}, "autoscaling.target_ongoing_requests': Input should be greater than 0"),
        (
            {"max_replicas": 2, "initial_replicas": 3},
            "initial_replicas must lie between min_replicas and max_replicas",
        ),
        ({"upscale_delay_s": -1}, "autoscaling.upscale_delay_s': Input should be greater than or equal to 0"),
    ],
)
def test_autoscaling_serve_would_refuse_fails_the_config_check_naming_the_field(
    tmp_path, tiny_dir, autoscaling, message
):
    from typer.testing import CliRunner

    from pixfleet.cli import app

    config = serving_config(tiny_dir, f"sqlite:///{tmp_path}/mlflow.db", 8000, "a").model_dump(mode="json")
    config["models"][0]["autoscaling"] = autoscaling
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "models.0.autoscaling" in result.output and message in " ".join(result.output.split())
