"""What model to load and how: base pipeline, ControlNets, scheduler, dtype, speed switches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.paths import ModelOrPath
from pixfleet.models.tasks import TASKS, TaskName

SchedulerName = Literal["unipc", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm"]


class FreeUConfig(StrictModel):
    """FreeU re-weighting of UNet skip and backbone features (values of the FreeU paper)."""

    s1: float = Field(0.9, description="Skip-feature scale of the first up stage.")
    s2: float = Field(0.2, description="Skip-feature scale of the second up stage.")
    b1: float = Field(1.5, description="Backbone-feature scale of the first up stage.")
    b2: float = Field(1.6, description="Backbone-feature scale of the second up stage.")


class LoraConfig(StrictModel):
    """LoRA weights to load into the pipeline (`pipe.load_lora_weights`)."""

    path: ModelOrPath = Field(description="Hub id or local folder/file of the LoRA weights.")
    weight_name: str | None = Field(None, description="File name inside `path`, if several.")
    adapter_name: str | None = Field(None, description="Name of the adapter; derived if unset.")
    scale: float = Field(1.0, description="Adapter weight applied with `set_adapters`.")


class TextualInversionConfig(StrictModel):
    """A textual inversion embedding to load (`pipe.load_textual_inversion`)."""

    path: ModelOrPath = Field(description="Hub id or local file/folder of the embedding.")
    token: str | None = Field(None, description="Token to bind it to; the file's own if unset.")


class OptimizationConfig(StrictModel):
    """Memory and speed switches of diffusers and PyTorch. The GPU fast path (channels_last,
    fused q/k/v projections, SDPA) is on by default on CUDA, where it is safe; `torch_compile`
    is opt-in, since compiling costs minutes that only a long job or a long-lived replica repays.
    """

    attention_slicing: bool = Field(False, description="Compute attention in slices (less memory).")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less memory; slower).")
    vae_tiling: bool = Field(False, description="Decode large images in overlapping tiles.")
    freeu: FreeUConfig | None = Field(None, description="Enable FreeU with these factors.")
    model_cpu_offload: bool = Field(False, description="Keep each model on CPU until it runs (needs an accelerator).")
    attention_backend: Literal["auto", "sdpa", "xformers"] = Field(
        "auto",
        description="xformers when installed under 'auto' on CUDA, else PyTorch SDPA (which picks FlashAttention "
        "kernels itself for fp16/bf16 on GPUs that have them).",
    )
    channels_last: bool | None = Field(
        None, description="UNet, ControlNets and VAE in channels_last memory format; unset: on for CUDA."
    )
    fuse_qkv_projections: bool | None = Field(
        None,
        description="One matmul for each attention's q, k and v (UNet, VAE, ControlNets); unset: on for CUDA "
        "without LoRAs (their q/k/v layers would be bypassed), attention slicing or xformers.",
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the UNet and every ControlNet; each actor or replica warms up with one call "
        "before it takes work, so no request pays for compilation.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (inductor's)."
    )
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager"] = Field(
        "inductor",
        description="torch.compile backend: inductor generates kernels; cudagraphs replays CUDA graphs; aot_eager "
        "traces without generating code (to check a model compiles, in seconds).",
    )

    @model_validator(mode="after")
    def _fusing_keeps_other_processors(self) -> OptimizationConfig:
        if self.fuse_qkv_projections and self.attention_slicing:
            raise ValueError("fuse_qkv_projections replaces sliced attention; set one of them")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            backend = self.compile_backend
            raise ValueError(f"compile_mode {self.compile_mode!r} is inductor's; compile_backend is {backend!r}")
        return self


class ModelSpec(StrictModel):
    """A pipeline to load: `base_model` plus ControlNets, as a user would with diffusers."""

    task: TaskName = Field(description=f"One of: {', '.join(TASKS)}.")
    base_model: ModelOrPath = Field(description="Hub id or local folder of the base pipeline.")
    controlnets: list[ModelOrPath] = Field(
        default_factory=list,
        description="Hub ids, local folders or MLflow URIs (models:/NAME@ALIAS) of the ControlNets; 2+ make a multi.",
    )
    scheduler: SchedulerName | None = Field(None, description="Swap the scheduler by name.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="torch_dtype the weights load in; 'auto': float16 on CUDA, float32 elsewhere."
    )
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda:0'...")
    variant: str | None = Field(None, description="Weight variant to load, e.g. 'fp16'.")
    use_safetensors: bool | None = Field(None, description="Require safetensors weights if true.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    optimizations: OptimizationConfig = Field(
        default_factory=OptimizationConfig, description="Memory and speed switches."
    )
    loras: list[LoraConfig] = Field(default_factory=list, description="LoRA weights to load.")
    textual_inversions: list[TextualInversionConfig] = Field(
        default_factory=list, description="Textual inversion embeddings to load."
    )

    @model_validator(mode="after")
    def _controlnets_match_task(self) -> ModelSpec:
        uses_controlnet = TASKS[self.task].uses_controlnet
        if uses_controlnet and not self.controlnets:
            raise ValueError(f"task {self.task!r} needs at least one entry in 'controlnets'")
        if not uses_controlnet and self.controlnets:
            raise ValueError(f"task {self.task!r} takes no 'controlnets'")
        if self.loras and self.optimizations.fuse_qkv_projections:
            raise ValueError("optimizations.fuse_qkv_projections would bypass the LoRA layers on q/k/v; unset it")
        return self

    @property
    def num_controlnets(self) -> int:
        return len(self.controlnets)
