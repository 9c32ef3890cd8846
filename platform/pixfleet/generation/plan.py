"""The Ray Data plan: source -> decode -> preprocess -> generate -> encode -> write.

    source      canonical rows, image bytes               (read tasks)
    decode      arrays, params, row_id, seed, status       (CPU tasks)
    preprocess  resized images, control maps, masks        (CPU actor pool)
    generate    one row per image                          (actor pool, one pipeline each)
    encode      PNG/JPEG/WebP bytes + A1111 parameters     (CPU tasks)
    write       image files + manifest part per batch      (CPU tasks, fused with encode)

Stages ask for different CPU amounts so Ray keeps them apart, and for fractions of a CPU so
reads still get scheduled while actors hold theirs (else Ray Data waits forever).
"""

from __future__ import annotations

import ray.data

from pixfleet.config import GenerationJobConfig
from pixfleet.generation.params import model_identity
from pixfleet.generation.sink import WriteStage
from pixfleet.generation.sources import ImageRoles, Source
from pixfleet.generation.stages.decode_stage import DecodeStage
from pixfleet.generation.stages.encode_stage import EncodeStage
from pixfleet.generation.stages.generate_stage import GenerateStage
from pixfleet.generation.stages.preprocess_stage import PreprocessStage

_LIGHT_CPU = 0.1


def image_columns(job: GenerationJobConfig) -> list[str]:
    roles = ImageRoles.for_task(job.model.task, job.source, job.model.num_controlnets)
    return list(roles.mapping)


def build_plan(job: GenerationJobConfig, source: Source, finished_row_ids: frozenset[str]) -> ray.data.Dataset:
    """The lazy dataset of manifest rows; iterating it runs the job."""
    columns = image_columns(job)
    res = job.resources
    model = model_identity(job.model)

    decode = DecodeStage.for_job(job, columns, finished_row_ids)
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
    ds = ds.map_batches(EncodeStage(job.sink, model), batch_format="pandas", num_cpus=_LIGHT_CPU * 2)
    ds = ds.map_batches(WriteStage(job.sink, model), batch_format="pandas", num_cpus=_LIGHT_CPU * 2)
    return ds
