"""The engine process on its own: a call, a call stuck inside one step killed and replaced by
the spare at its deadline, and the state health checks read meanwhile."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from pixfleet.config import GenerationParams
from pixfleet.engine import columns as C
from pixfleet.engine.params import resolve_params
from pixfleet.engine.process import EngineProcess, EngineStopped
from tests.helpers import tiny_spec

pytestmark = pytest.mark.timeout(180)


def row(size: int, steps: int) -> dict:
    params = resolve_params(
        GenerationParams(), {"prompt": "x", "num_inference_steps": steps, "seed": 1}, "controlnet", 1
    )
    return {
        C.PROMPT: "x",
        C.PARAMS: json.dumps(params),
        C.SEED: 1,
        C.control_column(0): np.zeros((size, size, 3), np.uint8),
    }


def test_a_call_stuck_in_one_step_is_killed_and_the_spare_takes_over(tiny_dir):
    engine = EngineProcess(tiny_spec(tiny_dir, "controlnet"))
    try:
        info = engine.start()
        assert (info.sampler, info.device, info.size_multiple) == ("DDIM", "cpu", 2)
        first = engine.generate([row(64, 2)], time.time() + 60, grace_s=1)
        assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
        stuck_pid = engine.child.popen.pid

        seen = []  # what a health check reads while the stuck call runs
        watcher = threading.Thread(
            target=lambda: [seen.append(engine.unready_reason()) or time.sleep(0.2) for _ in range(20)]
        )
        watcher.start()
        start = time.monotonic()
        with pytest.raises(EngineStopped, match="still running past the deadline"):
            engine.generate([row(1024, 1)], time.time() + 2, grace_s=1)  # one step at 1024 px takes far longer
        replaced_after = time.monotonic() - start
        watcher.join()

        assert engine.restarts == 1 and engine.child.popen.pid != stuck_pid
        # Deadline and grace are 3 s, the spare takes over at once; the step itself would run for
        # minutes (about 6 on a 2-core CPU). A loose bound: a loaded machine slows the kill too.
        assert replaced_after < 60, replaced_after
        assert any(reason and "past its deadline" in reason for reason in seen), seen
        assert engine.unready_reason() is None
        again = engine.generate([row(64, 2)], time.time() + 60, grace_s=1)
        np.testing.assert_array_equal(again, first)  # the replacement is the same model
    finally:
        engine.close()
