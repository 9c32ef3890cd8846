"""The per-worker training loop: train_controlnet.py's step under Ray Train.

Runs on every worker. Rank 0 alone logs to MLflow and renders validation images; every rank
saves checkpoints (DeepSpeed shards its optimizer state across them).
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pixfleet.config.training import ControlNetTrainingArgs, TrainingJobConfig
from pixfleet.tracking import format_duration
from pixfleet.training.data import load_tokenizer, with_local_models
from pixfleet.training.strategies import DDPStrategy, DeepSpeedStrategy
from pixfleet.training.validation import validation_grid

TRAINER_STATE = "trainer_state.json"
CONTROLNET_DIR = "controlnet"
VALIDATION_DIR = "validation"  # grids, in the MLflow run and (copied at the end) in output_dir


@dataclass
class LoopInputs:
    """What the driver hands every worker (Ray passes it inside `train_loop_config`)."""

    job: TrainingJobConfig
    num_rows: int
    registry_uri: str = ""  # where MLflow model URIs in the args resolve
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def max_train_steps(args: ControlNetTrainingArgs, num_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch), as the script computes them."""
    # Every worker gets an equal shard and drops its last partial batch, so all ranks step alike.
    batches_per_epoch = num_rows // world_size // args.train_batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"{num_rows} rows cannot fill one batch of {args.train_batch_size} on each of {world_size} workers"
        )
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch, steps_per_epoch


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


class Components:
    """The frozen parts (VAE, text encoder, UNet), the trained ControlNet and the noise schedule."""

    def __init__(self, args: ControlNetTrainingArgs, device: torch.device):
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        base, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        self.dtype = weight_dtype(args.mixed_precision)
        self.tokenizer = load_tokenizer(args)
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        self.text_encoder = CLIPTextModel.from_pretrained(
            base, subfolder="text_encoder", revision=revision, variant=variant
        )
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=revision, variant=variant)
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=revision, variant=variant)
        if args.controlnet_model_name_or_path:
            self.controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
        else:
            # Same widths as the UNet; the conditioning embedding must downsample as far as the VAE.
            downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
            channels = (16, 32, 96, 256)[: int(math.log2(downsample)) + 1]
            self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=channels)
        for frozen in (self.vae, self.unet, self.text_encoder):
            frozen.requires_grad_(False)
            frozen.to(device, dtype=self.dtype)
        self.controlnet.train()
        self.controlnet.to(device)
        if args.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
            self.controlnet.enable_xformers_memory_efficient_attention()

    def loss(self, controlnet, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The script's step: noise the image latents, predict with ControlNet residuals, MSE."""
        latents = self.vae.encode(batch["pixel_values"].to(self.dtype)).latent_dist.sample(generator)
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(self.dtype)
        encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
        down_samples, mid_sample = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=batch["conditioning_pixel_values"].to(self.dtype),
            return_dict=False,
        )
        model_pred = self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=[s.to(self.dtype) for s in down_samples],
            mid_block_additional_residual=mid_sample.to(self.dtype),
            return_dict=False,
        )[0]
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r} in the base model's scheduler")
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config["inputs"]` is a LoopInputs."""
    import ray.train
    import ray.train.torch

    inputs: LoopInputs = config["inputs"]
    job, args = inputs.job, with_local_models(inputs.job.train, inputs.registry_uri)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # 1. Components, learning rate and the step budget.
    if args.seed is not None:
        torch.manual_seed(args.seed)  # same ControlNet init on every rank
    parts = Components(args, device)
    total_steps, steps_per_epoch = max_train_steps(args, inputs.num_rows, world_size)
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world_size

    # 2. The strategy wraps the ControlNet: DDP or a DeepSpeed engine.
    if job.distributed.strategy == "deepspeed":
        strategy = DeepSpeedStrategy(parts.controlnet, args, job.distributed, learning_rate, total_steps)
    else:
        strategy = DDPStrategy(parts.controlnet, args, learning_rate, total_steps)

    # 3. Resume: a restarted worker group or a rerun gets Ray Train's latest checkpoint.
    global_step, first_epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and args.resume_from_checkpoint not in (None, "latest"):
        checkpoint = ray.train.Checkpoint.from_directory(args.resume_from_checkpoint)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            strategy.load(Path(folder))
            state = json.loads((Path(folder) / TRAINER_STATE).read_text())
        global_step = state["global_step"]
        first_epoch = global_step // steps_per_epoch
    tracker = _RankZeroTracker(inputs) if rank == 0 else None

    # 4. The loop: epochs over this worker's shard, micro-batches accumulated into steps.
    generator = torch.Generator(device="cpu").manual_seed((args.seed or 0) * 1000 + rank + global_step)
    shard = ray.train.get_dataset_shard("train")
    start = time.perf_counter()
    for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch)):
        for batch in shard.iter_torch_batches(batch_size=args.train_batch_size, device=device, drop_last=True):
            with strategy.sync_context():
                with torch.autocast(device.type, dtype=parts.dtype, enabled=args.mixed_precision != "no"):
                    loss = parts.loss(strategy.model, batch, generator)
                strategy.backward(loss)
            if not strategy.step():
                continue
            global_step += 1
            seconds, start = time.perf_counter() - start, time.perf_counter()
            samples = args.train_batch_size * args.gradient_accumulation_steps * world_size
            metrics = {
                "loss": float(loss.detach()),
                "lr": strategy.learning_rate,
                "samples_per_second": samples / seconds,
                "peak_memory_mb": peak_memory_mb(device),
                "step": global_step,
                "epoch": epoch,
            }
            if tracker:
                tracker.log_metrics(metrics, global_step)
                tracker.print_step(global_step, total_steps, metrics)
            # Every validation_steps, and once at the end as the script's final validation.
            validating = args.validation_prompt and (
                global_step % args.validation_steps == 0 or global_step == total_steps
            )
            # Under ZeRO-3 every rank must run the forwards that gather the parameters.
            if validating and (rank == 0 or strategy.partitions_parameters):
                grid = validation_grid(parts, strategy.module, args)
                if tracker:
                    tracker.log_image(grid, f"{VALIDATION_DIR}/step_{global_step:06d}.png", global_step)
            # Ray Train reports only with checkpoints: its controller takes one report per
            # poll (2 s), so a report every step would throttle training; MLflow gets them all.
            if global_step % args.checkpointing_steps == 0 or global_step == total_steps:
                _report_with_checkpoint(strategy, metrics, rank, global_step)
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break


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

            self.tensorboard = SummaryWriter(str(Path(args.output_dir) / args.logging_dir / inputs.job.name))
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
        print(
            f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{metrics['samples_per_second']:.1f} samples/s | ETA {eta}",
            flush=True,
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
