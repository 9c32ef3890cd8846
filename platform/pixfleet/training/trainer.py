"""Run a ControlNet fine-tuning job: check, ingest, train on Ray Train, save, track, register."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pixfleet.cluster import ensure_ray, run_beside
from pixfleet.config import ConfigError
from pixfleet.config.paths import is_mlflow_uri, looks_local
from pixfleet.config.training import TrainingJobConfig
from pixfleet.errors import UserError
from pixfleet.models.folders import check_model_folder
from pixfleet.models.registry import local_model, pin_version
from pixfleet.storage import Location, check_writable
from pixfleet.tracking import mlflow_run, open_tracking_early, tracking_uri
from pixfleet.training.data import table_rows, training_table, with_local_models
from pixfleet.training.loop import (
    CONTROLNET_DIR,
    VALIDATION_DIR,
    LoopInputs,
    max_train_steps,
    train_loop_per_worker,
)
from pixfleet.training.script_checkpoints import is_script_checkpoint, script_checkpoint_controlnet
from pixfleet.training.strategies import check_setup


class TrainingFailed(UserError, RuntimeError):
    """The workers failed past `max_failures`; the reason is the last line of the worker error."""


@dataclass
class TrainingSummary:
    """What a training run produced."""

    steps: int
    final_loss: float | None
    output_dir: str
    checkpoint_path: str | None
    mlflow_run_id: str | None = None
    model_version: str | None = None

    def render(self) -> str:
        lines = [
            f"steps              {self.steps}",
            f"final loss         {'-' if self.final_loss is None else f'{self.final_loss:.4f}'}",
            f"controlnet         {self.output_dir}",
            f"last checkpoint    {self.checkpoint_path or '-'}",
            f"mlflow run         {self.mlflow_run_id or '-'}",
            f"model version      {self.model_version or '-'}",
        ]
        return "\n".join(lines)


def run_training(job: TrainingJobConfig, address: str | None = None) -> TrainingSummary:
    """Train to max_train_steps (resuming when asked), save the ControlNet, track and register it."""
    import ray.train
    from ray.train.torch import TorchTrainer

    job = _with_absolute_paths(job)  # workers may not share the driver's working directory
    models = (job.train.pretrained_model_name_or_path, job.train.controlnet_model_name_or_path)
    registry_uri = tracking_uri(job.tracking) if any(m and is_mlflow_uri(m) for m in models) else ""
    written = job.model_dump(mode="json")  # MLflow records the URIs as given; the versions beside them
    job = _with_pinned_versions(job, registry_uri)
    resume = job.train.resume_from_checkpoint
    if resume not in (None, "latest") and is_script_checkpoint(resume):
        # A diffusers script's checkpoint-N/: training starts from its ControlNet (each worker
        # fetches it where the checkpoint lies in a bucket).
        script_checkpoint_controlnet(local_model(resume, registry_uri))  # checked here, before any work
        controlnet = (Location.of(resume) / CONTROLNET_DIR).uri
        job = job.model_copy(
            update={"train": job.train.model_copy(update={"controlnet_model_name_or_path": controlnet})}
        )
    args, dist = job.train, job.distributed
    storage = check_writable(dist.storage_path, "distributed.storage_path")
    output = check_writable(args.output_dir, "train.output_dir")

    # 1. Check inputs before any work: model folders, data columns, the step budget, old runs.
    local = with_local_models(args, registry_uri)
    controlnets = [local.controlnet_model_name_or_path] if local.controlnet_model_name_or_path else []
    check_model_folder(local.pretrained_model_name_or_path, "controlnet", controlnets)
    check_setup(args, dist)
    if args.resume_from_checkpoint is None and (storage / job.name).exists():
        raise ConfigError(
            f"{storage / job.name} holds an earlier run named {job.name!r}: set train.resume_from_checkpoint: latest "
            "to continue it, or choose another name"
        )
    table = training_table(args)
    if table.num_rows is not None:  # else counted below, by a task reading the table
        _check_step_budget(args, table_rows(table, args), dist.num_workers)
    open_tracking_early(job.tracking)
    ensure_ray(address)
    if table.num_rows is None:
        table = ray.get(run_beside(table.with_counts))
    num_rows = table_rows(table, args)
    total_steps = _check_step_budget(args, num_rows, dist.num_workers)

    # 2. Train under one MLflow run; rank 0 logs into it.
    with mlflow_run(job.tracking, job.name, written) as mlflow:
        if mlflow:
            pinned = {
                f"train.{field}.version": value
                for field in ("pretrained_model_name_or_path", "controlnet_model_name_or_path")
                if (value := getattr(args, field)) != written["train"][field]
            }
            mlflow.log_params(pinned)
        inputs = LoopInputs(
            job=job,
            table=table,  # where the rows are: each rank's preprocessing actors read their own
            num_rows=num_rows,
            registry_uri=registry_uri,
            mlflow_tracking_uri=mlflow.get_tracking_uri() if mlflow else None,
            mlflow_run_id=mlflow.active_run().info.run_id if mlflow else None,
        )
        resources = {"CPU": dist.cpus_per_worker} | ({"GPU": 1} if dist.use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"inputs": inputs},
            scaling_config=ray.train.ScalingConfig(
                num_workers=dist.num_workers, use_gpu=dist.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=job.name,
                storage_path=storage.path,
                storage_filesystem=None if storage.is_local else storage.fs,
                failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=args.checkpoints_total_limit),
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            failures = getattr(error, "worker_failures", None) or {}  # rank -> the worker's exception
            report = "\n".join([str(error), *(str(failure) for failure in failures.values())])
            raise TrainingFailed(f"training failed: {worker_reason(report)}") from error

        # 3. The final ControlNet, in diffusers format, from the last checkpoint, into output_dir
        # (over what is there: TensorBoard logs, with report_to, live beside the weights).
        metrics = result.metrics or {}
        summary = TrainingSummary(
            steps=int(metrics.get("step", total_steps)),
            final_loss=metrics.get("loss"),
            output_dir=output.uri,
            checkpoint_path=result.checkpoint.path,
        )
        with result.checkpoint.as_directory() as folder:
            model = Path(folder) / CONTROLNET_DIR
            output.upload_folder(model)
            if mlflow:  # the model alone: the registry version points here
                summary.mlflow_run_id = mlflow.active_run().info.run_id
                mlflow.log_artifacts(str(model), artifact_path=CONTROLNET_DIR)
        if mlflow:
            if args.validation_prompt:  # the grids rank 0 logged, beside the weights as the script keeps them
                with tempfile.TemporaryDirectory() as grids:
                    mlflow.artifacts.download_artifacts(
                        run_id=summary.mlflow_run_id, artifact_path=VALIDATION_DIR, dst_path=grids
                    )
                    output.upload_folder(Path(grids))
            scores = {name: value for name, value in metrics.items() if name.startswith("validation/")}
            summary.model_version = _register(mlflow, job, summary.mlflow_run_id, scores)
    return summary


def _check_step_budget(args, num_rows: int, num_workers: int) -> int:
    """The run's optimizer steps; ConfigError when the rows cannot fill a batch on every worker."""
    try:
        return max_train_steps(args, num_rows, num_workers)
    except ValueError as error:
        raise ConfigError(f"train.train_batch_size: {error}") from None


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def worker_reason(text: str) -> str:
    """The user-facing line of a worker failure: the last exception not raised by Ray itself."""
    lines = [line for line in text.splitlines() if line.strip()]
    raised = [m for m in map(_EXCEPTION_LINE.match, lines) if m and "ray." not in m.group(0).split(":")[0]]
    if raised:
        return f"{raised[-1].group(1)}: {raised[-1].group(2)}"
    return lines[-1].strip() if lines else "unknown error"


