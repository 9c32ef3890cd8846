"""The pipeline runner's warm-up: one call at the work's size before the first row."""

from __future__ import annotations

import pytest

from pixfleet.engine.runner import PipelineRunner
from pixfleet.models.tasks import TASKS
from tests.helpers import tiny_spec

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("task", list(TASKS))
def test_warm_up_runs_one_call_of_every_task_at_the_given_size_and_batch(tiny_dir, task, monkeypatch):
    runner = PipelineRunner.load(tiny_spec(tiny_dir, task))
    assert runner.native_size == (64, 64)  # the tiny UNet's 32 latents x the VAE's factor 2
    calls, real_kwargs = [], runner.call_kwargs
    monkeypatch.setattr(runner, "call_kwargs", lambda *args: calls.append(real_kwargs(*args)) or calls[-1])

    assert runner.warm_up(48, 32, batch_size=3) > 0
    (kwargs,) = calls
    assert len(kwargs["prompt"]) == 3 and kwargs["num_inference_steps"] == 2
    if runner.accepts_size:
        assert (kwargs["width"], kwargs["height"]) == (48, 32)
