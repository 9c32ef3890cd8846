"""The model deployment: one loaded pipeline per replica, dynamic batching, and registered
ControlNets multiplexed over the shared base model.

Requests arrive as prepared generation rows (see `requests.prepare_row`). `@serve.batch`
collects them (Serve splits batches by multiplexed model id), rows that can share a pipeline
call run together, one call at a time per replica: diffusers pipelines are not thread-safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray import serve

from pixfleet.config.serving import ServedModelConfig
from pixfleet.generation import columns as C
from pixfleet.generation.runner import DeadlineExceeded, PipelineRunner, group_rows
from pixfleet.models.registry import download_model, resolve_registry_models

logger = logging.getLogger("ray.serve")

DEADLINE = "deadline"  # row key: time.time() after which the request is abandoned


def images_in(rows: list[dict[str, Any]]) -> int:
    """Batch size in images, so one request for 4 images fills a batch of 4."""
    return sum(json.loads(row[C.PARAMS])["num_images_per_prompt"] for row in rows)


class ModelReplica:
    """A Serve deployment class; `app.build_app` sets its options from the config."""

    def __init__(self, served: ServedModelConfig, tracking_uri: str):
        self.served = served
        self.tracking_uri = tracking_uri
        self.runner = PipelineRunner.load(resolve_registry_models(served.model, tracking_uri))
        self.generate.set_max_batch_size(served.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(served.batching.batch_wait_timeout_s)
        self.broken: str | None = None
        if served.multiplex:
            # Wired per instance (the LRU size comes from the config) on a plain function:
            # Serve keeps its cache as an attribute of the function it wraps.
            async def load(version: str) -> PipelineRunner:
                return await self._load_controlnet(version)

            lru_size = served.multiplex.max_models_per_replica
            self.runner_for = serve.multiplexed(max_num_models_per_replica=lru_size)(load)

    async def _load_controlnet(self, version: str) -> PipelineRunner:
        """`version` is NAME/VERSION of a registered ControlNet, checked by the ingress."""
        from diffusers import ControlNetModel

        folder = await asyncio.to_thread(download_model, f"models:/{version}", self.tracking_uri)
        controlnet = await asyncio.to_thread(
            ControlNetModel.from_pretrained, folder, dtype=self.runner.pipe.unet.dtype
        )
        logger.info("loaded ControlNet %s", version)
        return self.runner.with_controlnet(controlnet.to(self.runner.device))

    def ready(self) -> dict[str, Any]:
        """What /healthz reports for this model."""
        import torch

        return {
            "model": self.served.name,
            "task": self.served.model.task,
            "sampler": self.runner.sampler,
            "device": str(self.runner.device),
            "torch_threads": torch.get_num_threads(),
        }

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: after a CUDA error the context is lost."""
        if self.broken:
            raise RuntimeError(self.broken)

    async def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return await self.generate(row)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def generate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results in the order of `rows`: images (NHWC uint8) and batch metadata, or an error."""
        controlnet = serve.get_multiplexed_model_id()
        runner = await self.runner_for(controlnet) if controlnet else self.runner
        results: dict[int, dict[str, Any]] = {}
        for group in group_rows(rows):
            now = time.time()
            live = [row for row in group if row[DEADLINE] > now]
            for row in group:
                if row[DEADLINE] <= now:
                    results[id(row)] = {"error": "timeout", "message": "request timed out while queued"}
            if live:
                for row, result in zip(live, await asyncio.to_thread(self._run, runner, live), strict=True):
                    results[id(row)] = result
        return [results[id(row)] for row in rows]

    def _run(self, runner: PipelineRunner, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        n = json.loads(rows[0][C.PARAMS])["num_images_per_prompt"]
        start = time.perf_counter()
        try:
            images = runner.generate(rows, deadline=max(row[DEADLINE] for row in rows))
        except DeadlineExceeded as error:
            return [{"error": "timeout", "message": str(error)}] * len(rows)
        except Exception as error:
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            if "CUDA error" in message:
                self.broken = message
            logger.exception("pipeline call failed")
            return [{"error": "pipeline", "message": message}] * len(rows)
        seconds = time.perf_counter() - start
        return [
            {"images": images[i * n : (i + 1) * n], "batch_size": len(rows), "generate_s": seconds}
            for i in range(len(rows))
        ]
