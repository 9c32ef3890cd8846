"""The per-worker training loop: the scripts' step (SD or SDXL, `components`) under Ray Train.

Runs on every worker. Rank 0 alone logs to MLflow and renders validation images; every rank
saves checkpoints (DeepSpeed shards its optimizer state across them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixfleet.cluster import quiet_ray_data
from pixfleet.config.training import ControlNetTrainingArgs, TrainingJobConfig
from pixfleet.console import quiet_libraries
from pixfleet.data.tables import TablePlan
from pixfleet.storage import Location
from pixfleet.tracking import format_duration
from pixfleet.training.components import load_components
from pixfleet.training.data import DataPlan, planned_dataset, with_local_models
from pixfleet.training.script_checkpoints import (
    is_script_checkpoint,
    load_script_checkpoint,
    script_checkpoint_step,
)
from pixfleet.training.strategies import DDPStrategy, DeepSpeedStrategy
from pixfleet.training.validation import ValidationScorer, validation_grid, validation_images

TRAINER_STATE = "trainer_state.json"
CONTROLNET_DIR = "controlnet"
VALIDATION_DIR = "validation"  # grids, in the MLflow run and (copied at the end) in output_dir


@dataclass
class LoopInputs:
    """What the driver hands every worker (Ray passes it inside `train_loop_config`)."""

    job: TrainingJobConfig
    table: TablePlan  # where the rows are (`data.training_table`), counted
    num_rows: int  # of them, training uses
    registry_uri: str = ""  # where MLflow model URIs in the args resolve
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def max_train_steps(args: ControlNetTrainingArgs, num_rows: int, world_size: int) -> int:
    """Optimizer steps in the run, as the script computes them."""
    # Every worker gets an equal shard and drops its last partial batch, so all ranks step alike.
    batches_per_epoch = num_rows // world_size // args.train_batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"{num_rows} rows cannot fill one batch of {args.train_batch_size} on each of {world_size} workers"
        )
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config["inputs"]` is a LoopInputs."""
    import ray.train
    import ray.train.torch

    quiet_libraries()
    inputs: LoopInputs = config["inputs"]
    job, args = inputs.job, with_local_models(inputs.job.train, inputs.registry_uri)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()

    # 1. Where this run starts: the step of Ray Train's latest checkpoint (a restarted worker
    # group, or a rerun of the same name), of a diffusers script's checkpoint-N/, or 0.
    checkpoint = ray.train.get_checkpoint()
    script_checkpoint = None
    if checkpoint is None and args.resume_from_checkpoint not in (None, "latest"):
        if is_script_checkpoint(args.resume_from_checkpoint):  # its ControlNet is loaded as the start
            script_checkpoint = args.resume_from_checkpoint
        else:
            checkpoint = ray.train.Checkpoint.from_directory(args.resume_from_checkpoint)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        if folder:
            global_step = json.loads((folder / TRAINER_STATE).read_text())["global_step"]
        else:
            global_step = script_checkpoint_step(script_checkpoint) if script_checkpoint else 0
        total_steps = max_train_steps(args, inputs.num_rows, world_size)

        # 2. The data stream starts now: its preprocessing actors start, load the tokenizer (or
        # the text encoders) and make the first batch while this worker loads the models. This
        # worker's micro-batches from the one after the checkpoint, in the plan's order.
        quiet_ray_data(ray_progress=False)
        plan = DataPlan(inputs.num_rows, world_size, args.train_batch_size, args.seed or 0)
        accumulation = args.gradient_accumulation_steps
        first = global_step * accumulation
        dataset = planned_dataset(
            plan, rank, first, (total_steps - global_step) * accumulation, inputs.table, args, inputs.registry_uri
        )
        batches = FirstBatchEarly(
            dataset.iter_torch_batches(batch_size=args.train_batch_size, device=device, drop_last=True)
        )

        # 3. Components, learning rate, and the strategy around the ControlNet: DDP or DeepSpeed.
        if args.seed is not None:
            torch.manual_seed(args.seed)  # same ControlNet init on every rank
        parts = load_components(args, device)
        components_loaded = time.perf_counter() - started
        learning_rate = args.learning_rate
        if args.scale_lr:
            learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world_size
        if job.distributed.strategy == "deepspeed":
            strategy = DeepSpeedStrategy(parts.controlnet, args, job.distributed, learning_rate, total_steps)
        else:
            strategy = DDPStrategy(parts.controlnet, args, learning_rate, total_steps)
        if folder:
            strategy.load(folder)
        elif script_checkpoint:
            load_script_checkpoint(strategy, script_checkpoint)
    models_ready = time.perf_counter() - started
    tracker = _RankZeroTracker(inputs) if rank == 0 else None
    scorer = None  # validation_metrics' models, loaded at the first validation

    # 4. The loop: micro-batches accumulated into steps. Each micro-batch's noise is seeded by
    # its own index, so a resumed run draws what an uninterrupted one would.
    generator = torch.Generator(device="cpu")
    start = time.perf_counter()
    for micro_batch, batch in enumerate(batches, start=first):
        generator.manual_seed(int(np.random.SeedSequence([args.seed or 0, rank, micro_batch]).generate_state(1)[0]))
        with strategy.sync_context():
            with torch.autocast(device.type, dtype=parts.dtype, enabled=args.mixed_precision != "no"):
                loss = parts.loss(strategy.model, batch, generator)
            strategy.backward(loss)
        if not strategy.step():
            continue
        global_step += 1
        seconds, start = time.perf_counter() - start, time.perf_counter()
        samples = args.train_batch_size * accumulation * world_size
        metrics = {
            "loss": float(loss.detach()),
            "lr": strategy.learning_rate,
            "samples_per_second": samples / seconds,
            "peak_memory_mb": peak_memory_mb(device),
            "step": global_step,
            "epoch": micro_batch // plan.batches_per_epoch,
        }
        if tracker:
            if tracker.first_step is None:  # where the start-up went, once
                say(
                    f"rank 0 at its first step after {time.perf_counter() - started:.1f} s: models "
                    f"{components_loaded:.1f} s, strategy {models_ready - components_loaded:.1f} s, meanwhile "
                    f"the data stream (first batch after {batches.first_s:.1f} s)"
                )
            tracker.log_metrics(metrics, global_step)
            tracker.print_step(global_step, total_steps, metrics)
        # Every validation_steps, and once at the end as the script's final validation.
        validating = args.validation_prompt and (
            global_step % args.validation_steps == 0 or global_step == total_steps
        )
        # Under ZeRO-3 every rank must run the forwards that gather the parameters.
        if validating and (rank == 0 or strategy.partitions_parameters):
            rows = validation_images(parts, strategy.module, args)
            if tracker:
                tracker.log_image(validation_grid(rows), f"{VALIDATION_DIR}/step_{global_step:06d}.png", global_step)
                if args.validation_metrics:
                    scorer = scorer or ValidationScorer(args.validation_metrics, device)
                    metrics |= scorer(rows)  # reported with the checkpoint: the last ones tag the version
                    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("validation/")}, global_step)
        # Ray Train reports only with checkpoints: its controller takes one report per
        # poll (2 s), so a report every step would throttle training; MLflow gets them all.
        if global_step % args.checkpointing_steps == 0 or global_step == total_steps:
            _report_with_checkpoint(strategy, metrics, rank, global_step)
        if global_step >= total_steps:
            break


