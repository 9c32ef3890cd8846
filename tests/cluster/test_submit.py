"""`pixfleet submit` against a real two-node Ray cluster with token auth: jobs run across both
nodes, failures come back with their reason, submissions without the token are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pixfleet.storage import Location
from tests.helpers import register_controlnet, tiny_spec, upload

pytestmark = pytest.mark.timeout(420)
PROJECT = Path(__file__).resolve().parents[2]


def pixfleet(cluster, *args: str, with_token: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixfleet.cli", *args],
        cwd=PROJECT,
        env=cluster.env(with_token),
        capture_output=True,
        text=True,
        timeout=400,
    )


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def generation_config(tiny_dir, fill50k_dir, tmp_path, **extra) -> dict:
    """Two generation actors of 0.6 CPU: no 1-CPU node holds both, so each node runs one."""
    return {
        "name": "cluster-generate",
        "model": tiny_spec(tiny_dir, "controlnet").model_dump(mode="json"),
        "source": {"path": str(fill50k_dir)},
        "preprocess": {"width": 32, "height": 32},
        "params": {"num_inference_steps": 2},
        "sink": {"output_dir": str(tmp_path / "out")},
        "resources": {
            "batch_size": 2,
            "batches_per_block": 1,
            "num_cpus_per_actor": 0.6,
            "min_actors": 2,
            "max_actors": 2,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cluster"},
        **extra,
    }


def test_a_submission_without_the_token_is_refused(cluster, tmp_path, tiny_dir, fill50k_dir):
    config = write(tmp_path / "job.yaml", generation_config(tiny_dir, fill50k_dir, tmp_path))
    refused = pixfleet(cluster, "submit", "generate", str(config), "--address", cluster.address, with_token=False)
    assert refused.returncode == 2
    assert "cannot use the Jobs API" in refused.stderr and "Unauthorized" in refused.stderr
    listed = pixfleet(cluster, "jobs", "list", "--address", cluster.address)
    assert listed.returncode == 0, listed.stderr


def test_a_generation_job_runs_on_both_nodes_with_every_file_in_a_bucket(
    cluster, tmp_path, tiny_dir, fill50k_dir, bucket
):
    """Model, inputs and outputs in the bucket: the nodes share nothing else (MLflow stays with
    the driver)."""
    model = upload(tiny_dir / "controlnet", f"{bucket}/models/tiny-controlnet")
    spec = {"task": "controlnet", "base_model": model, "controlnets": [f"{model}/controlnet"], "scheduler": "unipc"}
    extra = {"model": spec, "source": {"path": upload(fill50k_dir, f"{bucket}/fill50k")}}
    config = generation_config(tiny_dir, fill50k_dir, tmp_path, **extra)
    config["sink"]["output_dir"] = f"{bucket}/out"
    result = pixfleet(
        cluster,
        "submit",
        "generate",
        str(write(tmp_path / "job.yaml", config)),
        "--address",
        cluster.address,
        "--wait",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split("submitted generate job ")[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in result.stdout

    assert len((Location.of(bucket) / "out" / "images").files((".png",))) == 16
    assert (Location.of(bucket) / "out" / "manifest.parquet").is_file() and not (tmp_path / "out").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["cluster"])
    assert runs["status"].tolist() == ["FINISHED"] and runs["metrics.images_ok"].tolist() == [16]
    assert len(cluster.nodes_of("GenerateStage")) == 2

    status = pixfleet(cluster, "jobs", "status", job_id, "--address", cluster.address)
    assert f"{job_id} SUCCEEDED" in status.stdout


def test_a_broken_config_fails_the_job_with_the_error_in_its_logs(cluster, tmp_path, tiny_dir, fill50k_dir):
    config = write(tmp_path / "job.yaml", generation_config(tiny_dir, fill50k_dir, tmp_path, bogus_key=1))
    result = pixfleet(cluster, "submit", "generate", str(config), "--address", cluster.address, "--wait")
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert f"{config}: field 'bogus_key': unknown key" in result.stderr  # the job's last log lines
    job_id = result.stdout.split("submitted generate job ")[1].split()[0]
    logs = pixfleet(cluster, "jobs", "logs", job_id, "--address", cluster.address)
    assert "error: " in logs.stdout and "Traceback" not in logs.stdout


def test_two_training_workers_span_both_nodes_starting_from_the_registry(
    cluster, tmp_path, tiny_dir, fill50k_dir, bucket
):
    """Workers of 0.6 CPU on 1-CPU nodes: one per node, gloo across them; each resolves the
    registry's ControlNet itself (the job gets only its URI) and reads its rows from the bucket,
    where the checkpoints and the trained ControlNet go too."""
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    register_controlnet(tiny_dir / "controlnet" / "controlnet", "cluster-seed", tracking_uri, tmp_path / "artifacts")
    config = {
        "name": "cluster-train",
        "train": {
            "pretrained_model_name_or_path": str(tiny_dir / "controlnet"),
            "controlnet_model_name_or_path": "models:/cluster-seed@champion",
            "train_data_dir": upload(fill50k_dir, f"{bucket}/fill50k"),
            "output_dir": f"{bucket}/controlnet",
            "resolution": 32,
            "train_batch_size": 2,
            "max_train_steps": 4,
            "lr_warmup_steps": 0,
        },
        "distributed": {
            "strategy": "ddp",
            "num_workers": 2,
            "cpus_per_worker": 0.6,
            "storage_path": f"{bucket}/ray_train",
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment": "cluster"},
    }
    result = pixfleet(
        cluster, "submit", "train", str(write(tmp_path / "train.yaml", config)), "--address", cluster.address, "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (Location.of(bucket) / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (Location.of(bucket) / "ray_train" / "cluster-train").is_dir()
    assert len(cluster.nodes_of("RayTrainWorker")) == 2


def test_a_serve_job_deploys_an_api_that_outlives_the_job(cluster, tmp_path, tiny_dir):
    from tests.serving.conftest import free_port, post_upload, serving_config, write_yaml

    port = free_port()
    # Two nodes on one machine cannot both bind the port: one proxy, on the head.
    config = serving_config(tiny_dir, f"sqlite:///{tmp_path}/mlflow.db", port, "cluster", route_prefix="/")
    config = config.model_copy(update={"http": config.http.model_copy(update={"proxy_location": "HeadOnly"})})
    path = write_yaml(config, tmp_path / "serve.yaml")
    result = pixfleet(cluster, "submit", "serve", str(path), "--address", cluster.address, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    response = post_upload(f"http://127.0.0.1:{port}", seed=1)
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["seed"] == 1
