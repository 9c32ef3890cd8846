"""The Ray Data job end to end: outputs, manifest, resume, bad rows, MLflow, failures."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixfleet.config import ConfigError
from pixfleet.engine import columns as C
from pixfleet.engine.params import derive_seed, input_key
from pixfleet.generation.job import TooManyFailures, run_generation, sample_grid
from pixfleet.models.folders import ModelLoadError
from pixfleet.models.loading import load_pipeline
from tests.helpers import direct_call, png_bytes, random_image, tiny_job, tiny_spec

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("ray_session")]


def summary_hash(job) -> str:
    from pixfleet.models.identity import ModelIdentity

    return ModelIdentity.of(job.model).base_model_hash[:10]


def _mlflow_run(output_dir, run_id):
    mlflow.set_tracking_uri(f"sqlite:///{output_dir}/mlflow.db")
    return mlflow.get_run(run_id)


def test_job_writes_every_row_faithfully(tiny_dir, fill50k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    job = tiny_job(tiny_dir, "controlnet", fill50k_dir, out, resources={"batch_size": 4})
    summary = run_generation(job)

    # Rows in = rows out, one image file per row, named from the row id.
    assert (summary.rows_in, summary.images_ok, summary.rows_failed) == (16, 16, 0)
    progress = capsys.readouterr().err
    assert "rows 16/16  ok 16  failed 0  skipped 0  |" in progress
    assert "Running Dataset" not in progress  # Ray Data's own bars and plan stay quiet
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 16 and manifest[C.ROW_ID].is_unique
    assert set(manifest[C.STATUS]) == {C.OK}
    files = sorted((out / "images").iterdir())
    assert [f.stem for f in files] == sorted(manifest[C.ROW_ID])
    assert not list(out.rglob("*.tmp"))

    # A row from the batched Ray job equals a direct diffusers call on that row alone.
    row = manifest.iloc[0]
    line = int(row[C.SOURCE_REF].rsplit(":", 1)[1])
    record = json.loads((fill50k_dir / "metadata.jsonl").read_text().splitlines()[line - 1])
    control_file = fill50k_dir / record["conditioning_image_file_name"]
    assert row[C.SEED] == derive_seed(0, input_key([control_file.read_bytes()], {"prompt": record["text"]}))
    pipe = load_pipeline(tiny_spec(tiny_dir, "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(control_file).convert("RGB")
    control = control.resize((32, 32), Image.Resampling.LANCZOS)  # the job's preprocessing
    expected = direct_call(pipe, "controlnet", [record["text"]], [int(row[C.SEED])], [control], size=(32, 32))[0]
    written = np.asarray(Image.open(row[C.OUTPUT_PATH]))
    assert np.abs(written.astype(float) - expected).mean() < 1.0
    assert row["controlnet_conditioning_scale"].tolist() == [1.0]
    assert (row["width"], row["height"], row["model_hash"]) == (32, 32, summary_hash(job))
    assert Image.open(row[C.OUTPUT_PATH]).info["parameters"].startswith(record["text"])

    # MLflow: params, counts, throughput, sample grid.
    run = _mlflow_run(out, summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.task"] == "controlnet"
    assert run.data.metrics["images_ok"] == 16 and run.data.metrics["images_per_second"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"samples.png", "manifest.parquet"} <= artifacts
    # Reruns: of a finished job from a bucket (test_object_storage.py), of a stopped one here
    # (test_interruptions.py: the rows recorded are skipped, their files untouched).


def _id_and_image_manifest_job(tiny_dir, manifest_path, out, **sections):
    """A controlnet job over a manifest with `id` and `image` columns."""
    source = {"id_column": "id", "control_columns": ["image"]}
    return tiny_job(tiny_dir, "controlnet", manifest_path, out, source=source, **sections)


def test_bad_rows_are_recorded_and_the_job_goes_on(tiny_dir, tmp_path):
    good = png_bytes(random_image(1))
    rows = [{"id": f"good-{i}", "image": png_bytes(random_image(i)), "text": "ok"} for i in range(6)]
    rows += [
        {"id": "garbage", "image": b"not an image", "text": "x"},
        {"id": "truncated", "image": good[:100], "text": "x"},
        {"id": "bad-guidance", "image": good, "text": "x", "guidance_scale": -1.0},
    ]
    manifest_path = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(manifest_path)
    out = tmp_path / "out"
    job = _id_and_image_manifest_job(tiny_dir, manifest_path, out, max_failed_fraction=0.5)
    summary = run_generation(job)

    assert (summary.images_ok, summary.rows_failed) == (6, 3)
    manifest = pd.read_parquet(out / "manifest.parquet").set_index(C.ROW_ID)
    assert len(manifest) == 9
    assert "cannot decode image" in manifest.loc["garbage", C.ERROR]
    assert "cannot decode image" in manifest.loc["truncated", C.ERROR]
    assert "parameter guidance_scale" in manifest.loc["bad-guidance", C.ERROR]
    assert (out / "images" / "good-0.png").exists()


def test_too_many_failures_stop_the_job_and_keep_what_was_written(tiny_dir, tmp_path):
    rows = [{"id": f"bad-{i}", "image": b"", "text": "x"} for i in range(4)]
    rows += [{"id": f"good-{i}", "image": png_bytes(random_image(i)), "text": "ok"} for i in range(4)]
    manifest_path = tmp_path / "rows.jsonl"
    # A jsonl manifest refers to image files by path, relative to the manifest.
    for row in rows:
        (tmp_path / f"{row['id']}.png").write_bytes(row["image"])
    manifest_path.write_text(
        "\n".join(json.dumps({"id": r["id"], "image": f"{r['id']}.png", "text": r["text"]}) for r in rows)
    )
    out = tmp_path / "out"
    job = _id_and_image_manifest_job(
        tiny_dir, manifest_path, out, max_failed_fraction=0.25, resources={"batch_size": 2}
    )
    with pytest.raises(TooManyFailures, match=r"rows failed, over max_failed_fraction=0.25; first: rows.jsonl:\d: "):
        run_generation(job)
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert runs[0].info.status == "FAILED"
    assert (out / "manifest.parquet").exists()


def test_a_source_that_cannot_work_fails_before_any_work(tiny_dir, fill50k_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: no images"):
        run_generation(tiny_job(tiny_dir, "controlnet", empty, tmp_path / "o1", new_store=True))
    job = tiny_job(tiny_dir, "controlnet", fill50k_dir, tmp_path / "o2", source={"control_columns": ["edges"]})
    with pytest.raises(ConfigError, match=r"no column for control_image_0 \(edges\); columns are image, conditioning"):
        run_generation(job)
    broken = tiny_job(tiny_dir, "controlnet", fill50k_dir, tmp_path / "o3", new_store=True)
    broken.model.base_model = str(tiny_dir / "controlnet" / "unet")
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        run_generation(broken)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_every_failed_input_keeps_its_own_manifest_row_and_reason(tiny_dir, tmp_path):
    """Inputs with no content (empty files, a symlink loop) used to share the id of "no bytes";
    each now has a row of its own, named by its file. A folder named like an image is a folder:
    its images are listed, it is no row."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"good-{i}.png").write_bytes(png_bytes(random_image(i)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "other-empty.png").write_bytes(b"")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "x.png").mkdir()
    out = tmp_path / "out"
    summary = run_generation(tiny_job(tiny_dir, "controlnet", folder, out, max_failed_fraction=1.0))

    assert (summary.rows_in, summary.images_ok, summary.rows_failed) == (5, 2, 3)
    manifest = pd.read_parquet(out / "manifest.parquet")
    failed = manifest[manifest[C.STATUS] == C.FAILED].set_index(C.SOURCE_REF)
    assert len(failed) == 3 and failed[C.ROW_ID].is_unique
    reasons = {name.rsplit("/", 1)[1]: reason for name, reason in failed[C.ERROR].items()}
    assert reasons["empty.png"] == reasons["other-empty.png"] == "image file: empty (zero-size) image"
    assert reasons["loop.png"].endswith("cannot read (Too many levels of symbolic links)")
    assert summary.render().count("  failed: ") == 3


