"""Every file in cluster/ parses and carries what its kind needs; the RayService's Serve config
passes Ray's own schema and matches what `pixfleet serve --write-serve-config` generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
CLUSTER = PROJECT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def pod_specs(ray_cluster_spec: dict) -> list[dict]:
    groups = [ray_cluster_spec["headGroupSpec"], *ray_cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_every_cluster_file_is_shipped_and_parses():
    names = {str(p.relative_to(CLUSTER)) for p in YAMLS}
    assert names == {
        "ray-cluster.yaml",
        "kuberay/rayjob-generate.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayservice.yaml",
    }
    for path in YAMLS:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_the_launcher_config_has_an_autoscaling_gpu_worker_and_a_private_token_guarded_head():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands"):
        assert key in config, key
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] >= 1 and 0 <= worker["min_workers"] <= worker["max_workers"]
    assert config["head_node_type"] in config["available_node_types"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any("pip install" in c and "pixfleet" in c for c in config["setup_commands"])


@pytest.mark.parametrize(("name", "script"), [("rayjob-generate", "generate"), ("rayjob-train", "train")])
def test_rayjobs_run_a_jobs_entrypoint_on_autoscaling_gpu_workers(name, script):
    job = load(f"kuberay/{name}.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", f"jobs/{script}.py"] and (PROJECT / entrypoint[1]).is_file()
    assert (PROJECT / entrypoint[2]).is_file(), f"{entrypoint[2]} is not in the project"
    cluster = job["spec"]["rayClusterSpec"]
    _check_ray_cluster(cluster)
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_rayservice_serve_config_passes_serves_schema_and_matches_the_serving_yaml():
    from ray.serve.schema import ServeDeploySchema

    from pixfleet.config import load_config
    from pixfleet.config.serving import ServingConfig
    from pixfleet.serving.app import serve_config

    service = load("kuberay/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    serving = load_config(ServingConfig, PROJECT / "pipelines_cfg/serve_sd15.yaml", ["http.host=0.0.0.0"])
    assert embedded == serve_config(serving), "regenerate serveConfigV2 (see the comment at the top of the file)"
    _check_ray_cluster(service["spec"]["rayClusterConfig"])
    env = {e["name"] for spec in pod_specs(service["spec"]["rayClusterConfig"]) for e in spec["containers"][0]["env"]}
    assert serving.api_key_env in env


def _check_ray_cluster(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    workers = spec["workerGroupSpecs"]
    assert workers and all(0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)
    for group in workers:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    for pod in pod_specs(spec):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
