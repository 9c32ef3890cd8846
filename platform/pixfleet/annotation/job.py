"""Run an annotate job: photos -> control maps and captions -> a training set, tracked in MLflow.

source -> prepare -> detect -> check -> [caption] -> write -> record (dedupe, records) -> driver (counts)

The driver holds counts: the resume index and the merge of the records into manifest.jsonl and
metadata.jsonl are Ray tasks, the records themselves the record stage's.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass, field

import pandas as pd
import ray.data

from pixfleet.annotation.dataset import (
    FILTERED,
    MANIFEST,
    METADATA,
    SETTINGS,
    MergeResult,
    check_settings,
    finished_digests,
    merge_records,
)
from pixfleet.annotation.stages import MAP, CaptionStage, CheckMapStage, PrepareStage, RecordStage, WriteStage
from pixfleet.cluster import ensure_ray, quiet_ray_data, run_beside
from pixfleet.config import ConfigError
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.generation import ResourcesConfig
from pixfleet.engine import columns as C
from pixfleet.generation.job import failure_lines, sample_grid, stop_past_failure_budget
from pixfleet.generation.plan import SOURCE_COLUMNS, check_chain
from pixfleet.generation.progress import Counts, ProgressLine
from pixfleet.generation.sink import FinishedRows
from pixfleet.generation.sources import Source, open_image_source
from pixfleet.generation.stages import PlannedStage
from pixfleet.generation.stages.detect_stage import DetectStage
from pixfleet.storage import Location, check_readable, check_writable
from pixfleet.tracking import mlflow_run, open_tracking_early

TASK_CPUS = 0.5  # what the tasks (read, prepare, check, write) and the record actor need free beside the pools


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
            f"training set       {self.output_dir} ({METADATA}; every row in {MANIFEST})",
            f"mlflow run         {self.mlflow_run_id or '-'}",
        ]
        return "\n".join(lines + failure_lines(self.failures, MANIFEST))


def plan_stages(job: AnnotateJobConfig, finished_row_ids: Container[str]) -> list[PlannedStage]:
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
        RecordStage.plan(job),
    ]


def build_plan(job: AnnotateJobConfig, source: Source, finished_row_ids: Container[str]) -> ray.data.Dataset:
    stages = plan_stages(job, finished_row_ids)
    check_chain(stages, (*SOURCE_COLUMNS, C.SOURCE_IMAGE))
    dataset = source.dataset
    for stage in stages:
        dataset = dataset.map_batches(stage.fn, batch_format="pandas", **stage.options)
    return dataset


def run_annotation(job: AnnotateJobConfig, address: str | None = None, ray_progress: bool = False) -> AnnotateSummary:
    """Run `job` to completion (or to its failure budget) and return its summary."""
    # 1. Check before any work: the photos are there, the folder can be written and holds rows
    # annotated with these settings (or none), the actor pools leave room for the tasks.
    check_readable(job.source.path, "source.path")
    root = check_writable(job.output_dir, "output_dir")
    job = job.model_copy(update={"output_dir": root.uri})  # absolute: tasks run elsewhere
    check_settings(root, job.fingerprint())
    open_tracking_early(job.tracking)
    ensure_ray(address)
    _check_resources(job)
    quiet_ray_data(ray_progress)
    source = open_image_source(job.source.as_source(), job.resources.rows_per_block)

    # 2. Resume: rows recorded ok or filtered are skipped (the index is a task's; this process
    # holds its reference).
    finished = FinishedRows(run_beside(finished_digests, root))
    summary = AnnotateSummary(rows_in=source.num_rows, output_dir=root.uri)
    with mlflow_run(job.tracking, job.name, job.model_dump(mode="json")) as mlflow:
        if mlflow:
            summary.mlflow_run_id = mlflow.active_run().info.run_id
            mlflow.log_params({"source.rows": source.num_rows})
        progress = ProgressLine(mlflow=mlflow)
        start = time.perf_counter()
        merged = MergeResult()
        try:
            for batch in build_plan(job, source, finished).iter_batches(batch_format="pandas", batch_size=None):
                _count(summary, batch)
                progress.update(summary)
                stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction)
            summary.rows_in = summary.rows_done
            stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction, final=True)
        finally:
            summary.seconds = time.perf_counter() - start
            progress.close(summary)
            merged = ray.get(run_beside(merge_records, root))
            if mlflow:
                _log_run(mlflow, summary, merged, root)
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


def _log_run(mlflow, summary: AnnotateSummary, merged: MergeResult, root: Location) -> None:
    mlflow.log_metrics(
        {
            "rows_in": summary.rows_in or 0,
            "rows_kept": summary.rows_ok,
            "rows_filtered": summary.rows_filtered,
            "rows_failed": summary.rows_failed,
            "rows_skipped": summary.rows_skipped,
            "rows_per_second": summary.rows_per_second,
            "duration_s": summary.seconds,
            "kept_in_set": merged.kept,
            **{f"filtered/{kind.replace(' ', '_')}": n for kind, n in summary.filtered_by.items()},
        }
    )
    mlflow.set_tag("training_set", root.uri)
    for name in (MANIFEST, METADATA, SETTINGS):
        if root.is_local and (root / name).is_file():  # a bucket's files stay there, named by the tag
            mlflow.log_artifact((root / name).path)
    if merged.samples:
        pairs = [uri for pair in merged.samples for uri in pair]
        mlflow.log_image(sample_grid(pairs, columns=4), "samples.png")