def _with_absolute_paths(job: TrainingJobConfig) -> TrainingJobConfig:
    """Local paths made absolute (workers may not share the driver's working directory); hub
    ids and URIs as they are."""

    def absolute(value: str | None) -> str | None:
        return Location.of(value).uri if value and looks_local(value) else value

    args = job.train
    train = args.model_copy(
        update={
            "pretrained_model_name_or_path": absolute(args.pretrained_model_name_or_path),
            "controlnet_model_name_or_path": absolute(args.controlnet_model_name_or_path),
            "train_data_dir": absolute(args.train_data_dir),
            "output_dir": absolute(args.output_dir),
            "validation_image": [absolute(p) for p in args.validation_image],
            "resume_from_checkpoint": args.resume_from_checkpoint
            if args.resume_from_checkpoint in (None, "latest")
            else absolute(args.resume_from_checkpoint),
        }
    )
    distributed = job.distributed.model_copy(update={"storage_path": absolute(job.distributed.storage_path)})
    return job.model_copy(update={"train": train, "distributed": distributed})


def _with_pinned_versions(job: TrainingJobConfig, registry_uri: str) -> TrainingJobConfig:
    """Aliases resolved once, here: every worker then starts from the same model version."""
    args = job.train
    train = args.model_copy(
        update={
            "pretrained_model_name_or_path": pin_version(args.pretrained_model_name_or_path, registry_uri),
            "controlnet_model_name_or_path": pin_version(args.controlnet_model_name_or_path, registry_uri),
        }
    )
    return job.model_copy(update={"train": train})


def _register(mlflow, job: TrainingJobConfig, run_id: str, scores: dict[str, float]) -> str | None:
    """A model version pointing at the run's ControlNet folder, tagged with the last validation
    scores (`validation_metrics`); the alias moves to it."""
    name, alias = job.registry.model_name, job.registry.alias
    if not name:
        return None
    client = mlflow.MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {f"pixfleet.{score}": f"{value:.6g}" for score, value in scores.items()}  # pixfleet.validation/...
    source = mlflow.get_artifact_uri(CONTROLNET_DIR)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"
