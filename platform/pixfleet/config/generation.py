"""A bulk generation job: where rows come from, how they are prepared, run and written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from pixfleet.config.base import StrictModel
from pixfleet.config.model import ModelSpec
from pixfleet.config.paths import ExistingPath, ModelOrPath
from pixfleet.config.tracking import TrackingConfig
from pixfleet.evaluation.summary import METRIC_OF_DETECTOR, MS_SSIM_MIN_SIDE
from pixfleet.models.tasks import task_info, unused_parameters

PER_CONTROLNET = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
SEED_LIMIT = 2**63  # seeds are int64 in the manifest; torch generators take them all
_PIPELINE_DEFAULT = "unset uses the pipeline's own default"
Fraction = Annotated[float, Field(ge=0, le=1)]


def _as_list(value: Any) -> Any:
    return value if value is None or isinstance(value, list) else [value]


def _per_controlnet(item: Any, what: str) -> Any:
    """A value for every ControlNet, or a list of one per ControlNet (stored as a list)."""
    return Annotated[
        list[item] | None,
        BeforeValidator(_as_list, json_schema_input_type=item | list[item] | None),
        Field(None, description=f"{what}, one value for all ControlNets or one per ControlNet; {_PIPELINE_DEFAULT}."),
    ]


class SourceConfig(StrictModel):
    """Input rows: a folder of images, a manifest, a `datasets` dataset or webdataset shards."""

    format: Literal["auto", "folder", "manifest", "hf_dataset", "webdataset"] = Field(
        "auto", description="How to read `path`; 'auto' infers it from what is there."
    )
    path: ExistingPath = Field(
        description="Folder, manifest file (.jsonl/.csv/.parquet) or shard folder; local or s3://, gs://, abfs://."
    )
    id_column: str | None = Field(None, description="Column with stable row ids; hashed if unset.")
    prompt_column: str = Field("text", description="Column with the prompt (or instruction).")
    control_columns: list[str] = Field(
        default_factory=lambda: ["conditioning_image"],
        description="Image column(s) feeding the ControlNet(s); one is reused for all if single.",
    )
    source_image_column: str = Field("image", description="Image column edited by img2img, inpaint and pix2pix.")
    mask_column: str = Field("mask", description="Mask image column for inpaint (white = repaint).")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")


ImageDetector = Literal["none", "canny", "shuffle", "tile"]  # no model: run in the CPU preprocessing
TransformersDetector = Literal["depth", "segmentation"]
# ControlNet 1.1's annotators (controlnet_aux), weights laid out as lllyasviel/Annotators.
AnnotatorDetector = Literal[
    "lineart",
    "lineart_anime",
    "softedge_hed",
    "softedge_pidinet",
    "scribble_hed",
    "mlsd",
    "openpose",
    "normal_bae",
]
DetectorName = Literal[ImageDetector, TransformersDetector, AnnotatorDetector]
TRANSFORMERS_DETECTORS = get_args(TransformersDetector)
ANNOTATOR_DETECTORS = get_args(AnnotatorDetector)
MODEL_DETECTORS = TRANSFORMERS_DETECTORS + ANNOTATOR_DETECTORS  # run by the detect stage


class ControlPreprocessConfig(StrictModel):
    """How one control map is made from its input image."""

    detector: DetectorName = Field(
        "none",
        description="'none' passes a ready-made control map; 'canny' detects edges (OpenCV); 'shuffle' "
        "(content shuffle) and 'tile' (blur by downsampling) need no model; 'depth' runs `model`, a "
        "transformers depth-estimation model (DPT, Depth Anything, ...); 'segmentation' runs `model`, a "
        "transformers semantic-segmentation model trained on ADE20K (UperNet, SegFormer, ...), painted in the "
        "ADE20K palette; the others are ControlNet 1.1's annotators (controlnet_aux), their weights in "
        "`model`, a folder laid out as lllyasviel/Annotators or that hub id.",
    )
    low_threshold: int = Field(100, ge=0, le=255, description="Canny lower hysteresis threshold.")
    high_threshold: int = Field(200, ge=0, le=255, description="Canny upper hysteresis threshold.")
    model: ModelOrPath | None = Field(
        None,
        description="Hub id or folder of the detector's model, e.g. Intel/dpt-hybrid-midas (depth), "
        "openmmlab/upernet-convnext-small (segmentation), lllyasviel/Annotators (the annotators).",
    )
    detect_resolution: int = Field(
        512, ge=64, le=4096, description="Annotators and shuffle: the image's shorter side as the detector sees it."
    )
    coarse: bool = Field(False, description="lineart: the coarse model (sd-webui's lineart_coarse).")
    safe: bool = Field(
        False, description="softedge_hed, softedge_pidinet: quantised edges (sd-webui's hedsafe, pidisafe)."
    )
    mlsd_value_threshold: float = Field(0.1, ge=0.01, le=2, description="mlsd: score a line needs (thr_v).")
    mlsd_distance_threshold: float = Field(
        0.1, ge=0.01, le=20, description="mlsd: shortest line kept, in pixels of the detector's map (thr_d)."
    )
    include_body: bool = Field(True, description="openpose: draw the body's keypoints.")
    include_hand: bool = Field(False, description="openpose: detect and draw hands.")
    include_face: bool = Field(False, description="openpose: detect and draw the face.")
    tile_downsample: float = Field(
        1.0, ge=1, le=8, description="tile: downsample by this factor (and back): sd-webui's down sampling rate."
    )

    @property
    def uses_model(self) -> bool:
        return self.detector in MODEL_DETECTORS

    @property
    def a1111_module(self) -> str:
        """The preprocessor's name as sd-webui-controlnet records it."""
        if self.detector == "lineart":
            return "lineart_coarse" if self.coarse else "lineart_realistic"
        if self.detector in ("softedge_hed", "softedge_pidinet") and self.safe:
            return {"softedge_hed": "softedge_hedsafe", "softedge_pidinet": "softedge_pidisafe"}[self.detector]
        if self.detector == "openpose":
            parts = {"hand": self.include_hand, "face": self.include_face}
            return {(True, True): "openpose_full", (True, False): "openpose_hand", (False, True): "openpose_face"}.get(
                tuple(parts.values()), "openpose"
            )
        return {"tile": "tile_resample"}.get(self.detector, self.detector)

    def provenance(self) -> dict[str, Any]:
        """What made the map, as sd-webui-controlnet records it: the module and its settings."""
        return {"Module": self.a1111_module, **self.a1111_settings()}

    def a1111_settings(self) -> dict[str, Any]:
        """The settings sd-webui-controlnet records beside the module (its Processor Res and
        Threshold A/B)."""
        if self.detector == "canny":
            return {"Threshold A": self.low_threshold, "Threshold B": self.high_threshold}
        settings: dict[str, Any] = {}
        if self.detector in ANNOTATOR_DETECTORS or self.detector == "shuffle":
            settings["Processor Res"] = self.detect_resolution
        if self.detector == "mlsd":
            settings |= {"Threshold A": self.mlsd_value_threshold, "Threshold B": self.mlsd_distance_threshold}
        if self.detector == "tile":
            settings["Threshold A"] = self.tile_downsample
        return settings

    @model_validator(mode="after")
    def _model_for_model_detectors(self) -> ControlPreprocessConfig:
        if self.uses_model and self.model is None:
            example = " or lllyasviel/Annotators" if self.detector in ANNOTATOR_DETECTORS else ""
            raise ValueError(f"detector {self.detector!r} needs 'model' (a hub id{example} or folder)")
        if not self.uses_model and self.model is not None:
            raise ValueError(f"detector {self.detector!r} takes no 'model'")
        if self.detector in ANNOTATOR_DETECTORS:
            from pixfleet.models.annotators import folder_problems

            if problem := folder_problems(self.detector, self.model):
                raise ValueError(problem)
        return self


