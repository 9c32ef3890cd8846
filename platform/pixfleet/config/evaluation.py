"""`pixfleet eval`: a held-out set against a list of models, and promotion by the numbers."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.generation import (
    EvaluateConfig,
    GenerationJobConfig,
    GenerationParams,
    PreprocessConfig,
    ResourcesConfig,
    SinkConfig,
    SourceConfig,
    check_evaluation,
    check_params_for_model,
)
from pixfleet.config.model import ModelSpec
from pixfleet.config.tracking import TrackingConfig

FID = "fid"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"


class EvalModelConfig(StrictModel):
    """One model measured: a name for its outputs, child run and column of the table."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="e.g. champion, challenger, v7.")
    model: ModelSpec = Field(description="The pipeline; `models:/NAME@ALIAS` where the registry holds it.")


class MetricThresholdConfig(StrictModel):
    """What the challenger's primary metric must reach, as MLflow's MetricThreshold."""

    threshold: float | None = Field(None, description="The challenger's value must be at least (or most) this.")
    min_absolute_change: float | None = Field(
        None, ge=0, description="It must beat the champion's by at least this much."
    )
    min_relative_change: float | None = Field(
        None, ge=0, description="It must beat the champion's by at least this fraction of it."
    )
    greater_is_better: bool | None = Field(None, description="Unset: the metric's own direction.")


class GuardConfig(StrictModel):
    """How far a guard metric (CLIP score, another ControlNet's) may worsen."""

    max_absolute_worsening: float = Field(0.0, ge=0, description="Worsening allowed, in the metric's units.")
    max_relative_worsening: float | None = Field(
        None, ge=0, description="Worsening allowed, as a fraction of the champion's value (whichever is larger)."
    )
    greater_is_better: bool | None = Field(None, description="Unset: the metric's own direction.")


class PromotionConfig(StrictModel):
    """When `pixfleet eval --promote ALIAS` moves ALIAS to the challenger's version."""

    champion: str = Field("champion", description="The models entry measured as the champion.")
    challenger: str = Field("challenger", description="The models entry measured as the challenger.")
    primary: str = Field(description="The metric that decides, e.g. control_0.edge_f1 or clip_score.")
    rule: MetricThresholdConfig = Field(default_factory=MetricThresholdConfig, description="The primary's bar.")
    guards: dict[str, GuardConfig] = Field(
        default_factory=dict, description="Metrics that must not worsen past their tolerance, e.g. clip_score."
    )


class FidConfig(StrictModel):
    """FID of each model's outputs against the held-out set's own images."""

    inception: str = Field(
        description=f"Path of clean-fid's Inception feature file, {INCEPTION_FILE} (a TorchScript file; "
        "nothing is downloaded at run time)."
    )
    image_column: str = Field("image", description="The set's column with its own images (the targets).")
    bootstrap_samples: int = Field(100, ge=20, description="Resamples of FID's 95% interval (each one a full FID).")

    @field_validator("inception")
    @classmethod
    def _file_is_there(cls, value: str) -> str:
        if not Path(value).expanduser().is_file():
            raise ValueError(
                f"{value}: no such file. FID needs clean-fid's Inception features, {INCEPTION_FILE}: download it "
                f"once from {INCEPTION_URL} and put it at that path"
            )
        return str(Path(value).expanduser().resolve())


class EvalJobConfig(StrictModel):
    """The same rows, seeds and parameters through every model; one MLflow run with a child
    per model; a comparison table; with `--promote`, the registry's alias moved by the numbers."""

    name: str = Field("eval", description="Job name: the parent MLflow run's.")
    models: list[EvalModelConfig] = Field(min_length=1, description="The models measured.")
    source: SourceConfig = Field(description="The held-out rows (a manifest, imagefolder, annotate's output).")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="CPU preprocessing.")
    params: GenerationParams = Field(default_factory=GenerationParams, description="Per-row parameter defaults.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="The metrics.")
    sink: SinkConfig = Field(
        default_factory=lambda: SinkConfig(output_dir="outputs/eval"),
        description="Each model's outputs go under output_dir/<name>/, the comparison beside them.",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    seed: int = Field(0, ge=0, description="Job seed: every model gets the same row seeds.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples of each 95% bootstrap interval.")
    fid: FidConfig | None = Field(None, description="FID against the set's own images; unset: no FID.")
    promotion: PromotionConfig | None = Field(None, description="What `--promote` needs to move an alias.")

    @model_validator(mode="after")
    def _models_fit(self) -> EvalJobConfig:
        names = [entry.name for entry in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"models: names must differ, got {names}")
        tasks = {entry.model.task for entry in self.models}
        if len(tasks) > 1:
            raise ValueError(f"models: one task for all, got {sorted(tasks)}")
        for i, entry in enumerate(self.models):
            check_params_for_model(self.params, entry.model, "params")
            try:
                check_evaluation(self.evaluate, entry.model, self.preprocess)
            except ValueError as error:
                raise ValueError(f"models.{i} ({entry.name}): {error}") from None
        if self.promotion:
            if self.promotion.primary == FID:
                raise ValueError(
                    "promotion.primary: FID is a figure of the whole set, not of each image; use it as a guard"
                )
            if FID in self.promotion.guards and not self.fid:
                raise ValueError(f"promotion.guards.fid: set fid.inception (the path of {INCEPTION_FILE})")
            for role in ("champion", "challenger"):
                if getattr(self.promotion, role) not in names:
                    raise ValueError(f"promotion.{role}: no models entry named {getattr(self.promotion, role)!r}")
        return self

    def generation_job(self, entry: EvalModelConfig, output_dir: str) -> GenerationJobConfig:
        """The generation job that measures `entry`: every field but the model shared."""
        return GenerationJobConfig(
            name=f"{self.name}/{entry.name}",
            model=entry.model,
            source=self.source,
            preprocess=self.preprocess,
            params=self.params,
            sink=self.sink.model_copy(update={"output_dir": output_dir}),
            resources=self.resources,
            tracking=self.tracking,
            seed=self.seed,
            evaluate=self.evaluate,
        )
