"""The replica's handling of a failed engine call, without Serve: out of memory is the
request's problem (503, replica kept), a CUDA error breaks the replica."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from pixfleet.engine import columns as C
from pixfleet.engine.process import EngineCallFailed, _error_kind
from pixfleet.engine.runner import DeadlineExceeded
from pixfleet.serving.replica import DEADLINE, ModelReplica

pytestmark = pytest.mark.timeout(30)


class FlakyEngine:
    """Raises the queued errors first, then returns black images."""

    def __init__(self, *errors: EngineCallFailed):
        self.errors = list(errors)

    def generate(self, rows, deadline, grace_s, controlnet):
        if self.errors:
            raise self.errors.pop(0)
        return np.zeros((len(rows), 8, 8, 3), np.uint8)

    def close(self) -> None:  # what the replica calls when Serve removes it
        pass


def replica_with(engine: FlakyEngine) -> ModelReplica:
    replica = object.__new__(ModelReplica)  # no Serve, no model: only what `_run` reads
    replica.engine, replica.stop_grace_s, replica.broken, replica.replica = engine, 1.0, None, "r1"
    return replica


def rows(n: int) -> list[dict]:
    return [{C.PARAMS: json.dumps({"num_images_per_prompt": 1}), DEADLINE: time.time() + 60} for _ in range(n)]


def test_the_engine_tells_out_of_memory_from_other_errors():
    assert _error_kind(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert _error_kind(DeadlineExceeded("past the deadline")) == "timeout"
    assert _error_kind(RuntimeError("out of memory, says a message")) == "error"


def test_out_of_memory_fails_the_requests_as_overloaded_and_the_replica_keeps_serving():
    replica = replica_with(FlakyEngine(EngineCallFailed("oom", "OutOfMemoryError: CUDA out of memory")))
    failed = asyncio.run(replica._run(rows(2), None))
    assert [result["error"] for result in failed] == ["overloaded", "overloaded"]  # the ingress's 503
    assert "CUDA out of memory" in failed[0]["message"] and replica.broken is None
    served = asyncio.run(replica._run(rows(2), None))
    assert [result["images"].shape for result in served] == [(1, 8, 8, 3), (1, 8, 8, 3)]


def test_a_cuda_error_marks_the_replica_broken():
    error = EngineCallFailed("error", "RuntimeError: CUDA error: an illegal memory access")
    replica = replica_with(FlakyEngine(error))
    failed = asyncio.run(replica._run(rows(1), None))
    assert failed[0]["error"] == "pipeline" and "illegal memory access" in replica.broken
