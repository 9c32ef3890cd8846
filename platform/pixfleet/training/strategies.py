"""Distribution strategies: plain DDP or DeepSpeed ZeRO, behind one small interface.

Both give the loop the same operations: `backward(loss)`, `step()` (an optimizer step at each
accumulation boundary: clip, step, schedule, zero grads), `save(dir)` / `load(dir)` (a
resumable state, called on every rank), `full_state_dict()` (the whole weights on rank 0,
gathered under ZeRO-3) and `module` (the bare ControlNet).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from pixfleet.config.training import ControlNetTrainingArgs, DistributedConfig
from pixfleet.errors import UserError
from pixfleet.storage import Location

DDP_STATE = "ddp_state.pt"
DEEPSPEED_TAG = "deepspeed"


class TrainingSetupError(UserError, RuntimeError):
    """The requested setup cannot run here (e.g. 8-bit Adam without CUDA)."""


def check_setup(args: ControlNetTrainingArgs, dist: DistributedConfig) -> None:
    """Refuse, before any worker starts, a setup that cannot run with these resources."""
    if args.use_8bit_adam and dist.strategy == "deepspeed":
        raise TrainingSetupError("use_8bit_adam applies to the ddp strategy; DeepSpeed brings its own AdamW")
    if args.use_8bit_adam and not dist.use_gpu:
        raise TrainingSetupError("use_8bit_adam needs bitsandbytes on a CUDA GPU; set it false on CPU")
    if args.mixed_precision == "fp16" and not dist.use_gpu:
        raise TrainingSetupError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")


def deepspeed_config(args: ControlNetTrainingArgs, dist: DistributedConfig, learning_rate: float) -> dict[str, Any]:
    """The DeepSpeed config from the typed config; a user JSON's keys override it (deep merge)."""
    zero: dict[str, Any] = {"stage": dist.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    if dist.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    if dist.zero_stage == 3:  # lets `save_16bit_model` gather whole weights for the diffusers folder
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": zero,
        # DeepSpeed's own optimizer: ZeRO-Offload refuses a client torch optimizer. Without
        # offload it is torch's AdamW (the script's), sparing the JIT build of DeepSpeed's
        # FusedAdam at every cold start (about a minute); offload needs DeepSpeedCPUAdam.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learning_rate,
                "betas": [args.adam_beta1, args.adam_beta2],
                "eps": args.adam_epsilon,
                "weight_decay": args.adam_weight_decay,
                **({} if dist.offload_optimizer else {"torch_adam": True}),
            },
        },
        "fp16": {"enabled": args.mixed_precision == "fp16"},
        "bf16": {"enabled": args.mixed_precision == "bf16"},
        "steps_per_print": 10**9,
    }
    if dist.deepspeed_config:
        config = _deep_merge(config, json.loads(Location.of(dist.deepspeed_config).read_text()))
    return config


def _ask_cpu_info_once() -> None:
    """py-cpuinfo answers each `get_cpu_info()` by starting a Python subprocess (about a second on
    two cores), and DeepSpeed's CPU Adam and op builders ask three times per engine: the CPU does
    not change within a process, so the first answer serves the rest."""
    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _lr_scheduler(args: ControlNetTrainingArgs, optimizer, max_train_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def _adamw(args: ControlNetTrainingArgs, params, learning_rate: float) -> torch.optim.Optimizer:
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingSetupError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


class DDPStrategy:
    """torch DDP through Ray Train's `prepare_model`; accumulation without needless all-reduces."""

    def __init__(self, controlnet, args: ControlNetTrainingArgs, learning_rate: float, max_train_steps: int):
        import ray.train.torch

        self.args = args
        self.model = ray.train.torch.prepare_model(controlnet)
        self.module = getattr(self.model, "module", self.model)
        self.optimizer = _adamw(args, self.module.parameters(), learning_rate)
        self.lr_scheduler = _lr_scheduler(args, self.optimizer, max_train_steps)
        self.micro_step = 0

    partitions_parameters = False

    def sync_context(self):
        """No gradient all-reduce on micro-steps before an accumulation boundary."""
        at_boundary = (self.micro_step + 1) % self.args.gradient_accumulation_steps == 0
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if at_boundary or no_sync is None else no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.args.gradient_accumulation_steps).backward()

    def step(self) -> bool:
        """Count a micro-step; at a boundary clip, step and schedule. True when it stepped."""
        self.micro_step += 1
        if self.micro_step % self.args.gradient_accumulation_steps:
            return False
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.args.set_grads_to_none)
        return True

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def save(self, folder: Path, rank: int) -> None:
        if rank == 0:  # DDP replicas are identical: one copy
            state = {
                "controlnet": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "micro_step": self.micro_step,
            }
            torch.save(state, folder / DDP_STATE)

    def load(self, folder: Path) -> None:
        state = torch.load(folder / DDP_STATE, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["controlnet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_step = state["micro_step"]


class DeepSpeedStrategy:
    """A DeepSpeed engine over the ControlNet; ZeRO shards optimizer state across ranks."""

    def __init__(
        self,
        controlnet,
        args: ControlNetTrainingArgs,
        dist: DistributedConfig,
        learning_rate: float,
        max_train_steps: int,
    ):
        import deepspeed

        _ask_cpu_info_once()
        self.args = args
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=controlnet,
            model_parameters=[p for p in controlnet.parameters() if p.requires_grad],
            config=deepspeed_config(args, dist, learning_rate),
            lr_scheduler=lambda optimizer: _lr_scheduler(args, optimizer, max_train_steps),
        )
        self.model = self.engine
        self.module = self.engine.module

    def sync_context(self):
        return contextlib.nullcontext()  # the engine defers reduction to the boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    @property
    def partitions_parameters(self) -> bool:
        """ZeRO-3: each rank holds a slice of every parameter; forwards gather them collectively."""
        return self.engine.zero_optimization_stage() == 3

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole ControlNet's weights on rank 0 (None elsewhere). Every rank must call it."""
        if not self.partitions_parameters:
            return self.module.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_16bit_model(tmp, "controlnet.bin")  # gathers; keeps the weights' own dtype
            path = Path(tmp) / "controlnet.bin"
            return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def save(self, folder: Path, rank: int) -> None:
        # Every rank: ZeRO shards live on each, and a rank-0-only save deadlocks in its barrier.
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
