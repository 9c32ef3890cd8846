"""Run a generation job: check inputs, resume, stream the plan, show progress, track, summarise,
and write the gallery. The driver holds counts: the resume index and the merge of the manifest
are Ray tasks (`sink.py`), and rows reach the driver only as the counts of finished blocks.

`dry_run` runs the whole plan but the diffusers call and the image writes (see
`stages/dry_run_stage.py`), into `<output_dir>/dry-run/manifest.parquet`: what a user runs
before renting GPUs for a million rows.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import pandas as pd
import ray

from pixfleet.cluster import ensure_ray, quiet_ray_data, run_beside
from pixfleet.config import GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.errors import UserError
from pixfleet.generation.gallery import finish_output, page_name
from pixfleet.generation.plan import DRY_RUN_DIR, build_plan
from pixfleet.generation.progress import Counts, ProgressLine
from pixfleet.generation.sink import MANIFEST_FILE, FinishedRows, Manifest, MergeResult, finished_digests
from pixfleet.generation.sources import open_source
from pixfleet.generation.stages import caption_columns
from pixfleet.models.folders import check_model_folders, fetch_model_files
from pixfleet.models.identity import ModelIdentity
from pixfleet.models.registry import resolve_registry_models
from pixfleet.storage import Location, check_readable, check_writable
from pixfleet.tracking import mlflow_run, open_tracking_early, tracking_uri

SHOWN_FAILURES = 5
MIN_ROWS_FOR_BUDGET = 100  # rows seen before a source of unknown size can be judged by its failures
DRY_RUN_BLOCK_BYTES, DRY_RUN_MAX_BLOCK_ROWS = 64 << 20, 2048


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
    dry_run: bool = False
    mlflow_run_id: str | None = None
    failures: list[str] = field(default_factory=list)  # "source_ref: reason", in arrival order
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # the evaluate section's, per score

    @property
    def images_per_second(self) -> float:
        return self.images_ok / self.seconds if self.seconds else 0.0

    @property
    def accelerator_hours(self) -> float:
        return self.generate_seconds * self.gpus_per_actor / 3600

    def render(self) -> str:
        if self.dry_run:
            lines = [
                f"rows in            {self.rows_in}",
                f"rows planned       {self.rows_ok} ({self.images_ok} images; no model loaded, nothing generated)",
                f"rows failed        {self.rows_failed}",
                f"rows skipped       {self.rows_skipped} (already written by an earlier run)",
                f"throughput         {self.rows_done / self.seconds if self.seconds else 0:.1f} rows/s over "
                f"{self.seconds:.1f} s",
                f"manifest           {self.output_dir}/{MANIFEST_FILE}",
            ]
            return "\n".join(lines + failure_lines(self.failures, MANIFEST_FILE))
        lines = [
            f"rows in            {self.rows_in}",
            f"images written     {self.images_ok}",
            f"rows failed        {self.rows_failed}",
            f"rows skipped       {self.rows_skipped} (already written by an earlier run)",
            f"throughput         {self.images_per_second:.2f} images/s over {self.seconds:.1f} s",
            f"generation time    {self.generate_seconds:.1f} s summed over actors",
            f"accelerator-hours  {self.accelerator_hours:.4f} (generation time x GPUs per actor)",
            f"output             {self.output_dir}",
            f"gallery            {self.output_dir}/{page_name(1)}",
            f"mlflow run         {self.mlflow_run_id or '-'}",
        ]
        lines += [
            f"score              {name}: mean {s['mean']:.4g} (p5 {s['p5']:.4g}, p50 {s['p50']:.4g}, "
            f"p95 {s['p95']:.4g}) over {int(s['count'])} images"
            for name, s in self.scores.items()
        ]
        return "\n".join(lines + failure_lines(self.failures, MANIFEST_FILE))


def failure_lines(failures: list[str], manifest: str) -> list[str]:
    """The first failures of a job's summary, and how many more the manifest holds."""
    lines = [f"  failed: {failure}" for failure in failures[:SHOWN_FAILURES]]
    if len(failures) > SHOWN_FAILURES:
        lines.append(f"  ... and {len(failures) - SHOWN_FAILURES} more (status 'failed' in {manifest})")
    return lines


def stop_past_failure_budget(counts: Counts, failures: list[str], max_failed_fraction: float, final=False) -> None:
    """TooManyFailures once more rows failed than the job allows: a fraction of all rows, or,
    while the total is unknown, of the rows seen so far (once there are enough to judge by)."""
    total = counts.rows_in if counts.rows_in is not None else counts.rows_done
    if counts.rows_in is None and not final and total < MIN_ROWS_FOR_BUDGET:
        return
    if counts.rows_failed > max_failed_fraction * total:
        raise TooManyFailures(
            f"{counts.rows_failed} of {total} rows failed, over "
            f"max_failed_fraction={max_failed_fraction}; first: {failures[0]}"
        )