class PreprocessConfig(StrictModel):
    """Resizing and control-map detection, done on CPU before generation."""

    width: int = Field(512, ge=8, description="Output width in pixels (a multiple of 8).")
    height: int = Field(512, ge=8, description="Output height in pixels (a multiple of 8).")
    resize_mode: Literal["center_crop", "resize", "none"] = Field(
        "center_crop",
        description=(
            "Scale to cover width x height and cut the center (diffusers' 'crop'), stretch to it "
            "(diffusers' 'default'), or keep each row's size (the pipeline rounds it down to its VAE's multiple)."
        ),
    )
    resample: Literal["lanczos", "bicubic", "bilinear", "nearest"] = Field(
        "lanczos", description="Resampling filter of resizes; Lanczos is diffusers' VaeImageProcessor default."
    )
    control: list[ControlPreprocessConfig] = Field(
        default_factory=lambda: [ControlPreprocessConfig()],
        description="One entry per ControlNet (or one reused for all).",
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Images larger than this are refused (decompression bombs)."
    )

    def control_for(self, index: int) -> ControlPreprocessConfig:
        """The entry of ControlNet `index` (the single entry serves them all)."""
        return self.control[index if len(self.control) > 1 else 0]

    def control_provenance(self, num_controlnets: int) -> list[dict[str, Any]]:
        """Each ControlNet's map maker (`provenance`, and the detector's model), for the manifest."""
        records = []
        for i in range(num_controlnets):
            control = self.control_for(i)
            records.append(control.provenance() | ({"Preprocessor model": control.model} if control.model else {}))
        return records

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


