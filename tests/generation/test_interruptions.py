"""SIGTERM, then a rerun that loses its actor: no row lost, none written twice, runs closed."""

from __future__ import annotations

import signal
import threading
import time

import mlflow
import pandas as pd
import psutil
import pytest

from pixfleet.console import is_chatter
from pixfleet.engine import columns as C
from pixfleet.generation.job import run_generation
from tests.helpers import kill_group, start_cli, tiny_job, write_job_yaml

pytestmark = pytest.mark.timeout(300)


def _small_batches_job(tiny_dir, data, out):
    """Batches of 2 rows, one per block: many blocks in flight to interrupt."""
    resources = {"batch_size": 2, "batches_per_block": 1}
    return tiny_job(tiny_dir, "controlnet", data, out, params={"num_inference_steps": 4}, resources=resources)


def _wait_for_files(folder, pattern: str, count: int, timeout: float = 180, newer_than: float = 0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.exists() and sum(p.stat().st_mtime > newer_than for p in folder.glob(pattern)) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} {pattern} in {folder} after {timeout}s")


def _assert_complete(out, rows: int) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == rows and manifest[C.ROW_ID].is_unique
    assert set(manifest[C.STATUS]) == {C.OK}
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(manifest[C.ROW_ID])
    assert not list(out.rglob("*.tmp"))
    return manifest


@pytest.mark.usefixtures("ray_session")
def test_sigterm_ends_the_run_killed_and_a_rerun_whose_actor_is_killed_recomputes_only_unfinished_rows(
    tiny_dir, tmp_path
):
    # A killed driver (SIGKILL, its embedded Ray with it) resumes from a bucket in
    # test_object_storage.py; here the driver is asked to stop, and the rerun, in this process,
    # loses its generate actor half way: Ray Data restarts it and retries its batch.
    from pixfleet.data.fill50k import make_fill50k

    rows = 24
    data = make_fill50k(tmp_path / "data", n=rows, size=64, seed=4)
    out = tmp_path / "out"
    job = _small_batches_job(tiny_dir, data, out)
    driver = start_cli("generate", write_job_yaml(job, tmp_path / "job.yaml"), tmp_path)
    _wait_for_files(out / "manifest", "part-*.parquet", 1)
    driver.send_signal(signal.SIGTERM)
    try:
        output = driver.communicate(timeout=60)[0].decode()
    finally:
        kill_group(driver)

    assert driver.returncode == 130, output[-2000:]
    assert "interrupted; rerun the same command to resume" in output
    # The console had pixfleet's lines only; the log file has the libraries' too.
    assert not [line for line in output.splitlines() if is_chatter(line.encode())]
    (log,) = (tmp_path / "logs").glob("generate-*.log")
    assert "interrupted; rerun the same command to resume" in log.read_text()
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert run.info.status == "KILLED"

    finished = {p.stem: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    # Stopping, the job merged what it had finished into the manifest.
    recorded = set(pd.read_parquet(out / "manifest.parquet")[C.ROW_ID])
    assert 0 < len(recorded) < rows

    killed, rerun_started = [], time.time()

    def kill_generate_actor_half_way():
        _wait_for_files(out / "images", "*.png", (rows - len(recorded)) // 2, newer_than=rerun_started)
        for process in psutil.process_iter(["cmdline"]):
            if "GenerateStage" in " ".join(process.info["cmdline"] or []):
                process.send_signal(signal.SIGKILL)
                killed.append(process.pid)

    killer = threading.Thread(target=kill_generate_actor_half_way, daemon=True)
    killer.start()
    summary = run_generation(job)
    killer.join(timeout=5)

    assert killed, "the generate actor was not found to kill"
    assert summary.rows_failed == 0 and summary.rows_skipped == len(recorded)
    assert summary.images_ok == rows - len(recorded)
    _assert_complete(out, rows)
    for row_id in recorded:  # recorded rows were not recomputed
        assert (out / "images" / f"{row_id}.png").stat().st_mtime_ns == finished[row_id]