def test_the_summary_names_files_and_counts_the_failures_it_does_not_show():
    from pixfleet.generation.job import GenerationSummary

    summary = GenerationSummary(rows_in=9, rows_failed=7)
    summary.failures = [f"rows.jsonl:{i}: image: no such file" for i in range(1, 8)]
    text = summary.render()
    assert "  failed: rows.jsonl:1: image: no such file" in text
    assert "  failed: rows.jsonl:6" not in text
    assert "  ... and 2 more (status 'failed' in manifest.parquet)" in text


def test_a_job_stopped_by_its_failure_budget_exits_3(tiny_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pixfleet import cli
    from pixfleet.generation import job as generation_job
    from tests.helpers import write_job_yaml

    def over_budget(*args, **kwargs):
        raise TooManyFailures("5 of 8 rows failed, over max_failed_fraction=0.25; first: rows.jsonl:1: ...")

    monkeypatch.setattr(generation_job, "run_generation", over_budget)
    path = write_job_yaml(tiny_job(tiny_dir, "controlnet", tmp_path, tmp_path / "out"), tmp_path / "job.yaml")
    result = CliRunner().invoke(cli.app, ["generate", str(path)])
    assert result.exit_code == 3, result.output
    assert "error: 5 of 8 rows failed" in result.output


def test_the_sample_grid_keeps_each_image_in_its_cell_and_fills_the_last_row_black(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    uris = []
    for i, color in enumerate(colors):
        Image.new("RGB", (8, 6) if i else (8, 8), color).save(tmp_path / f"{i}.png")  # sizes follow the first
        uris.append(str(tmp_path / f"{i}.png"))
    grid = np.asarray(sample_grid(uris))
    assert grid.shape == (16, 32, 3)
    cells = [tuple(grid[r * 8 + 4, c * 8 + 4]) for r in range(2) for c in range(4)]
    assert cells == [*colors, (0, 0, 0), (0, 0, 0), (0, 0, 0)]
