"""The one-shot GPU suite, run as `--tiny` on this CPU so it cannot rot between GPU sessions.

It runs in the test's process on the session's Ray, as it runs on a GPU machine with its own:
the same `main`, without a second interpreter importing torch and diffusers and starting Ray.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_suite


@pytest.mark.timeout(420)
@pytest.mark.usefixtures("ray_session")
def test_the_gpu_suite_runs_every_part_on_tiny_models_and_writes_its_tables(tmp_path):
    import ray

    out = tmp_path / "suite"
    gpu_suite.main(["--tiny", "--out", str(out), "--budget-s", "0.3"])
    assert ray.is_initialized()  # the suite's Ray job left the caller's Ray up
    results = json.loads((out / "results.json").read_text())
    rows = {(row["part"], row["variant"]): row for row in results["rows"]}
    assert not [key for key in rows if key[1] == "failed"], [row for row in results["rows"] if "error" in row]
    assert results["environment"]["mode"] == "tiny"

    for part, fast_batches in (("generate", (2, 4)), ("pix2pix", (2, 4)), ("sdxl", (2,))):
        plain = rows[(part, "plain diffusers, batch 2")]
        engine = rows[(part, "pixfleet engine, batch 2")]
        assert plain["images_per_s"] > 0 and engine["images_per_s"] > 0
        assert engine["ratio"] == pytest.approx(engine["images_per_s"] / plain["images_per_s"])
        for batch in fast_batches:
            assert rows[(part, f"pixfleet fast path (batch {batch})")]["ratio_to_eager"] > 0
    ray_job = rows[("generate", "pixfleet generate (Ray), batch 2")]
    assert ray_job["rows"] >= 6 and 0 < ray_job["gpu_busy"] <= 1

    steps = [rows[("train", f"step, batch 2, {s}")] for s in ("no checkpointing", "gradient checkpointing")]
    assert all(step["samples_per_s"] > 0 for step in steps)
    assert rows[("serve", "engine process, 1 client")]["p50_s"] > 0
    assert "overhead" in {variant for part, variant in rows if part == "serve"}

    table = (out / "results.md").read_text()
    assert "| generate | pixfleet engine, batch 2 |" in table and "- torch:" in table