def run_generation(
    job: GenerationJobConfig, address: str | None = None, ray_progress: bool = False, dry_run: bool = False
) -> GenerationSummary:
    """Run `job` to completion (or to its failure budget) and return its summary.

    Progress goes to stderr as one line; `ray_progress` brings back Ray Data's own bars.
    """
    # 1. Check inputs before any work: models (MLflow URIs fetched), where rows come from and go.
    params = job.model_dump(mode="json")  # as written: MLflow records the URIs, not the cache
    check_readable(job.source.path, "source.path")
    job = with_locations(job)
    resolved = job.model_copy(update={"model": resolve_registry_models(job.model, tracking_uri(job.tracking))})
    local = fetch_model_files(resolved.model)  # this node's copies, for the checks and the content hashes
    check_model_folders(local)
    model = ModelIdentity.of(local, named=job.model)
    open_tracking_early(job.tracking)
    ensure_ray(address)
    quiet_ray_data(ray_progress)
    rows_per_block = dry_run_rows_per_block(job) if dry_run else job.resources.rows_per_block
    texts = caption_columns(job)
    source = open_source(job.source, job.model.task, job.model.num_controlnets, rows_per_block, texts)
    output = check_writable(job.sink.output_dir, "sink.output_dir")

    # 2. Resume: rows an earlier run wrote are skipped. A task builds the index; this process
    # holds its reference only, and each decode task reads it from the object store.
    finished = FinishedRows(run_beside(finished_digests, output))
    target = output / DRY_RUN_DIR if dry_run else output
    if dry_run:  # each dry run says what the job would do now
        for file in Manifest(target).files():
            file.delete()
    summary = GenerationSummary(
        rows_in=source.num_rows,
        gpus_per_actor=job.resources.num_gpus_per_actor,
        output_dir=target.uri,
        dry_run=dry_run,
    )

    # 3. Stream the plan; the manifest rows come back as batches finish.
    tracking = job.tracking.model_copy(update={"enabled": False}) if dry_run else job.tracking
    with mlflow_run(tracking, job.name, params) as mlflow:
        if mlflow:
            summary.mlflow_run_id = mlflow.active_run().info.run_id
            mlflow.log_params({"source.rows": source.num_rows, "model.base_model_hash": model.base_model_hash})
        progress = ProgressLine(mlflow=mlflow)
        start = time.perf_counter()
        merged = MergeResult()
        try:
            plan = build_plan(resolved, source, model, finished, dry_run=dry_run)
            for batch in plan.iter_batches(batch_format="pandas", batch_size=None):  # blocks as they finish
                _count(summary, batch)
                progress.update(summary)
                stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction)
            summary.rows_in = summary.rows_done  # the count, where the source could not give it
            stop_past_failure_budget(summary, summary.failures, job.max_failed_fraction, final=True)
        finally:
            summary.seconds = time.perf_counter() - start
            progress.close(summary)
            merged = ray.get(run_beside(finish_output, target, gallery=not dry_run))
            summary.scores = merged.scores
            if mlflow:
                _log_run(mlflow, summary, merged, target)
    return summary


def dry_run_rows_per_block(job: GenerationJobConfig) -> int:
    """A dry run's blocks: no GPU batch to match, so as many rows as 64 MiB of fitted images
    hold (up to 2,048): each block costs every stage a task, and these stages are light."""
    image_bytes = job.preprocess.width * job.preprocess.height * 3 * max(1, job.model.num_controlnets)
    return max(job.resources.rows_per_block, min(DRY_RUN_MAX_BLOCK_ROWS, DRY_RUN_BLOCK_BYTES // image_bytes))


def with_locations(job: GenerationJobConfig) -> GenerationJobConfig:
    """`job` with its source and output as absolute URIs: its tasks run in other processes, on
    other nodes, whose working directories are not the driver's."""
    source = job.source.model_copy(update={"path": Location.of(job.source.path).uri})
    sink = job.sink.model_copy(update={"output_dir": Location.of(job.sink.output_dir).uri})
    return job.model_copy(update={"source": source, "sink": sink})


def _count(summary: GenerationSummary, batch: pd.DataFrame) -> None:
    first_images = batch[batch[C.IMAGE_INDEX] == 0]
    done = (C.PLANNED, C.OK) if summary.dry_run else (C.OK,)
    summary.images_ok += int(batch[C.STATUS].isin(done).sum())
    summary.rows_ok += int(first_images[C.STATUS].isin(done).sum())
    summary.rows_skipped += int((first_images[C.STATUS] == C.SKIPPED).sum())
    failed = first_images[first_images[C.STATUS] == C.FAILED]
    summary.rows_failed += len(failed)
    summary.failures += [f"{r[C.SOURCE_REF]}: {r[C.ERROR]}" for r in failed.to_dict("records")]
    summary.generate_seconds += float(batch[C.GENERATE_SECONDS].sum())


def _log_run(mlflow, summary: GenerationSummary, merged: MergeResult, output: Location) -> None:
    mlflow.log_metrics(
        {
            "rows_in": summary.rows_in or 0,
            "images_ok": summary.images_ok,
            "rows_failed": summary.rows_failed,
            "rows_skipped": summary.rows_skipped,
            "images_per_second": summary.images_per_second,
            "duration_s": summary.seconds,
            "generate_s": summary.generate_seconds,
            "accelerator_hours": summary.accelerator_hours,
            "manifest_rows": merged.rows,
            **{f"{name}.{stat}": value for name, stats in merged.scores.items() for stat, value in stats.items()},
        }
    )
    if merged.sample_outputs:
        mlflow.log_image(sample_grid(merged.sample_outputs), "samples.png")
    mlflow.set_tag("manifest", (output / MANIFEST_FILE).uri)
    gallery = output / page_name(1)
    for page in (output / MANIFEST_FILE, gallery):
        if page.is_local and page.is_file():  # a bucket's files stay in the bucket, named by the tag
            mlflow.log_artifact(page.path)


def sample_grid(uris: list[str], columns: int = 4):
    """Up to 16 images in a grid, all at the first image's size, the last row filled in black
    (PIL's: diffusers' `make_image_grid` would import torch into the driver for it, 3 s)."""
    from PIL import Image

    images = [Image.open(io.BytesIO(Location.of(uri).read_bytes())).convert("RGB") for uri in uris[:16]]
    (width, height), columns = images[0].size, min(columns, len(images))
    grid = Image.new("RGB", (columns * width, -(-len(images) // columns) * height))
    for i, image in enumerate(images):
        grid.paste(image.resize((width, height)), (i % columns * width, i // columns * height))
    return grid
