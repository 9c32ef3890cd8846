"""A ControlNet fine-tuning job: train_controlnet.py's options, distribution, tracking."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.generation import ControlPreprocessConfig
from pixfleet.config.paths import ExistingPath, ModelOrPath
from pixfleet.config.tracking import TrackingConfig

Interpolation = Literal["lanczos", "bicubic", "bilinear", "nearest"]


class ValidationMetricsConfig(StrictModel):
    """The evaluation's metrics on the validation images (see `pixfleet.evaluation`)."""

    control: ControlPreprocessConfig | None = Field(
        None,
        description="The detector that made the validation control images, with its settings (e.g. canny and "
        "its thresholds): each validation image's controllability (ControlNet++'s protocol). Unset: none.",
    )
    clip_model: ModelOrPath | None = Field(
        None, description="A transformers CLIP model: each validation image's CLIP score. Unset: none."
    )

    @model_validator(mode="after")
    def _something_to_measure(self) -> ValidationMetricsConfig:
        if self.control is None and self.clip_model is None:
            raise ValueError("validation_metrics: set control (a detector) or clip_model, or both")
        if self.control is not None and self.control.detector == "none":
            raise ValueError("validation_metrics.control: name the detector that made the validation images")
        return self


class ControlNetTrainingArgs(StrictModel):
    """The options of diffusers' examples/controlnet/train_controlnet.py and train_controlnet_sdxl.py,
    same names and defaults; the base model's type (SD or SDXL) picks the script followed."""

    pretrained_model_name_or_path: ModelOrPath = Field(
        description="Base Stable Diffusion or SDXL pipeline: hub id, folder or MLflow model URI."
    )
    pretrained_vae_model_name_or_path: ModelOrPath | None = Field(
        None,
        description="A VAE (hub id or folder, no subfolder) instead of the base's, e.g. SDXL's fp16-safe VAE; it "
        "then runs in the mixed precision dtype, while the base's own SDXL VAE stays in float32.",
    )
    controlnet_model_name_or_path: ModelOrPath | None = Field(
        None, description="ControlNet to start from; unset initialises one from the UNet."
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    variant: str | None = Field(None, description="Weights variant of the base model, e.g. 'fp16'.")
    output_dir: str = Field(
        "controlnet-model", description="Where the trained ControlNet is saved: a folder or s3://, gs://, abfs://."
    )
    seed: int | None = Field(None, description="Seed for reproducible training.")
    resolution: int = Field(
        512, ge=8, multiple_of=8, description="Images are resized and center-cropped to this size (a multiple of 8)."
    )
    image_interpolation_mode: Interpolation | None = Field(
        None, description="Resize filter; unset: the script's (bilinear for SD, lanczos for SDXL)."
    )
    crops_coords_top_left_h: int | None = Field(
        None,
        ge=0,
        description="SDXL: the crop top coordinate given to the UNet for every row (the script's constant); unset: "
        "each row's own center-crop offset, with its real original size, as SDXL was pretrained.",
    )
    crops_coords_top_left_w: int | None = Field(
        None, ge=0, description="SDXL: the crop left coordinate, as crops_coords_top_left_h."
    )
    train_batch_size: int = Field(4, ge=1, description="Batch size per worker.")
    num_train_epochs: int = Field(1, ge=1, description="Epochs; max_train_steps wins when set.")
    max_train_steps: int | None = Field(None, ge=1, description="Total optimizer steps; overrides epochs.")
    checkpointing_steps: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = Field(
        None,
        description="'latest' resumes the run's last checkpoint; or a checkpoint folder: pixfleet's, or a "
        "checkpoint-N/ the diffusers scripts wrote (its ControlNet, step and schedule; its optimizer with ddp).",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the ControlNet.")
    learning_rate: float = Field(5e-6, gt=0, description="Initial learning rate (after warmup).")
    scale_lr: bool = Field(False, description="Scale the learning rate by accumulation steps x batch size x workers.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("constant", description="Learning rate schedule.")
    lr_warmup_steps: int = Field(500, ge=0, description="Warmup steps of the schedule.")
    lr_num_cycles: int = Field(1, ge=1, description="Hard resets of cosine_with_restarts.")
    lr_power: float = Field(1.0, description="Power factor of the polynomial schedule.")
    use_8bit_adam: bool = Field(False, description="bitsandbytes 8-bit Adam (CUDA only).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="Weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: Annotated[
        Literal["no", "fp16", "bf16"],
        BeforeValidator(lambda value: "no" if value is None else value),
        Field(description="Autocast precision of frozen parts; null (the script's default) means 'no'."),
    ] = "no"
    enable_xformers_memory_efficient_attention: bool = Field(False, description="Use xformers attention.")
    enable_npu_flash_attention: bool = Field(False, description="Refused: needs torch_npu on Ascend NPUs.")
    set_grads_to_none: bool = Field(False, description="zero_grad(set_to_none=True): saves memory.")
    allow_tf32: bool = Field(
        False, description="TF32 matmuls and convolutions on Ampere and newer GPUs: faster fp32, slightly less exact."
    )
    train_data_dir: ExistingPath | None = Field(
        None,
        description="Training data: an imagefolder with metadata.jsonl, a .jsonl/.csv/.parquet file, a folder of "
        "parquet files (as load_dataset('parquet', data_dir=...) reads it), or a save_to_disk folder; local or "
        "s3://, gs://, abfs://.",
    )
    dataset_name: str | None = Field(
        None,
        description="Instead of train_data_dir: what `datasets.load_dataset` takes (a hub dataset, a local dataset "
        "folder or loading script); its 'train' split.",
    )
    dataset_config_name: str | None = Field(None, description="The dataset's configuration, with dataset_name.")
    cache_dir: str | None = Field(None, description="Where `datasets` and `from_pretrained` cache downloads.")
    tokenizer_name: ModelOrPath | None = Field(
        None, description="Tokenizer to use instead of the base model's (hub id or folder)."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="Preprocessing actors feeding the workers (0 and 1: one, as the script's main process)."
    )
    report_to: Literal["mlflow", "tensorboard", "all"] = Field(
        "mlflow",
        description="Where metrics go: MLflow (always, with tracking.enabled), 'tensorboard' or 'all' adds "
        "TensorBoard event files under output_dir/logging_dir (rank 0's machine).",
    )
    logging_dir: str = Field("logs", description="TensorBoard log folder, relative to output_dir.")
    tracker_project_name: str | None = Field(
        None, description="The MLflow experiment (sets tracking.experiment), as the script names its tracker."
    )
    push_to_hub: bool = Field(False, description="Refused: no hub is reachable; register in MLflow (registry).")
    hub_model_id: str | None = Field(None, description="Refused with push_to_hub; use registry.model_name.")
    hub_token: str | None = Field(None, description="Refused with push_to_hub; MLflow needs no hub token.")
    image_column: str = Field("image", description="Column with the target images.")
    conditioning_image_column: str = Field("conditioning_image", description="Column with the control images.")
    caption_column: str = Field("text", description="Column with the captions.")
    max_train_samples: int | None = Field(None, ge=1, description="Truncate the data set to this many rows.")
    proportion_empty_prompts: float = Field(
        0.0, ge=0, le=1, description="Share of captions replaced by the empty string."
    )
    validation_prompt: list[str] = Field(default_factory=list, description="Prompts of the validation images.")
    validation_image: list[ExistingPath] = Field(
        default_factory=list, description="Control images of the validation prompts (one, or one per prompt)."
    )
    num_validation_images: int = Field(4, ge=1, description="Images per validation prompt.")
    validation_steps: int = Field(100, ge=1, description="Run validation every N steps.")
    validation_metrics: ValidationMetricsConfig | None = Field(
        None,
        description="Score the validation images at each validation (pixfleet's): controllability and CLIP "
        "score as curves in MLflow beside the loss, the last ones tagged on the registered version.",
    )

    @model_validator(mode="after")
    def _data_from_one_place(self) -> ControlNetTrainingArgs:
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("set one of train_data_dir (a local folder or file) and dataset_name (load_dataset)")
        return self

    @model_validator(mode="after")
    def _no_npu(self) -> ControlNetTrainingArgs:
        if self.enable_npu_flash_attention:
            raise ValueError("enable_npu_flash_attention: needs torch_npu on Ascend NPUs; Ray Train runs CUDA or CPU")
        return self

    @model_validator(mode="after")
    def _crop_given_whole(self) -> ControlNetTrainingArgs:
        if (self.crops_coords_top_left_h is None) != (self.crops_coords_top_left_w is None):
            raise ValueError("set both crops_coords_top_left_h and crops_coords_top_left_w, or neither")
        return self

    @model_validator(mode="after")
    def _no_hub(self) -> ControlNetTrainingArgs:
        hub = [name for name in ("push_to_hub", "hub_model_id", "hub_token") if getattr(self, name)]
        if hub:
            raise ValueError(
                f"{hub[0]}: no model hub is reachable from the cluster; register the trained ControlNet in MLflow "
                "with registry.model_name (and registry.alias), and load it as models:/NAME@ALIAS"
            )
        return self

    @model_validator(mode="after")
    def _validation_pairs(self) -> ControlNetTrainingArgs:
        prompts, images = len(self.validation_prompt), len(self.validation_image)
        if (prompts == 0) != (images == 0):
            raise ValueError("validation_prompt and validation_image must be given together")
        if self.validation_metrics and not prompts:
            raise ValueError(
                "validation_metrics: scores the validation images; set validation_prompt and validation_image"
            )
        if 1 not in (prompts, images) and prompts != images:
            raise ValueError(f"{prompts} validation prompts for {images} validation images: give 1 or as many")
        return self


class DistributedConfig(StrictModel):
    """How Ray Train runs the loop: workers, strategy, checkpoints, failures."""

    strategy: Literal["deepspeed", "ddp"] = Field("deepspeed", description="DeepSpeed ZeRO or plain DDP.")
    num_workers: int = Field(2, ge=1, description="Training workers (one per GPU on GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs reserved per worker; below 1 leaves room for Ray Data on small machines."
    )
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states on CPU (8 GB recipe).")
    offload_param: bool = Field(False, description="Parameters on CPU (ZeRO stage 3 only).")
    deepspeed_config: ExistingPath | None = Field(
        None, description="A DeepSpeed JSON whose keys override the generated config."
    )
    storage_path: str = Field(
        "outputs/ray_train",
        description="Where Ray Train keeps checkpoints: a folder every node sees, or s3://, gs://, abfs://.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker failures to recover from (-1: unlimited).")

    @model_validator(mode="after")
    def _offload_param_needs_stage_3(self) -> DistributedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3")
        return self


class RegistryConfig(StrictModel):
    """MLflow model registry entry for the trained ControlNet."""

    model_name: str | None = Field(None, description="Registered model name; unset skips registration.")
    alias: str | None = Field(None, description="Alias set on the new version, e.g. 'champion'.")


class TrainingJobConfig(StrictModel):
    """A ControlNet fine-tuning job, as written in `pipelines_cfg/train_*.yaml`."""

    name: str = Field("train-controlnet", description="Run name, for Ray Train and MLflow.")
    train: ControlNetTrainingArgs = Field(description="train_controlnet.py options.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Ray Train setup.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Model registry.")

    @model_validator(mode="before")
    @classmethod
    def _tracker_project_name_is_the_experiment(cls, data: Any) -> Any:
        """The script's tracker project is the MLflow experiment."""
        train = data.get("train") if isinstance(data, dict) else None
        name = train.get("tracker_project_name") if isinstance(train, dict) else None
        if not name:
            return data
        tracking = dict(data.get("tracking") or {})
        if tracking.setdefault("experiment", name) != name:
            raise ValueError(
                f"train.tracker_project_name {name!r} and tracking.experiment {tracking['experiment']!r} "
                "name two experiments; set one"
            )
        return {**data, "tracking": tracking}
