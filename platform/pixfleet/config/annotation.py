"""An annotate job: raw photos in, a ControlNet training set out (image, control map, caption)."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.generation import ControlPreprocessConfig, SourceConfig
from pixfleet.config.paths import ExistingPath, ModelOrPath
from pixfleet.config.tracking import TrackingConfig

TEMPLATE_FIELDS = ("stem", "parent")


class AnnotateSourceConfig(StrictModel):
    """Raw images: a folder (every image a row, no captions) or a table with an image column
    and, where it has them, captions (a manifest, an imagefolder, a `datasets` folder, shards)."""

    format: Literal["auto", "folder", "manifest", "hf_dataset", "webdataset"] = Field(
        "auto", description="How to read `path`; 'auto' infers it from what is there."
    )
    path: ExistingPath = Field(description="Folder of images, manifest file (.jsonl/.csv/.parquet) or shard folder.")
    image_column: str = Field("image", description="Column with the photo (path or bytes).")
    caption_column: str = Field("text", description="Column with a caption; empty cells get one from `caption`.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")

    def as_source(self) -> SourceConfig:
        """The generation source that reads the same rows: the photo as the source image."""
        return SourceConfig(
            format=self.format,
            path=self.path,
            prompt_column=self.caption_column,
            source_image_column=self.image_column,
            limit=self.limit,
        )


class CaptionConfig(StrictModel):
    """Captions for rows whose source has none: a captioning model, else a template."""

    model: ModelOrPath | None = Field(
        None,
        description="Hub id or folder of a transformers image-captioning model (BLIP, GIT, ...), e.g. "
        "Salesforce/blip-image-captioning-large; run as an actor stage of its own.",
    )
    prompt: str | None = Field(None, description="Text the model continues (BLIP's conditional captioning).")
    max_new_tokens: int = Field(30, ge=1, le=512, description="Longest caption the model writes, in tokens.")
    template: str | None = Field(
        None,
        description="Caption without a model, e.g. 'a photo of a {parent}': {stem} is the image file's name "
        "without suffix, {parent} its folder's name.",
    )
    overwrite: bool = Field(False, description="Caption every row, also those whose source has a caption.")

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str | None) -> str | None:
        if template is not None:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
            unknown = [name for name in names if name not in TEMPLATE_FIELDS]
            if unknown:
                raise ValueError(f"template field {{{unknown[0]}}} is not one of {{stem}}, {{parent}}")
        return template

    @model_validator(mode="after")
    def _one_way(self) -> CaptionConfig:
        if self.model and self.template is not None:
            raise ValueError("set caption.model or caption.template, not both")
        if self.overwrite and not self.model and self.template is None:
            raise ValueError("caption.overwrite needs caption.model or caption.template")
        return self


class FilterConfig(StrictModel):
    """Rows kept out of the training set, each recorded in the manifest with the reason."""

    min_size: int = Field(0, ge=0, description="Drop images whose shorter side is below this, in pixels.")
    max_aspect_ratio: float | None = Field(
        None, ge=1, description="Drop images whose longer side exceeds the shorter side this many times."
    )
    near_duplicate_distance: int | None = Field(
        None,
        ge=0,
        le=12,
        description="Drop an image whose perceptual hash (64-bit DCT hash) lies within this many bits of an "
        "image kept before it (0: only visually identical ones; 4-8 also catches re-encoded, resized copies; "
        "at most 12, past which the hash index would probe tens of thousands of values per row); "
        "unset keeps near-duplicates. Identical files are always dropped.",
    )
    min_map_coverage: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Drop rows whose control map is nearly empty: the fraction of its pixels that differ from "
        "its most common value (for edges: the edge pixels) below this.",
    )


class AnnotateResourcesConfig(StrictModel):
    """Ray resources of the detector and captioner stages."""

    batch_size: int = Field(8, ge=1, description="Images per detector / captioner call.")
    batches_per_block: int = Field(4, ge=1, description="Batches per Ray Data block.")
    detector_actors: int = Field(1, ge=1, description="Detector actors, each holding its model.")
    num_gpus_per_detector: float = Field(0.0, ge=0, description="GPUs per detector actor (a fraction shares one).")
    num_cpus_per_detector: float = Field(0.5, gt=0, description="CPUs per detector actor.")
    caption_actors: int = Field(1, ge=1, description="Captioner actors, each holding its model.")
    num_gpus_per_captioner: float = Field(0.0, ge=0, description="GPUs per captioner actor.")
    num_cpus_per_captioner: float = Field(0.5, gt=0, description="CPUs per captioner actor.")

    @property
    def rows_per_block(self) -> int:
        return self.batch_size * self.batches_per_block

    def actor_needs(self, captions: bool) -> dict[str, float]:
        """CPUs and GPUs the actor pools hold for the whole job."""
        pools = [(self.detector_actors, self.num_cpus_per_detector, self.num_gpus_per_detector)]
        if captions:
            pools.append((self.caption_actors, self.num_cpus_per_captioner, self.num_gpus_per_captioner))
        return {"CPU": sum(n * cpus for n, cpus, _ in pools), "GPU": sum(n * gpus for n, _, gpus in pools)}


class AnnotateJobConfig(StrictModel):
    """`pixfleet annotate`: photos -> imagefolder (images/, conditioning_images/, metadata.jsonl)."""

    name: str = Field("annotate", description="Run name in MLflow.")
    source: AnnotateSourceConfig
    detector: ControlPreprocessConfig = Field(description="How each photo's control map is made.")
    resolution: int | None = Field(
        None,
        ge=8,
        description="Resize each photo (Lanczos) so its shorter side has this many pixels before detection, "
        "as training will see it; unset keeps the photos' size.",
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Refuse images with more pixels than this (decompression bombs)."
    )
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    output_dir: str = Field(
        "outputs/annotate", description="The training set's folder or bucket prefix (resumed if it exists)."
    )
    resources: AnnotateResourcesConfig = Field(default_factory=AnnotateResourcesConfig)
    max_failed_fraction: float = Field(
        0.1, ge=0, le=1, description="Stop when more than this fraction of rows failed (filtered rows do not count)."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _a_detector(self) -> AnnotateJobConfig:
        if self.detector.detector == "none":
            raise ValueError(
                "detector.detector: 'none' makes no control map; choose one that does (canny, depth, lineart, ...)"
            )
        return self

    def fingerprint(self) -> dict:
        """What decides a row's outputs: a folder resumed under other settings would mix them."""
        return self.model_dump(mode="json", include={"detector", "resolution", "caption", "filters"})
