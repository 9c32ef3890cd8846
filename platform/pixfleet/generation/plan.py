"""The Ray Data plan: source -> decode -> preprocess -> generate -> encode -> write.

    source      canonical rows, image bytes               (read tasks)
    decode      arrays, params, row_id, seed, status       (CPU tasks)
    preprocess  fitted images, control maps                (CPU actor pool)
    generate    one row per image                          (actor pool, one pipeline each)
    encode      PNG/JPEG/WebP bytes + A1111 parameters     (CPU tasks)
    write       image files + manifest part per batch      (CPU tasks, fused with encode)

Stages ask for different CPU amounts so Ray keeps them apart, and for fractions of a CPU so
reads still get scheduled while actors hold theirs (else Ray Data waits forever).
"""

from __future__ import annotations

import json

import ray.data

from pixfleet.config import GenerationJobConfig
from pixfleet.generation.sources import ImageRoles, Source
from pixfleet.generation.stages.decode_stage import DecodeStage
from pixfleet.generation.stages.encode_stage import EncodeStage
from pixfleet.generation.stages.generate_stage import GenerateStage
from pixfleet.generation.stages.preprocess_stage import PreprocessStage
from pixfleet.generation.stages.write_stage import WriteStage
from pixfleet.models.identity import ModelIdentity

_LIGHT_CPU = 0.1


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


def decode_stage(
    job: GenerationJobConfig, image_labels: dict[str, str], model: ModelIdentity, finished: frozenset[str]
) -> DecodeStage:
    return DecodeStage(
        job.model.task,
        image_labels,
        job.params,
        job.model.num_controlnets,
        job_fingerprint(job, model),
        job.seed,
        job.preprocess.max_image_pixels,
        finished,
    )


def build_plan(
    job: GenerationJobConfig, source: Source, model: ModelIdentity, finished_row_ids: frozenset[str]
) -> ray.data.Dataset:
    """The lazy dataset of manifest rows; iterating it runs the job."""
    columns = list(source.image_labels)
    res = job.resources

    decode = decode_stage(job, source.image_labels, model, finished_row_ids)
    ds = source.dataset.map_batches(decode, batch_format="pandas", num_cpus=_LIGHT_CPU)
    ds = ds.map_batches(
        PreprocessStage,
        fn_constructor_args=(job.preprocess, columns),
        batch_format="pandas",
        batch_size=res.batch_size,
        num_cpus=res.num_cpus_per_preprocess,
        compute=ray.data.ActorPoolStrategy(size=res.preprocess_actors),
    )
    generate_env = {"env_vars": {"OMP_NUM_THREADS": str(res.torch_threads)}} if res.torch_threads else None
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_args=(job.model, columns),
        batch_format="pandas",
        batch_size=res.batch_size,
        num_cpus=res.num_cpus_per_actor,
        num_gpus=res.num_gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        runtime_env=generate_env,
    )
    ds = ds.map_batches(EncodeStage(job.sink, model, job.preprocess), batch_format="pandas", num_cpus=_LIGHT_CPU * 2)
    ds = ds.map_batches(WriteStage(job.sink, model), batch_format="pandas", num_cpus=_LIGHT_CPU * 2)
    return ds