class GenerationParams(StrictModel):
    """Per-row generation parameters; a source column of the same name overrides each one.

    Unset numeric parameters take the default of the task's diffusers pipeline (e.g. 50 steps
    for ControlNet, 100 for InstructPix2Pix), so a row without parameters equals a plain
    `pipe(prompt, image)` call. Numbers must be finite and in the ranges diffusers accepts.
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
    controlnet_conditioning_scale: _per_controlnet(float, "ControlNet residual scale")
    guess_mode: bool = Field(False, description="ControlNet guesses content without a prompt.")
    control_guidance_start: _per_controlnet(Fraction, "Fraction of steps at which ControlNet starts (0-1)")
    control_guidance_end: _per_controlnet(Fraction, "Fraction of steps at which ControlNet stops (0-1)")
    num_images_per_prompt: int = Field(1, ge=1, le=16, description="Images generated per row.")
    seed: int | None = Field(
        None,
        ge=0,
        lt=SEED_LIMIT,
        description="Seed of the row's first image (image k uses seed + k); unset derives one per row.",
    )

    @field_validator("control_guidance_end")
    @classmethod
    def _end_after_start(cls, end: list[float] | None, info: ValidationInfo) -> list[float] | None:
        start = info.data.get("control_guidance_start")
        if end is not None and start is not None:
            check_guidance_window(start, end)
        return end

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, seed: int | None, info: ValidationInfo) -> int | None:
        images = info.data.get("num_images_per_prompt", 1)
        if seed is not None and seed + images - 1 >= SEED_LIMIT:
            raise ValueError(f"seed + num_images_per_prompt - 1 must be below 2**63, got seed {seed}")
        return seed


def broadcast(values: list[float], n: int) -> list[float]:
    """A per-ControlNet list: one value stands for all `n`."""
    return values * n if len(values) == 1 else values


def check_guidance_window(start: list[float], end: list[float]) -> None:
    """ValueError unless each ControlNet starts before it ends."""
    n = max(len(start), len(end))
    for begin, stop in zip(broadcast(start, n), broadcast(end, n), strict=False):
        if begin >= stop:
            raise ValueError(f"control_guidance_start {begin} must be below control_guidance_end {stop}")


class SinkConfig(StrictModel):
    """Where images and the manifest go."""

    output_dir: str = Field(
        "outputs/generate", description="Folder (or s3://, gs://, abfs:// prefix) for images and manifest."
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoded format.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    save_control_maps: bool = Field(
        False, description="Also write each row's control maps (after detection) to control_maps/ as PNG."
    )


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
    initial_actors: int | None = Field(
        None,
        ge=1,
        description="Generation actors started at once, loading their models in parallel (e.g. one per GPU "
        "of the cluster); unset: min_actors. Ray Data adds actors beyond them one at a time as the queue grows.",
    )
    preprocess_actors: int = Field(1, ge=1, description="Preprocessing actors.")
    detector_actors: int = Field(
        1, ge=1, description="Actors of the model detectors (depth), each holding the models."
    )
    num_gpus_per_detector: float = Field(
        0.0, ge=0, description="GPUs per detector actor: 0 on CPU, a fraction beside a generation actor (0.25)."
    )
    num_cpus_per_detector: float = Field(0.25, gt=0, description="CPUs per detector actor.")
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
        if self.initial_actors is not None and not self.min_actors <= self.initial_actors <= self.max_actors:
            raise ValueError("initial_actors must lie between min_actors and max_actors")
        return self


class EvaluateConfig(StrictModel):
    """Scores for every generated image, in an actor pool of their own after generation: how
    well it follows its control maps (ControlNet++'s protocol) and its prompt (CLIP score)."""

    controllability: bool = Field(
        True,
        description="Run each ControlNet's detector again, with the same settings, on the generated image and "
        "compare with the control map it got: F1 of the edges (canny), RMSE of the depth (0-255), mIoU of "
        "the segmentation. Needs a task with ControlNets.",
    )
    control: list[ControlPreprocessConfig] = Field(
        default_factory=list,
        description="The detector that made each ControlNet's map (one entry per ControlNet, or one for all), "
        "for maps given ready-made (preprocess detector 'none'): e.g. canny with the thresholds used. Unset: "
        "preprocess.control.",
    )
    clip_model: ModelOrPath | None = Field(
        None,
        description="Hub id or folder of a transformers CLIP model (ControlNet++ reports "
        "openai/clip-vit-base-patch16): the CLIP score of each image and its prompt, and for tasks that edit "
        "a source image, CLIP's image similarity of the two. Unset: no CLIP metrics.",
    )
    input_caption_column: str | None = Field(
        None,
        description="For edits (InstructPix2Pix): the source's column with a caption of the input image; with "
        "edited_caption_column, CLIP's directional similarity of each edit (a table source).",
    )
    edited_caption_column: str | None = Field(
        None, description="The source's column with a caption of the image the edit should give."
    )
    actors: int = Field(1, ge=1, description="Evaluation actors, each holding the detectors and CLIP.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per evaluation actor (a fraction shares one).")
    num_cpus_per_actor: float = Field(0.25, gt=0, description="CPUs per evaluation actor.")

    def controls(self, preprocess: PreprocessConfig) -> list[ControlPreprocessConfig]:
        """The detector behind each ControlNet's map: this section's, else the preprocessing's."""
        return self.control or preprocess.control


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
    seed: int = Field(
        0, ge=0, lt=SEED_LIMIT, description="Job seed; each row's seed derives from it and the row's inputs."
    )
    max_failed_fraction: float = Field(
        0.1, ge=0, le=1, description="Stop with an error when more rows than this fail."
    )
    evaluate: EvaluateConfig | None = Field(
        None, description="Score every generated image (controllability, CLIP); unset: no evaluation."
    )

    @model_validator(mode="after")
    def _params_fit_the_model(self) -> GenerationJobConfig:
        check_params_for_model(self.params, self.model, "params")
        n = self.model.num_controlnets
        if n and len(self.preprocess.control) not in (1, n):
            raise ValueError(f"preprocess.control has {len(self.preprocess.control)} entries for {n} controlnets")
        if self.evaluate:
            check_evaluation(self.evaluate, self.model, self.preprocess)
        return self


def check_evaluation(evaluate: EvaluateConfig, model: ModelSpec, preprocess: PreprocessConfig) -> None:
    """ValueError naming the `evaluate` field that cannot work with this model and preprocessing."""
    n = model.num_controlnets
    if evaluate.controllability:
        if not n:
            raise ValueError(f"evaluate.controllability: task {model.task!r} has no ControlNet to measure")
        if len(evaluate.control) not in (0, 1, n):
            raise ValueError(f"evaluate.control has {len(evaluate.control)} entries for {n} controlnets")
        for i, control in enumerate(evaluate.controls(preprocess)):
            if control.detector == "none":
                raise ValueError(
                    f"evaluate.control: the map of ControlNet {i} is given ready-made (preprocess detector 'none'); "
                    "name the detector that made it, e.g. evaluate.control: [{detector: canny, low_threshold: 100, "
                    "high_threshold: 200}]"
                )
            if control.detector not in METRIC_OF_DETECTOR:
                raise ValueError(
                    f"evaluate.controllability: ControlNet {i}'s detector {control.detector!r} has no controllability "
                    f"metric ({', '.join(METRIC_OF_DETECTOR)} have one); set controllability: false"
                )
            side = min(preprocess.width, preprocess.height)
            if (
                METRIC_OF_DETECTOR[control.detector] == "ms_ssim"
                and preprocess.resize_mode != "none"
                and side < MS_SSIM_MIN_SIDE
            ):
                raise ValueError(
                    f"evaluate.controllability: {control.detector} maps are scored by MS-SSIM, which needs images of "
                    f"at least {MS_SSIM_MIN_SIDE} px a side; preprocess makes {preprocess.width}x{preprocess.height}"
                )
    elif evaluate.clip_model is None:
        raise ValueError("evaluate: nothing to measure (controllability is off and no clip_model is given)")
    captions = (evaluate.input_caption_column, evaluate.edited_caption_column)
    if any(captions):
        if not all(captions):
            raise ValueError("evaluate: set input_caption_column and edited_caption_column together")
        if evaluate.clip_model is None or not task_info(model.task).needs_source_image:
            raise ValueError(
                f"evaluate.input_caption_column: CLIP's directional similarity needs clip_model and a task that "
                f"edits a source image (task {model.task!r})"
            )


def given_parameters(values: Mapping[str, Any]) -> list[str]:
    """The names in `values` set to something other than the field's default (None, False):
    a config written out in full, with every unset field as null, gives nothing."""
    fields = GenerationParams.model_fields
    return [name for name, value in values.items() if name in fields and value != fields[name].default]


def check_params_for_model(params: GenerationParams, model: ModelSpec, section: str) -> None:
    """ValueError naming `section.field` for a parameter the task does not take, or a
    per-ControlNet list whose length is neither 1 nor the number of ControlNets."""
    set_values = {name: getattr(params, name) for name in sorted(params.model_fields_set)}
    unused = unused_parameters(model.task, given_parameters(set_values))
    if unused:
        raise ValueError(f"{section}.{unused[0]}: task {model.task!r} does not take this parameter")
    n = model.num_controlnets
    for name in PER_CONTROLNET:
        value = getattr(params, name)
        if value is not None and len(value) not in (1, n):
            raise ValueError(f"{section}.{name} has {len(value)} values for {n} controlnet(s)")
