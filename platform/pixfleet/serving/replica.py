"""The model deployment: one engine process per replica, dynamic batching, and registered
ControlNets multiplexed over the shared base model.

Requests arrive as prepared generation rows (see `requests.prepare_row`). `@serve.batch`
collects them (Serve splits batches by multiplexed model id), rows that can share a pipeline
call run together, one call at a time per replica: diffusers pipelines are not thread-safe.
The pipeline lives in a child process (`engine.process`): a call still running past its
deadline plus `limits.stop_grace_s` is killed there and the process is replaced, so a request
that one huge step keeps busy cannot hold the replica for minutes. While a call is stuck or
the engine restarts, the replica reports not ready (`/healthz` 503) and new calls wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray import serve

from pixfleet.config.serving import ServedModelConfig
from pixfleet.engine import columns as C
from pixfleet.engine.batching import group_rows
from pixfleet.engine.process import EngineCallFailed, EngineProcess, EngineStopped
from pixfleet.models.registry import download_model, resolve_registry_models
from pixfleet.serving import metrics

logger = logging.getLogger("ray.serve")

DEADLINE = "deadline"  # row key: time.time() after which the request is abandoned


def images_in(rows: list[dict[str, Any]]) -> int:
    """Batch size in images, so one request for 4 images fills a batch of 4."""
    return sum(json.loads(row[C.PARAMS])["num_images_per_prompt"] for row in rows)


class ModelReplica:
    """A Serve deployment class; `app.build_app` sets its options from the config."""

    def __init__(self, served: ServedModelConfig, tracking_uri: str, stop_grace_s: float):
        start = time.perf_counter()
        self.served = served
        self.replica = serve.get_replica_context().replica_id.unique_id  # named in each response
        self.tracking_uri = tracking_uri
        self.stop_grace_s = stop_grace_s
        lru_size = served.multiplex.max_models_per_replica if served.multiplex else 0
        spec = resolve_registry_models(served.model, tracking_uri)
        self.engine = EngineProcess(spec, lru_size, served.spare_engine, served.detectors)
        self.engine.start()
        seconds = time.perf_counter() - start
        # What a request arriving at a model scaled to zero waits for, beside Serve's own scheduling.
        logger.warning("model %s: replica ready in %.1f s (engine process and model loaded)", served.name, seconds)
        metrics.replica_start_seconds().observe(seconds, tags={"model": served.name})
        self.broken: str | None = None
        self.generate.set_max_batch_size(served.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(served.batching.batch_wait_timeout_s)
        if served.multiplex:
            # Wired per instance (the LRU size comes from the config) on a plain function:
            # Serve keeps its cache as an attribute of the function it wraps.
            async def load(version: str) -> str:
                return await self._load_controlnet(version)

            self.controlnet_folder = serve.multiplexed(max_num_models_per_replica=lru_size)(load)

    async def _load_controlnet(self, version: str) -> str:
        """`version` is NAME/VERSION of a registered ControlNet, checked by the ingress; the
        engine loads it beside the base model (and again by itself after a restart)."""
        folder = await asyncio.to_thread(download_model, f"models:/{version}", self.tracking_uri)
        await asyncio.to_thread(self.engine.load_controlnet, folder)
        logger.info("loaded ControlNet %s", version)
        return folder

    def ready(self) -> dict[str, Any]:
        """What /healthz reports for this model; raises while a call is stuck or the engine restarts."""
        reason = self.engine.unready_reason()
        if reason:
            raise RuntimeError(reason)
        info = self.engine.info
        return {
            "model": self.served.name,
            "task": self.served.model.task,
            "sampler": info.sampler,
            "device": info.device,
            "torch_threads": info.torch_threads,
            "engine_restarts": self.engine.restarts,
        }

    def __del__(self) -> None:
        """Serve removes the replica (scaled down, redeployed): its engine processes go with it."""
        self.engine.close()

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: after a CUDA error the context is lost,
        and an engine that cannot restart cannot serve."""
        if self.broken or self.engine.failure:
            raise RuntimeError(self.broken or self.engine.failure)

    async def detect(self, row: dict[str, Any]) -> dict[str, Any]:
        """The control maps the engine's detector makes of a request's control images."""
        try:
            maps = await asyncio.to_thread(self.engine.detect, [row], row[DEADLINE], self.stop_grace_s)
        except (EngineStopped, EngineCallFailed) as error:
            return {"error": "pipeline", "message": str(error)}
        return {"maps": maps[0]}

    async def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return await self.generate(row)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def generate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results in the order of `rows`: images (NHWC uint8) and batch metadata, or an error."""
        controlnet = serve.get_multiplexed_model_id()
        folder = await self.controlnet_folder(controlnet) if controlnet else None
        results: dict[int, dict[str, Any]] = {}
        for group in group_rows(rows):
            now = time.time()
            live = [row for row in group if row[DEADLINE] > now]
            for row in group:
                if row[DEADLINE] <= now:
                    results[id(row)] = {"error": "timeout", "message": "request timed out while queued"}
            if live:
                for row, result in zip(live, await self._run(live, folder), strict=True):
                    results[id(row)] = result
        return [results[id(row)] for row in rows]

    async def _run(self, rows: list[dict[str, Any]], controlnet: str | None) -> list[dict[str, Any]]:
        """One pipeline call in the engine. It runs in a thread that sees it through even when
        the request is cancelled (the ingress gave up): the engine replaces a stuck process
        there, before it takes the next call."""
        n = json.loads(rows[0][C.PARAMS])["num_images_per_prompt"]
        deadline = max(row[DEADLINE] for row in rows)
        start = time.perf_counter()
        try:
            images = await asyncio.to_thread(self.engine.generate, rows, deadline, self.stop_grace_s, controlnet)
        except EngineStopped as error:
            metrics.engine_restarts().inc(tags={"model": self.served.name})
            return [{"error": "timeout", "message": f"request timed out; {error}"}] * len(rows)
        except EngineCallFailed as error:
            if "CUDA error" in str(error):
                self.broken = str(error)
            status = {"timeout": "timeout", "oom": "overloaded"}.get(error.kind, "pipeline")
            if error.kind == "error":
                logger.error("pipeline call failed: %s", error)
            return [{"error": status, "message": str(error)}] * len(rows)
        seconds = time.perf_counter() - start
        return [
            {
                "images": images[i * n : (i + 1) * n],
                "batch_size": len(rows),
                "generate_s": seconds,
                "replica": self.replica,
            }
            for i in range(len(rows))
        ]
