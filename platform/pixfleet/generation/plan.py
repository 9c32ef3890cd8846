"""The Ray Data plan: source -> decode -> preprocess -> [detect] -> generate -> encode -> write.

    source      canonical rows, image bytes               (read tasks)
    decode      arrays, params, row_id, seed, status       (CPU tasks)
    preprocess  fitted images, control maps                (CPU actor pool)
    detect      maps of model detectors (depth, ...)       (actor pool, GPU or CPU; when asked for)
    generate    one row per image                          (actor pool, one pipeline each)
    evaluate    controllability and CLIP scores            (actor pool, GPU or CPU; when asked for)
    encode      PNG/JPEG/WebP bytes + A1111 parameters     (CPU tasks)
    write       image files + manifest part per batch      (CPU tasks, fused with encode)

A dry run (`pixfleet generate --dry-run`) swaps generate and encode for the dry-run stage and
writes the manifest alone, under `<output_dir>/dry-run/`.

Each stage plans itself (`PlannedStage`: its columns and its Ray resources); this module
chains them and checks, before anything runs, that every stage finds the columns it needs.
"""

from __future__ import annotations

import json
from collections.abc import Container

import ray.data

from pixfleet.config import GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import control_for
from pixfleet.generation.sources import ImageRoles, Source
from pixfleet.generation.stages import PlannedStage, caption_columns
from pixfleet.generation.stages.decode_stage import DecodeStage
from pixfleet.generation.stages.detect_stage import DetectStage
from pixfleet.generation.stages.dry_run_stage import DryRunStage
from pixfleet.generation.stages.encode_stage import EncodeStage
from pixfleet.generation.stages.evaluate_stage import EvaluateStage
from pixfleet.generation.stages.generate_stage import GenerateStage
from pixfleet.generation.stages.preprocess_stage import PreprocessStage
from pixfleet.generation.stages.write_stage import WriteStage
from pixfleet.models.identity import ModelIdentity
from pixfleet.storage import Location

DRY_RUN_DIR = "dry-run"  # where a dry run's manifest goes, under the job's output_dir
SOURCE_COLUMNS = (C.ROW_ID, C.SOURCE_REF, C.ROW_PARAMS, C.LOAD_ERRORS, C.INPUT_FILES)


def image_columns(job: GenerationJobConfig) -> list[str]:
    roles = ImageRoles.for_task(job.model.task, job.source, job.model.num_controlnets)
    return list(roles.mapping)


def job_fingerprint(job: GenerationJobConfig, model: ModelIdentity) -> str:
    """Everything besides a row's own inputs that decides its images; paths are not part of it."""
    return json.dumps(
        {
            "model": model.fingerprint(),
            "preprocess": job.preprocess.model_dump(),
            "params": job.params.model_dump(),
            "seed": job.seed,
        },
        sort_keys=True,
    )


def plan_stages(
    job: GenerationJobConfig,
    image_labels: dict[str, str],
    model: ModelIdentity,
    finished_row_ids: Container[str],
    dry_run: bool = False,
) -> list[PlannedStage]:
    """The stages in order, each with its Ray options; `image_labels` maps the task's image
    columns to the names messages use."""
    columns = list(image_labels)
    model_detectors = {
        column: control
        for column in columns
        if (control := control_for(job.preprocess.control, column)) is not None and control.uses_model
    }
    sink = job.sink
    if dry_run:
        dry_run_dir = (Location.of(sink.output_dir) / DRY_RUN_DIR).uri
        sink = sink.model_copy(update={"output_dir": dry_run_dir, "save_control_maps": False})
    stages = [
        DecodeStage.plan(job, image_labels, job_fingerprint(job, model), finished_row_ids),
        PreprocessStage.plan(job.preprocess, columns, job.resources, sink),
        *([DetectStage.plan(model_detectors, job.resources, sink)] if model_detectors else []),
    ]
    if dry_run:
        return [
            *stages,
            DryRunStage.plan(job.model, columns, job.resources),
            WriteStage.plan(sink, model, job.preprocess, job.model.num_controlnets),
        ]
    evaluate = [EvaluateStage.plan(job, columns)] if job.evaluate else []
    carried = {*columns, *caption_columns(job)}  # what the generate stage passes on to it
    passed = tuple(column for stage in evaluate for column in stage.needs if column in carried)
    size = (job.preprocess.width, job.preprocess.height)
    return [
        *stages,
        GenerateStage.plan(job.model, columns, size, job.resources, passed),
        *evaluate,
        EncodeStage.plan(sink, model, job.preprocess),
        WriteStage.plan(sink, model, job.preprocess, job.model.num_controlnets),
    ]


def check_chain(stages: list[PlannedStage], available: tuple[str, ...]) -> None:
    """MissingColumnError naming the first stage whose input columns no earlier step adds."""
    have = set(available)
    for stage in stages:
        name = getattr(stage.fn, "__name__", type(stage.fn).__name__)
        C.require_columns(dict.fromkeys(have), stage.needs, f"{name} (in the plan)")
        have |= set(stage.adds)


def build_plan(
    job: GenerationJobConfig,
    source: Source,
    model: ModelIdentity,
    finished_row_ids: Container[str],
    dry_run: bool = False,
) -> ray.data.Dataset:
    """The lazy dataset of manifest rows; iterating it runs the job."""
    stages = plan_stages(job, source.image_labels, model, finished_row_ids, dry_run)
    check_chain(stages, (*SOURCE_COLUMNS, *source.image_labels, *source.text_columns))
    dataset = source.dataset
    for stage in stages:
        dataset = dataset.map_batches(stage.fn, batch_format="pandas", **stage.options)
    return dataset
