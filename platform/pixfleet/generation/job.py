"""Run a generation job: check inputs, resume, stream the plan, show progress, track, summarise,
and write the gallery."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pixfleet.cluster import ensure_ray, quiet_ray_data
from pixfleet.config import GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.errors import UserError
from pixfleet.generation.gallery import write_gallery
from pixfleet.generation.plan import build_plan
from pixfleet.generation.progress import Counts, ProgressLine
from pixfleet.generation.sink import Manifest
from pixfleet.generation.sources import open_source
from pixfleet.models.identity import ModelIdentity
from pixfleet.models.loading import check_model_folders
from pixfleet.models.registry import resolve_registry_models
from pixfleet.tracking import mlflow_run, tracking_uri

SHOWN_FAILURES = 5


class TooManyFailures(UserError, RuntimeError):
    """The job stopped: too many rows failed. Rows already written stay written."""

    exit_code = 3  # not a config problem: rerunning resumes once the inputs are fixed


@dataclass
class GenerationSummary(Counts):
    """What a run did, for the end-of-job screen and for tests."""

    seconds: float = 0.0
    generate_seconds: float = 0.0  # summed over actors: each image's share of its pipeline call
    gpus_per_actor: float = 0.0
    output_dir: str = ""
    mlflow_run_id: str | None = None
    failures: list[str] = field(default_factory=list)  # "source_ref: reason", in arrival order

    @property
    def images_per_second(self) -> float:
        return self.images_ok / self.seconds if self.seconds else 0.0

    @property
    def accelerator_hours(self) -> float:
        return self.generate_seconds * self.gpus_per_actor / 3600

    def render(self) -> str:
        lines = [
            f"rows in            {self.rows_in}",
            f"images written     {self.images_ok}",
            f"rows failed        {self.rows_failed}",
            f"rows skipped       {self.rows_skipped} (already written by an earlier run)",
            f"throughput         {self.images_per_second:.2f} images/s over {self.seconds:.1f} s",
            f"generation time    {self.generate_seconds:.1f} s summed over actors",
            f"accelerator-hours  {self.accelerator_hours:.4f} (generation time x GPUs per actor)",
            f"output             {self.output_dir}",
            f"gallery            {Path(self.output_dir) / 'gallery.html'}",
            f"mlflow run         {self.mlflow_run_id or '-'}",
        ]
        return "\n".join(lines + failure_lines(self.failures, "manifest.parquet"))


def failure_lines(failures: list[str], manifest: str) -> list[str]:
    """The first failures of a job's summary, and how many more the manifest holds."""
    lines = [f"  failed: {failure}" for failure in failures[:SHOWN_FAILURES]]
    if len(failures) > SHOWN_FAILURES:
        lines.append(f"  ... and {len(failures) - SHOWN_FAILURES} more (status 'failed' in {manifest})")
    return lines


def stop_past_failure_budget(counts: Counts, failures: list[str], max_failed_fraction: float) -> None:
    """TooManyFailures once more rows failed than the job allows."""
    if counts.rows_failed > max_failed_fraction * counts.rows_in:
        raise TooManyFailures(
            f"{counts.rows_failed} of {counts.rows_in} rows failed, over "
            f"max_failed_fraction={max_failed_fraction}; first: {failures[0]}"
        )


def run_generation(
    job: GenerationJobConfig, address: str | None = None, ray_progress: bool = False
) -> GenerationSummary:
    """Run `job` to completion (or to its failure budget) and return its summary.

    Progress goes to stderr as one line; `ray_progress` brings back Ray Data's own bars.
    """
    # 1. Check inputs before any work: models (MLflow URIs fetched), the source's rows and columns.
    params = job.model_dump(mode="json")  # as written: MLflow records the URIs, not the cache
    resolved = job.model_copy(update={"model": resolve_registry_models(job.model, tracking_uri(job.tracking))})
    check_model_folders(resolved.model)
    model = ModelIdentity.of(resolved.model, named=job.model)
    ensure_ray(address)
    quiet_ray_data(ray_progress)
    source = open_source(job.source, job.model.task, job.model.num_controlnets, job.resources.rows_per_block)

    # 2. Resume: rows an earlier run wrote are skipped.
    manifest = Manifest(job.sink)
    finished = manifest.finished_row_ids()
    summary = GenerationSummary(
        rows_in=source.num_rows,
        gpus_per_actor=job.resources.num_gpus_per_actor,
        output_dir=str(Path(job.sink.output_dir).resolve()),
    )

    # 3. Stream the plan; the manifest rows come back as batches finish.
    with mlflow_run(job.tracking, job.name, params) as mlflow:
        if mlflow:
            summary.mlflow_run_id = mlflow.active_run().info.run_id
            mlflow.log_params({"source.rows": source.num_rows, "model.base_model_hash": model.base_model_hash})
        progress = ProgressLine(mlflow=mlflow)
        start = time.perf_counter()
        try:
            plan = build_plan(resolved, source, model, finished)
            for batch in plan.iter_batches(batch_format="pandas", batch_size=None):  # blocks as they finish
                _count(summary, batch)
                progress.update(summary)
                stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction)
        finally:
            summary.seconds = time.perf_counter() - start
            progress.close(summary)
            merged = manifest.merge()
            gallery = write_gallery(job.sink.output_dir)
            if mlflow:
                _log_run(mlflow, summary, merged, job)
                mlflow.log_artifact(str(gallery))
    return summary


def _count(summary: GenerationSummary, batch: pd.DataFrame) -> None:
    first_images = batch[batch[C.IMAGE_INDEX] == 0]
    summary.images_ok += int((batch[C.STATUS] == C.OK).sum())
    summary.rows_ok += int((first_images[C.STATUS] == C.OK).sum())
    summary.rows_skipped += int((first_images[C.STATUS] == C.SKIPPED).sum())
    failed = first_images[first_images[C.STATUS] == C.FAILED]
    summary.rows_failed += len(failed)
    summary.failures += [f"{r[C.SOURCE_REF]}: {r[C.ERROR]}" for r in failed.to_dict("records")]
    summary.generate_seconds += float(batch[C.GENERATE_SECONDS].sum())


def _log_run(mlflow, summary: GenerationSummary, merged: pd.DataFrame, job: GenerationJobConfig) -> None:
    mlflow.log_metrics(
        {
            "rows_in": summary.rows_in,
            "images_ok": summary.images_ok,
            "rows_failed": summary.rows_failed,
            "rows_skipped": summary.rows_skipped,
            "images_per_second": summary.images_per_second,
            "duration_s": summary.seconds,
            "generate_s": summary.generate_seconds,
            "accelerator_hours": summary.accelerator_hours,
        }
    )
    paths = [p for p in merged.loc[merged[C.STATUS] == C.OK, C.OUTPUT_PATH] if Path(p).exists()]
    if paths:
        mlflow.log_image(sample_grid(paths[:16]), "samples.png")
    manifest_path = Path(job.sink.output_dir) / "manifest.parquet"
    if manifest_path.exists():
        mlflow.log_artifact(str(manifest_path))


def sample_grid(paths: list[str], columns: int = 4):
    """Up to 16 images in a grid, all at the first image's size."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    size = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    images += [Image.new("RGB", size)] * (rows * columns - len(images))  # the last row, filled in black
    return make_image_grid([image.resize(size) for image in images], rows=rows, cols=columns)
