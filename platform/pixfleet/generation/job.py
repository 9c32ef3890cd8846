"""Run a generation job: check inputs, resume, stream the plan, track, summarise."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from pixfleet.cluster import ensure_ray
from pixfleet.config import GenerationJobConfig
from pixfleet.generation import columns as C
from pixfleet.generation.plan import build_plan
from pixfleet.generation.sink import Manifest
from pixfleet.generation.sources import open_source
from pixfleet.models.loading import check_model_folders
from pixfleet.models.registry import resolve_registry_models
from pixfleet.tracking import mlflow_run, tracking_uri


class GenerationFailed(RuntimeError):
    """The job stopped: too many rows failed. Rows already written stay written."""


@dataclass
class GenerationSummary:
    """What a run did, for the end-of-job screen and for tests."""

    rows_in: int
    images_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    seconds: float = 0.0
    actor_seconds: float = 0.0
    output_dir: str = ""
    mlflow_run_id: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_ok / self.seconds if self.seconds else 0.0

    def render(self) -> str:
        lines = [
            f"rows in            {self.rows_in}",
            f"images written     {self.images_ok}",
            f"rows failed        {self.rows_failed}",
            f"rows skipped       {self.rows_skipped} (already written by an earlier run)",
            f"throughput         {self.images_per_second:.2f} images/s over {self.seconds:.1f} s",
            f"accelerator-hours  {self.actor_seconds / 3600:.4f} (generation time x GPUs per actor)",
            f"output             {self.output_dir}",
            f"mlflow run         {self.mlflow_run_id or '-'}",
        ]
        lines += [f"  failed: {e}" for e in self.errors[:5]]
        return "\n".join(lines)


def run_generation(job: GenerationJobConfig, address: str | None = None) -> GenerationSummary:
    """Run `job` to completion (or to its failure budget) and return its summary."""
    # 1. Check inputs before any work: models (MLflow URIs fetched), the source's rows and columns.
    params = job.model_dump(mode="json")  # as written: MLflow records the URIs, not the cache
    job = job.model_copy(update={"model": resolve_registry_models(job.model, tracking_uri(job.tracking))})
    check_model_folders(job.model)
    ensure_ray(address)
    source = open_source(job.source, job.model.task, job.model.num_controlnets, job.resources.rows_per_block)

    # 2. Resume: rows an earlier run wrote are skipped.
    manifest = Manifest(job.sink)
    finished = manifest.finished_row_ids()
    summary = GenerationSummary(rows_in=source.num_rows, output_dir=str(Path(job.sink.output_dir).resolve()))
    budget = job.max_failed_fraction * source.num_rows

    # 3. Stream the plan; the manifest rows come back as batches finish.
    with mlflow_run(job.tracking, job.name, params) as mlflow:
        if mlflow:
            summary.mlflow_run_id = mlflow.active_run().info.run_id
            mlflow.log_param("source.rows", source.num_rows)
        start = time.perf_counter()
        try:
            for batch in build_plan(job, source, finished).iter_batches(batch_format="pandas"):
                _count(summary, batch, job.resources.num_gpus_per_actor)
                if summary.rows_failed > budget:
                    raise GenerationFailed(
                        f"{summary.rows_failed} of {source.num_rows} rows failed, over "
                        f"max_failed_fraction={job.max_failed_fraction}; first: {summary.errors[0]}"
                    )
        finally:
            summary.seconds = time.perf_counter() - start
            merged = manifest.merge()
            if mlflow:
                _log_run(mlflow, summary, merged, job)
    return summary


def _count(summary: GenerationSummary, batch: pd.DataFrame, gpus_per_actor: float) -> None:
    first_images = batch[batch[C.IMAGE_INDEX] == 0]
    summary.images_ok += int((batch[C.STATUS] == C.OK).sum())
    summary.rows_skipped += int((first_images[C.STATUS] == C.SKIPPED).sum())
    failed = first_images[first_images[C.STATUS] == C.FAILED]
    summary.rows_failed += len(failed)
    summary.errors += [f"{r[C.ROW_ID]}: {r[C.ERROR]}" for r in failed.to_dict("records")]
    summary.actor_seconds += float(batch[C.GENERATE_SECONDS].sum()) * gpus_per_actor


def _log_run(mlflow, summary: GenerationSummary, merged: pd.DataFrame, job: GenerationJobConfig) -> None:
    mlflow.log_metrics(
        {
            "rows_in": summary.rows_in,
            "images_ok": summary.images_ok,
            "rows_failed": summary.rows_failed,
            "rows_skipped": summary.rows_skipped,
            "images_per_second": summary.images_per_second,
            "duration_s": summary.seconds,
            "accelerator_hours": summary.actor_seconds / 3600,
        }
    )
    paths = [p for p in merged.loc[merged[C.STATUS] == C.OK, C.OUTPUT_PATH] if Path(p).exists()]
    if paths:
        mlflow.log_image(sample_grid(paths[:16]), "samples.png")
    manifest_path = Path(job.sink.output_dir) / "manifest.parquet"
    if manifest_path.exists():
        mlflow.log_artifact(str(manifest_path))


def sample_grid(paths: list[str], columns: int = 4) -> Image.Image:
    """Up to 16 images side by side, all at the first image's size."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (width * min(columns, len(images)), height * rows))
    for i, image in enumerate(images):
        grid.paste(image.resize((width, height)), ((i % columns) * width, (i // columns) * height))
    return grid
