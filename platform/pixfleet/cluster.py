"""Where jobs run: an embedded local Ray by default, a cluster given an address."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start an embedded local Ray (no dashboard).

    An already initialised Ray (a test session, a Ray Job's driver) is reused as it is.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Nothing outside this process talks to an embedded Ray: no dashboard, no token.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False)
