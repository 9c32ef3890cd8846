"""How many replicas of each model deployment are running, as Serve's controller reports them.

The ingress admits requests by it (a model's capacity is what its running replicas and its
queue hold) and tells a cold start by it (a request that finds none waits for one). Asked at
most once a second, and only while requests come: an idle ingress does not poll.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")

MAX_AGE_S = 1.0


class RunningReplicas:
    """Running replicas per model name; None while Serve's controller has not answered."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.deployments = {model: handle.deployment_name for model, handle in handles.items()}
        self.app = next(iter(handles.values())).app_name
        self.counts: dict[str, int] = {}
        self.read_at = -MAX_AGE_S
        self.lock = asyncio.Lock()

    async def of(self, model: str, max_age_s: float = MAX_AGE_S) -> int | None:
        return (await self.all(max_age_s)).get(model)

    async def all(self, max_age_s: float = MAX_AGE_S) -> dict[str, int]:
        async with self.lock:  # one read at a time; the requests that queue behind it share it
            if time.monotonic() - self.read_at > max_age_s:
                await asyncio.to_thread(self._read)
        return self.counts

    def _read(self) -> None:
        self.read_at = time.monotonic()
        try:
            deployments = serve.status().applications[self.app].deployments
        except Exception as error:  # the controller restarting: keep the last counts, ask again later
            logger.warning("replica counts unavailable (%s: %s); using the last ones", type(error).__name__, error)
            return
        self.counts = {
            model: deployments[name].replica_states.get("RUNNING", 0) if name in deployments else 0
            for model, name in self.deployments.items()
        }
