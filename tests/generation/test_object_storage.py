"""Generation jobs whose inputs and outputs live in a bucket (a real S3 API server on loopback):
the same layout, exactly-once writes, resume from the bucket, and the dry run."""

from __future__ import annotations

import io
import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixfleet.engine import columns as C
from pixfleet.generation.job import run_generation
from pixfleet.storage import Location
from tests.helpers import kill_group, start_cli, tiny_job, upload, write_job_yaml

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("ray_session")]


def bucket_manifest(uri: str) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(Location.of(uri).read_bytes())).to_pandas()


def test_a_job_reads_and_writes_a_bucket_and_a_rerun_resumes_from_it(tiny_dir, fill50k_dir, bucket, tmp_path):
    data = upload(fill50k_dir, f"{bucket}/fill50k")
    out = f"{bucket}/runs/one"
    job = tiny_job(
        tiny_dir, "controlnet", data, tmp_path / "tracking", sink={"output_dir": out, "save_control_maps": True}
    )

    summary = run_generation(job)

    assert (summary.rows_in, summary.images_ok, summary.rows_failed) == (16, 16, 0)
    assert summary.output_dir == out and not (tmp_path / "tracking" / "images").exists()
    manifest = bucket_manifest(f"{out}/manifest.parquet")
    assert len(manifest) == 16 and manifest[C.ROW_ID].is_unique and set(manifest[C.STATUS]) == {C.OK}
    images = Location.of(out) / "images"
    assert sorted(f.uri for f in images.files()) == sorted(manifest[C.OUTPUT_PATH])
    first = Image.open(io.BytesIO(Location.of(manifest[C.OUTPUT_PATH][0]).read_bytes()))
    assert first.size == (32, 32) and "Seed: " in first.info["parameters"]
    assert all(path.startswith(f"{data}/") for files in manifest[C.INPUT_FILES] for path in files)
    assert len((Location.of(out) / "control_maps").files()) == 16
    assert (Location.of(out) / "manifest").files() == []  # merged into manifest.parquet, then removed
    gallery = (Location.of(out) / "gallery.html").read_text()
    assert 'src="images/' in gallery and "16 rows" in gallery

    again = run_generation(job)
    assert (again.rows_skipped, again.images_ok) == (16, 0)
    assert bucket_manifest(f"{out}/manifest.parquet").equals(manifest)


def test_a_driver_killed_mid_job_then_rerun_leaves_every_row_once_in_the_bucket(
    tiny_dir, fill50k_dir, bucket, tmp_path
):
    data = upload(fill50k_dir, f"{bucket}/fill50k")
    out = Location.of(f"{bucket}/runs/killed")
    job = tiny_job(
        tiny_dir,
        "controlnet",
        data,
        tmp_path,
        sink={"output_dir": out.uri},
        params={"num_inference_steps": 4},
        resources={"batch_size": 2, "batches_per_block": 1},
    )
    driver = start_cli("generate", write_job_yaml(job, tmp_path / "job.yaml"), tmp_path)
    try:
        _wait_for(lambda: (out / "manifest").files(), driver)
    finally:
        kill_group(driver)  # the driver and its whole embedded Ray, at once
        driver.wait(timeout=30)
    # A PUT the server had received whole when its writer died still lands: read once they have.
    parts = _settled(lambda: sorted(part.uri for part in (out / "manifest").files()))
    recorded = {row for part in parts for row in bucket_manifest(part)[C.ROW_ID]}
    assert 0 < len(recorded) < 16 and not (out / "manifest.parquet").exists()

    summary = run_generation(job)

    manifest = bucket_manifest(f"{out.uri}/manifest.parquet")
    assert len(manifest) == 16 and manifest[C.ROW_ID].is_unique and set(manifest[C.STATUS]) == {C.OK}
    assert (summary.rows_skipped, summary.images_ok) == (len(recorded), 16 - len(recorded))
    assert sorted(f.stem for f in (out / "images").files()) == sorted(manifest[C.ROW_ID])


def test_the_dry_run_checks_every_row_without_loading_a_model(tiny_dir, fill50k_dir, bucket, tmp_path):
    """A base model with no weights at all: the dry run needs only its configs and tokenizer."""
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_dir / "controlnet", weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    rows = [json.loads(line) for line in (fill50k_dir / "metadata.jsonl").read_text().splitlines()][:6]
    rows[1]["guidance_scale"] = "loud"
    rows[2]["conditioning_image_file_name"] = "conditioning_images/missing.png"
    rows[3]["num_images_per_prompt"] = 2
    folder = tmp_path / "data"
    shutil.copytree(fill50k_dir, folder)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = f"{bucket}/dry"
    job = tiny_job(tiny_dir, "controlnet", upload(folder, f"{bucket}/data"), tmp_path, sink={"output_dir": out})
    job.model.base_model, job.model.controlnets = str(weightless), [str(weightless / "controlnet")]
    job.max_failed_fraction = 1.0

    summary = run_generation(job, dry_run=True)

    assert (summary.rows_in, summary.rows_ok, summary.rows_failed, summary.images_ok) == (6, 4, 2, 5)
    manifest = bucket_manifest(f"{out}/dry-run/manifest.parquet")
    planned = manifest[manifest[C.STATUS] == C.PLANNED]
    assert len(planned) == 5 and set(planned[C.WIDTH]) == {32} and set(planned[C.OUTPUT_PATH]) == {""}
    assert planned.groupby(C.ROW_ID)[C.SEED].apply(lambda s: list(s) == list(range(s.min(), s.min() + len(s)))).all()
    reasons = set(manifest.loc[manifest[C.STATUS] == C.FAILED, C.ERROR])
    assert any("guidance_scale" in r for r in reasons) and any("missing.png: no such file" in r for r in reasons)
    assert (Location.of(out) / "images").files() == [] and not (Location.of(out) / "manifest.parquet").exists()
    assert "rows planned       4" in summary.render()


def _settled(listing, quiet_s: float = 2.0, timeout_s: float = 30) -> list:
    """`listing()` once it has stayed the same for `quiet_s`."""
    import time

    deadline, last = time.time() + timeout_s, listing()
    while time.time() < deadline:
        time.sleep(quiet_s)
        if (now := listing()) == last:
            return now
        last = now
    raise TimeoutError("the bucket's listing kept changing")


def _wait_for(condition, process, timeout_s: float = 180) -> None:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError("the job wrote no manifest part in time")
