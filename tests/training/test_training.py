"""ControlNet fine-tuning on Ray Train: loss falls, checkpoints resume, outputs load, runs are tracked."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from pixfleet.config.training import TrainingJobConfig
from pixfleet.models.registry import resolve_registry_models
from pixfleet.training.loop import TRAINER_STATE
from pixfleet.training.trainer import run_training
from tests.helpers import kill_group, start_cli, tiny_spec, tracking_uri, write_job_yaml

pytestmark = [pytest.mark.timeout(420), pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    from pixfleet.data.fill50k import make_fill50k

    return make_fill50k(tmp_path_factory.mktemp("train") / "fill50k", n=32, size=32, seed=1)


def train_job(
    tiny_dir, data: Path, tmp_path: Path, strategy: str, name: str = "run", workers: int = 1, **train
) -> TrainingJobConfig:
    """32 px, batch 4: 8 steps an epoch over 32 rows on one worker, 4 on two. One worker unless
    the test is about ranks: each rank is a worker process and a preprocessing actor to start."""
    return TrainingJobConfig.model_validate(
        {
            "name": name,
            "train": {
                "pretrained_model_name_or_path": str(tiny_dir / "controlnet"),
                "train_data_dir": str(data),
                "output_dir": str(tmp_path / "controlnet"),
                "resolution": 32,
                "train_batch_size": 4,
                "learning_rate": 1e-3,
                "lr_warmup_steps": 0,
                "seed": 0,
                **train,
            },
            "distributed": {"strategy": strategy, "num_workers": workers, "storage_path": str(tmp_path / "ray_train")},
            "tracking": {"tracking_uri": tracking_uri(tmp_path), "experiment": "tests"},
            "registry": {"model_name": "tiny-controlnet", "alias": "champion"},
        }
    )


def metric_history(tmp_path: Path, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def assert_loss_falls(losses: list[float], window: int = 6) -> None:
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    assert last < 0.92 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}"


def test_ddp_loss_falls_and_the_controlnet_loads_from_folder_and_registry(tiny_dir, train_data, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from ray.util.state import list_actors

    from pixfleet.models.tiny import make_tiny_clip

    image = str(train_data / "conditioning_images" / "000000.png")
    job = train_job(
        tiny_dir,
        train_data,
        tmp_path,
        "ddp",
        workers=2,
        max_train_steps=24,
        checkpointing_steps=12,
        validation_prompt=["red circle with blue background"],
        validation_image=[image],
        num_validation_images=2,
        validation_steps=12,
        validation_metrics={"control": {"detector": "canny"}, "clip_model": str(make_tiny_clip(tmp_path / "clip"))},
        report_to="all",
    )
    summary = run_training(job)

    # The step count and a loss that falls.
    history = metric_history(tmp_path, summary.mlflow_run_id)
    assert not list_actors(filters=[("class_name", "=", "PreemptionWatcher")])  # one machine: none to preempt
    assert [step for step, _ in history] == list(range(1, 25))
    assert_loss_falls([loss for _, loss in history])

    # MLflow: finished, params, per-step lr and throughput, validation grid, the model.
    run = mlflow.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.metrics["samples_per_second"] > 0 and run.data.metrics["lr"] == pytest.approx(1e-3)
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")] == [
        "validation/step_000012.png",
        "validation/step_000024.png",
    ]
    # validation_metrics: controllability and CLIP score as curves beside the loss.
    f1 = metric_history(tmp_path, summary.mlflow_run_id, "validation/control_0.edge_f1")
    clip = metric_history(tmp_path, summary.mlflow_run_id, "validation/clip_score")
    assert [step for step, _ in f1] == [step for step, _ in clip] == [12, 24]
    assert all(0 <= value <= 1 for _, value in f1) and all(0 <= value <= 100 for _, value in clip)
    # As the script keeps them: the grids and TensorBoard's events beside the weights, not in the model.
    output = Path(summary.output_dir)
    assert Image.open(output / "validation" / "step_000024.png").size == (32 * 3, 32)
    assert list((output / "logs" / "run").glob("events.out.tfevents.*"))
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "controlnet")) == [
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
    ]

    # The saved ControlNet (safetensors) loads into a plain diffusers pipeline and generates.
    assert (Path(summary.output_dir) / "diffusion_pytorch_model.safetensors").exists()
    controlnet = ControlNetModel.from_pretrained(summary.output_dir)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(tiny_dir / "controlnet"), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("red circle", image=torch.rand(1, 3, 32, 32), num_inference_steps=2, height=32, width=32)
    assert np.asarray(out.images[0]).shape == (32, 32, 3)

    # The registered version's alias resolves to the same weights; it carries its last scores.
    assert summary.model_version == "models:/tiny-controlnet/1"
    tags = client.get_model_version("tiny-controlnet", "1").tags
    assert float(tags["pixfleet.validation/control_0.edge_f1"]) == pytest.approx(f1[-1][1], rel=1e-5)
    assert float(tags["pixfleet.validation/clip_score"]) == pytest.approx(clip[-1][1], rel=1e-5)
    registered = mlflow.artifacts.download_artifacts("models:/tiny-controlnet@champion", dst_path=str(tmp_path / "dl"))
    from_registry = ControlNetModel.from_pretrained(registered)
    for (name, a), (_, b) in zip(controlnet.state_dict().items(), from_registry.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # ... and generation resolves the alias to that version.
    spec = tiny_spec(tiny_dir, "controlnet").model_copy(update={"controlnets": ["models:/tiny-controlnet@champion"]})
    resolved = resolve_registry_models(spec, f"sqlite:///{tmp_path}/mlflow.db")
    assert (Path(resolved.controlnets[0]) / "diffusion_pytorch_model.safetensors").read_bytes() == (
        Path(summary.output_dir) / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def script_checkpoint(tiny_dir: Path, folder: Path, steps: int) -> dict[str, torch.Tensor]:
    """A `checkpoint-N/` as the diffusers scripts write it: accelerate's save_state with a save
    hook that puts the ControlNet under controlnet/; the weights after `steps` optimizer steps."""
    from accelerate import Accelerator
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.optimization import get_scheduler

    unet = UNet2DConditionModel.from_pretrained(str(tiny_dir / "controlnet" / "unet"))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=8)
    accelerator = Accelerator(cpu=True)
    controlnet, optimizer, scheduler = accelerator.prepare(controlnet, optimizer, scheduler)

    def save_controlnet(models, weights, output_dir):
        models[0].save_pretrained(Path(output_dir) / "controlnet")
        weights.pop()

    accelerator.register_save_state_pre_hook(save_controlnet)
    for _ in range(steps):
        for parameter in controlnet.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        scheduler.step()
    accelerator.save_state(str(folder))
    return {k: v.clone() for k, v in controlnet.state_dict().items()}


def test_a_checkpoint_of_the_diffusers_script_resumes_its_controlnet_step_and_schedule(tiny_dir, train_data, tmp_path):
    from diffusers import ControlNetModel

    folder = tmp_path / "script-run" / "checkpoint-4"
    saved = script_checkpoint(tiny_dir, folder, steps=4)
    assert {"optimizer.bin", "scheduler.bin", "controlnet"} <= {p.name for p in folder.iterdir()}
    job = train_job(
        tiny_dir,
        train_data,
        tmp_path,
        "ddp",
        max_train_steps=6,
        resume_from_checkpoint=str(folder),
        lr_scheduler="linear",
        learning_rate=1e-3,
    )
    summary = run_training(job)

    assert [step for step, _ in metric_history(tmp_path, summary.mlflow_run_id)] == [5, 6]
    # The schedule went on from step 4 of 6 (from 0 it would be at 5/6 of the rate after a step).
    lrs = dict(metric_history(tmp_path, summary.mlflow_run_id, "lr"))
    assert lrs[5] == pytest.approx(1e-3 / 6)
    # Trained on from the checkpoint's weights: 4 Adam steps moved a zero conv by about 1e-3,
    # the 2 steps here at a third of that rate and less moved it far less.
    trained = ControlNetModel.from_pretrained(summary.output_dir).state_dict()["controlnet_mid_block.weight"]
    start = saved["controlnet_mid_block.weight"]
    assert start.abs().mean() > 1e-3
    assert (trained - start).abs().mean() < 0.5 * start.abs().mean()


def test_a_rerun_without_resume_refuses_to_overwrite_the_old_run(tiny_dir, train_data, tmp_path):
    from pixfleet.config import ConfigError

    (tmp_path / "ray_train" / "run").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds an earlier run named 'run': set train.resume_from_checkpoint"):
        run_training(train_job(tiny_dir, train_data, tmp_path, "ddp", max_train_steps=4))


def test_a_killed_worker_resumes_and_a_rerun_from_any_checkpoint_sees_the_same_batches(tiny_dir, train_data, tmp_path):
    # 32 rows on one worker in batches of 4: 8 steps an epoch, each epoch reshuffled. A worker
    # killed mid-run restarts from the last checkpoint and replays its steps exactly; a new run
    # resumed from the step-4 checkpoint (mid-epoch) and trained to 10, across the epoch's end,
    # sees what the first run saw from step 5, with equal losses (how rows are dealt to several
    # ranks: test_data_plan.py; resuming a rerun by `latest`: the SDXL test; from a diffusers
    # script's checkpoint: below). 40 steps outlast the controller's registration of the first
    # checkpoint (seconds).
    job = train_job(tiny_dir, train_data, tmp_path, "ddp", name="killed", max_train_steps=40, checkpointing_steps=4)
    job.distributed.max_failures = 1
    storage = tmp_path / "ray_train" / "killed"  # exists once the run has started
    killed = []

    def kill_a_worker_two_steps_after_the_first_checkpoint():
        # A checkpoint counts once Ray Train's controller has registered it, which it records in
        # the run folder's checkpoint manager snapshot; training runs past it in well under the
        # controller's poll on CPU, so wait for the snapshot and for step 6.
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        deadline = time.time() + 240
        while time.time() < deadline:
            registered = (storage / "checkpoint_manager_snapshot.json").exists()
            runs = client.search_runs(client.get_experiment_by_name("tests").experiment_id) if registered else []
            if runs and max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")), default=0) >= 6:
                break
            time.sleep(0.5)
        for process in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return

    killer = threading.Thread(target=kill_a_worker_two_steps_after_the_first_checkpoint, daemon=True)
    killer.start()
    summary = run_training(job)
    killer.join(timeout=5)

    assert killed, "no train worker was found to kill"
    assert summary.steps == 40
    history = metric_history(tmp_path, summary.mlflow_run_id)  # a replayed step is logged again
    steps = [step for step, _ in history]
    assert set(steps) == set(range(1, 41))
    assert steps.count(1) == 1  # restarted from a checkpoint, not from step 0
    losses: dict[int, float] = {}
    for step, loss in history:
        assert losses.setdefault(step, loss) == pytest.approx(loss, rel=1e-5), f"step {step} replayed differently"

    (at_step_4,) = [
        folder
        for folder in storage.glob("checkpoint_*/")
        if json.loads((folder / TRAINER_STATE).read_text())["global_step"] == 4
    ]
    resume = {"max_train_steps": 10, "resume_from_checkpoint": str(at_step_4)}
    resumed = run_training(train_job(tiny_dir, train_data, tmp_path, "ddp", name="resumed", **resume))
    resumed_losses = metric_history(tmp_path, resumed.mlflow_run_id)
    assert [step for step, _ in resumed_losses] == list(range(5, 11))
    np.testing.assert_allclose([v for _, v in resumed_losses], [losses[step] for step in range(5, 11)], rtol=1e-5)
    epochs = metric_history(tmp_path, resumed.mlflow_run_id, "epoch")
    assert [epoch for _, epoch in epochs] == [0, 0, 0, 0, 1, 1]


def test_a_bad_image_fails_the_run_naming_the_row_and_the_mlflow_run_ends_failed(tiny_dir, train_data, tmp_path):
    import shutil

    from pixfleet.training.trainer import TrainingFailed

    data = Path(shutil.copytree(train_data, tmp_path / "data"))
    (data / "images" / "000003.png").write_bytes(b"not a png")
    with pytest.raises(TrainingFailed, match=r"metadata.jsonl:4 image: cannot decode image"):
        run_training(train_job(tiny_dir, data, tmp_path, "ddp", max_train_steps=4))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert run.info.status == "FAILED"


def test_sigterm_ends_the_training_run_killed(tiny_dir, train_data, tmp_path):
    import re
    import signal
    import threading

    job = train_job(tiny_dir, train_data, tmp_path, "ddp", max_train_steps=400, checkpointing_steps=400)
    driver = start_cli("train", write_job_yaml(job, tmp_path / "job.yaml"), tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in driver.stdout), daemon=True)
    reader.start()
    try:
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        deadline = time.time() + 240
        # Under way: rank 0 printed its first step line (and logged the step to MLflow).
        while not any(
            re.search(r"step 1/400 \| loss \d\.\d{4} \| lr [\d.e+-]+ \| [\d.]+ samples/s", x) for x in lines
        ):
            assert driver.poll() is None and time.time() < deadline, "".join(lines)[-2000:]
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=90)
        reader.join(timeout=10)
        output = "".join(lines)
    finally:
        kill_group(driver)

    assert driver.returncode == 130, output[-2000:]
    assert "interrupted; rerun with --set train.resume_from_checkpoint=latest to resume" in output
    (run,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    assert run.info.status == "KILLED"