def say(line: str) -> None:
    """A line for the driver's console. Ray Train patches `print` in its workers to log as well
    as print, which Ray forwards twice; a write to stdout goes once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class FirstBatchEarly:
    """An iterable of batches whose first one is fetched in a thread from the moment it is
    made, so that the stream's start (actors, tokenizer, first reads) overlaps other work."""

    def __init__(self, batches):
        self.batches = iter(batches)
        self.made = time.perf_counter()
        self.first_s = float("nan")  # seconds from this object's making to its first batch
        self.first = concurrent.futures.ThreadPoolExecutor(1).submit(self._first)

    def _first(self):
        batch = next(self.batches, None)
        self.first_s = time.perf_counter() - self.made
        return batch

    def __iter__(self):
        first = self.first.result()
        if first is not None:
            yield first
            yield from self.batches


def _report_with_checkpoint(strategy, metrics: dict, rank: int, global_step: int) -> None:
    """Every rank writes its part into its own folder; Ray Train merges them in storage."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        strategy.save(folder, rank)
        weights = strategy.full_state_dict()
        if rank == 0:
            (folder / TRAINER_STATE).write_text(json.dumps({"global_step": global_step}))
            save_diffusers_model(strategy.module, weights, folder / CONTROLNET_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def save_diffusers_model(module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """What `save_pretrained` writes (config.json + safetensors), from weights gathered apart."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    module.save_config(folder)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "diffusion_pytorch_model.safetensors")


class _RankZeroTracker:
    """MLflow logging into the driver's run (and TensorBoard events with `report_to`), and the
    step line on the console, from rank 0.

        step 120/400 | loss 0.9871 | lr 5.00e-06 | 14.2 samples/s | ETA 3m 12s

    The line is printed for the first and last steps and then every `PRINT_INTERVAL_S`, as
    the script's tqdm bar would refresh; Ray forwards it to the driver's console.
    """

    PRINT_INTERVAL_S = 10.0

    def __init__(self, inputs: LoopInputs):
        from mlflow import MlflowClient

        self.run_id = inputs.mlflow_run_id
        self.client = MlflowClient(inputs.mlflow_tracking_uri) if self.run_id else None
        self.tensorboard = None
        args = inputs.job.train
        if args.report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter  # Ray's own dependency: no TensorFlow needed

            self.tensorboard = SummaryWriter((Location.of(args.output_dir) / args.logging_dir / inputs.job.name).uri)
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.last_print = float("-inf")

    def print_step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.start = step, now  # steps of this run only (a resumed run starts later)
        if step not in (self.first_step, total) and now - self.last_print < self.PRINT_INTERVAL_S:
            return
        self.last_print = now
        done = step - self.first_step
        eta = format_duration((total - step) * (now - self.start) / done) if done and step < total else "-"
        say(
            f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{metrics['samples_per_second']:.1f} samples/s | ETA {eta}"
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if self.tensorboard:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, float(value), step)
            self.tensorboard.flush()

    def log_image(self, image, artifact_file: str, step: int) -> None:
        if self.client:
            self.client.log_image(self.run_id, image, artifact_file)
        if self.tensorboard:
            self.tensorboard.add_image("validation", np.asarray(image), step, dataformats="HWC")
            self.tensorboard.flush()
