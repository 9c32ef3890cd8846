"""Run an annotate job: photos -> control maps and captions -> a training set, tracked in MLflow.

source -> prepare -> detect -> check -> [caption] -> write -> driver (dedupe, metadata.jsonl)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray.data

from pixfleet.annotation.dataset import TrainingSetWriter
from pixfleet.annotation.stages import FILTERED, MAP, CaptionStage, CheckMapStage, PrepareStage, WriteStage
from pixfleet.cluster import ensure_ray, quiet_ray_data
from pixfleet.config import ConfigError
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.generation import ResourcesConfig
from pixfleet.engine import columns as C
from pixfleet.generation.job import failure_lines, sample_grid, stop_past_failure_budget
from pixfleet.generation.plan import SOURCE_COLUMNS, check_chain
from pixfleet.generation.progress import Counts, ProgressLine
from pixfleet.generation.sources import Source, open_image_source
from pixfleet.generation.stages import PlannedStage
from pixfleet.generation.stages.detect_stage import DetectStage
from pixfleet.tracking import mlflow_run

TASK_CPUS = 0.5  # what the read, prepare, check and write tasks need free beside the actors


@dataclass
class AnnotateSummary(Counts):
    """What a run did: rows kept (`rows_ok`), filtered by reason, failed, skipped."""

    seconds: float = 0.0
    output_dir: str = ""
    mlflow_run_id: str | None = None
    filtered_by: dict[str, int] = field(default_factory=dict)  # the reason's first words -> rows
    failures: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return (self.rows_ok + self.rows_filtered + self.rows_failed) / self.seconds if self.seconds else 0.0

    def render(self) -> str:
        lines = [
            f"rows in            {self.rows_in}",
            f"rows kept          {self.rows_ok}",
            f"rows filtered      {self.rows_filtered}",
            *(f"  {reason:<16} {n}" for reason, n in sorted(self.filtered_by.items())),
            f"rows failed        {self.rows_failed}",
            f"rows skipped       {self.rows_skipped} (recorded by an earlier run)",
            f"throughput         {self.rows_per_second:.2f} rows/s over {self.seconds:.1f} s",
            f"training set       {self.output_dir} (metadata.jsonl; every row in manifest.jsonl)",
            f"mlflow run         {self.mlflow_run_id or '-'}",
        ]
        return "\n".join(lines + failure_lines(self.failures, "manifest.jsonl"))


def plan_stages(job: AnnotateJobConfig, finished_row_ids: frozenset[str]) -> list[PlannedStage]:
    resources = job.resources
    detect_resources = ResourcesConfig(
        batch_size=resources.batch_size,
        detector_actors=resources.detector_actors,
        num_gpus_per_detector=resources.num_gpus_per_detector,
        num_cpus_per_detector=resources.num_cpus_per_detector,
    )
    return [
        PrepareStage.plan(job, finished_row_ids),
        DetectStage.plan({MAP: job.detector}, detect_resources, None),
        CheckMapStage.plan(job.filters.min_map_coverage),
        *([CaptionStage.plan(job)] if job.caption.model else []),
        WriteStage.plan(job.output_dir),
    ]


def build_plan(job: AnnotateJobConfig, source: Source, finished_row_ids: frozenset[str]) -> ray.data.Dataset:
    stages = plan_stages(job, finished_row_ids)
    check_chain(stages, (*SOURCE_COLUMNS, C.SOURCE_IMAGE))
    dataset = source.dataset
    for stage in stages:
        dataset = dataset.map_batches(stage.fn, batch_format="pandas", **stage.options)
    return dataset


def run_annotation(job: AnnotateJobConfig, address: str | None = None, ray_progress: bool = False) -> AnnotateSummary:
    """Run `job` to completion (or to its failure budget) and return its summary."""
    writer = TrainingSetWriter(job.output_dir, job.fingerprint(), job.filters.near_duplicate_distance)
    ensure_ray(address)
    _check_resources(job)
    quiet_ray_data(ray_progress)
    source = open_image_source(job.source.as_source(), job.resources.rows_per_block)
    summary = AnnotateSummary(rows_in=source.num_rows, output_dir=str(Path(job.output_dir).resolve()))
    with mlflow_run(job.tracking, job.name, job.model_dump(mode="json")) as mlflow:
        if mlflow:
            summary.mlflow_run_id = mlflow.active_run().info.run_id
            mlflow.log_params({"source.rows": source.num_rows})
        progress = ProgressLine(mlflow=mlflow)
        start = time.perf_counter()
        try:
            for batch in build_plan(job, source, writer.finished).iter_batches(batch_format="pandas", batch_size=None):
                _count(summary, writer.record(batch))
                progress.update(summary)
                stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction)
        finally:
            summary.seconds = time.perf_counter() - start
            progress.close(summary)
            if mlflow:
                _log_run(mlflow, summary)
    return summary


def _check_resources(job: AnnotateJobConfig) -> None:
    """The actor pools must leave room for the tasks between them, or Ray Data waits forever."""
    cluster = ray.cluster_resources()
    needs = job.resources.actor_needs(captions=bool(job.caption.model))
    if needs["GPU"] > cluster.get("GPU", 0):
        raise ConfigError(
            f"resources: the detector and captioner actors ask for {needs['GPU']:g} GPUs; the cluster has "
            f"{cluster.get('GPU', 0):g} (set num_gpus_per_detector / num_gpus_per_captioner to 0 on CPU)"
        )
    if needs["CPU"] > cluster.get("CPU", 0) - TASK_CPUS:
        raise ConfigError(
            f"resources: the detector and captioner actors hold {needs['CPU']:g} of the cluster's "
            f"{cluster.get('CPU', 0):g} CPUs, leaving under {TASK_CPUS} for reading and writing; lower "
            "num_cpus_per_detector / num_cpus_per_captioner or the actor counts"
        )


def _count(summary: AnnotateSummary, batch: pd.DataFrame) -> None:
    status = batch[C.STATUS]
    summary.rows_ok += int((status == C.OK).sum())
    summary.images_ok = summary.rows_ok
    summary.rows_skipped += int((status == C.SKIPPED).sum())
    for reason in batch.loc[status == FILTERED, C.ERROR]:
        summary.rows_filtered += 1
        kind = _filter_kind(reason)
        summary.filtered_by[kind] = summary.filtered_by.get(kind, 0) + 1
    failed = batch[status == C.FAILED]
    summary.rows_failed += len(failed)
    summary.failures += [f"{r[C.SOURCE_REF]}: {r[C.ERROR]}" for r in failed.to_dict("records")]


def _filter_kind(reason: str) -> str:
    for marker, kind in (
        ("min_size", "too small"),
        ("aspect ratio", "aspect ratio"),
        ("near-duplicate", "near-duplicate"),
        ("duplicate of", "duplicate"),
        ("nearly empty", "empty map"),
    ):
        if marker in reason:
            return kind
    return "other"


def _log_run(mlflow, summary: AnnotateSummary) -> None:
    mlflow.log_metrics(
        {
            "rows_in": summary.rows_in,
            "rows_kept": summary.rows_ok,
            "rows_filtered": summary.rows_filtered,
            "rows_failed": summary.rows_failed,
            "rows_skipped": summary.rows_skipped,
            "rows_per_second": summary.rows_per_second,
            "duration_s": summary.seconds,
            **{f"filtered/{kind.replace(' ', '_')}": n for kind, n in summary.filtered_by.items()},
        }
    )
    root = Path(summary.output_dir)
    for name in ("manifest.jsonl", "metadata.jsonl", "annotate.json"):
        if (root / name).exists():
            mlflow.log_artifact(str(root / name))
    images = sorted((root / "images").glob("*.png"))[:8]
    if images:
        pairs = [str(path) for image in images for path in (image, root / "conditioning_images" / image.name)]
        mlflow.log_image(sample_grid(pairs, columns=4), "samples.png")
