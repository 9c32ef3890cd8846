"""A bulk generation job: where rows come from, how they are prepared, run and written."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.model import ModelSpec
from pixfleet.config.paths import ExistingPath
from pixfleet.config.tracking import TrackingConfig

FloatOrList = float | list[float]


class SourceConfig(StrictModel):
    """Input rows: a folder of images, a manifest, a `datasets` dataset or webdataset shards."""

    format: Literal["auto", "folder", "manifest", "hf_dataset", "webdataset"] = Field(
        "auto", description="How to read `path`; 'auto' infers it from what is there."
    )
    path: ExistingPath = Field(description="Folder, manifest file (.jsonl/.csv/.parquet) or shard folder.")
    id_column: str | None = Field(None, description="Column with stable row ids; hashed if unset.")
    prompt_column: str = Field("text", description="Column with the prompt (or instruction).")
    control_columns: list[str] = Field(
        default_factory=lambda: ["conditioning_image"],
        description="Image column(s) feeding the ControlNet(s); one is reused for all if single.",
    )
    source_image_column: str = Field("image", description="Image column edited by img2img, inpaint and pix2pix.")
    mask_column: str = Field("mask", description="Mask image column for inpaint (white = repaint).")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")


class ControlPreprocessConfig(StrictModel):
    """How one control map is made from its input image."""

    detector: Literal["none", "canny"] = Field(
        "none", description="'none' passes a ready-made control map; 'canny' detects edges."
    )
    low_threshold: int = Field(100, ge=0, le=255, description="Canny lower hysteresis threshold.")
    high_threshold: int = Field(200, ge=0, le=255, description="Canny upper hysteresis threshold.")


class PreprocessConfig(StrictModel):
    """Resizing and control-map detection, done on CPU before generation."""

    width: int = Field(512, ge=8, description="Output width in pixels (a multiple of 8).")
    height: int = Field(512, ge=8, description="Output height in pixels (a multiple of 8).")
    resize_mode: Literal["center_crop", "resize", "none"] = Field(
        "center_crop",
        description="Fill then crop to width x height, stretch to it, or keep each row's size.",
    )
    control: list[ControlPreprocessConfig] = Field(
        default_factory=lambda: [ControlPreprocessConfig()],
        description="One entry per ControlNet (or one reused for all).",
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Images larger than this are refused (decompression bombs)."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


_PIPELINE_DEFAULT = "unset uses the pipeline's own default"


class GenerationParams(StrictModel):
    """Per-row generation parameters; a source column of the same name overrides each one.

    Unset numeric parameters take the default of the task's diffusers pipeline (e.g. 50 steps
    for ControlNet, 100 for InstructPix2Pix), so a row without parameters equals a plain
    `pipe(prompt, image)` call.
    """

    prompt: str = Field("", description="Prompt used when the row has none.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    num_inference_steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description=f"Denoising steps; {_PIPELINE_DEFAULT}."
    )
    guidance_scale: Annotated[float, Field(ge=0)] | None = Field(
        None, description=f"Classifier-free guidance scale; {_PIPELINE_DEFAULT}."
    )
    image_guidance_scale: Annotated[float, Field(ge=0)] | None = Field(
        None, description=f"Pull towards the source image (pix2pix); {_PIPELINE_DEFAULT}."
    )
    strength: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description=f"Share of the source image re-noised (img2img, inpaint); {_PIPELINE_DEFAULT}."
    )
    controlnet_conditioning_scale: FloatOrList | None = Field(
        None, description=f"ControlNet residual scale, or one per ControlNet; {_PIPELINE_DEFAULT}."
    )
    guess_mode: bool = Field(False, description="ControlNet guesses content without a prompt.")
    control_guidance_start: FloatOrList | None = Field(
        None, description=f"Fraction of steps at which ControlNet starts; {_PIPELINE_DEFAULT}."
    )
    control_guidance_end: FloatOrList | None = Field(
        None, description=f"Fraction of steps at which ControlNet stops; {_PIPELINE_DEFAULT}."
    )
    num_images_per_prompt: int = Field(1, ge=1, le=16, description="Images generated per row.")
    seed: int | None = Field(None, description="Same seed for every row; unset derives one per row from the job seed.")


class SinkConfig(StrictModel):
    """Where images and the manifest go."""

    output_dir: str = Field("outputs/generate", description="Folder for images and manifest.")
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoded format.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")


class ResourcesConfig(StrictModel):
    """Ray resources of the stages."""

    batch_size: int = Field(4, ge=1, description="Rows per pipeline call.")
    batches_per_block: int = Field(
        4,
        ge=1,
        description="Pipeline batches per Ray Data block: more amortize Ray's per-task cost, fewer stream sooner.",
    )
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per generation actor: 0 on CPU, 1 or a fraction on GPU."
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per generation actor.")
    torch_threads: int | None = Field(
        None, ge=1, description="OMP threads per generation actor; unset lets Ray use its CPUs."
    )
    min_actors: int = Field(1, ge=1, description="Fewest generation actors.")
    max_actors: int = Field(1, ge=1, description="Most generation actors (autoscaled between).")
    preprocess_actors: int = Field(1, ge=1, description="Preprocessing actors.")
    num_cpus_per_preprocess: float = Field(
        0.25, gt=0, description="CPUs per preprocessing actor (fractional keeps reads running)."
    )

    @property
    def rows_per_block(self) -> int:
        return self.batch_size * self.batches_per_block

    @model_validator(mode="after")
    def _actor_range(self) -> ResourcesConfig:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class GenerationJobConfig(StrictModel):
    """A bulk generation job, as written in `pipelines_cfg/*.yaml`."""

    name: str = Field("generate", description="Job name, used for the MLflow run.")
    model: ModelSpec = Field(description="The pipeline to run.")
    source: SourceConfig = Field(description="Input rows.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="CPU preprocessing.")
    params: GenerationParams = Field(default_factory=GenerationParams, description="Per-row parameter defaults.")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Output.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    seed: int = Field(0, description="Job seed; each row's seed derives from it and the row id.")
    max_failed_fraction: float = Field(
        0.1, ge=0, le=1, description="Stop with an error when more rows than this fail."
    )

    @model_validator(mode="after")
    def _per_controlnet_lists_match(self) -> GenerationJobConfig:
        n = self.model.num_controlnets
        for name in (
            "controlnet_conditioning_scale",
            "control_guidance_start",
            "control_guidance_end",
        ):
            value = getattr(self.params, name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"params.{name} has {len(value)} values for {n} controlnet(s)")
        if n and len(self.preprocess.control) not in (1, n):
            raise ValueError(f"preprocess.control has {len(self.preprocess.control)} entries for {n} controlnets")
        return self
