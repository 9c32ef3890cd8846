"""What serving reports to Ray's metrics, beside Serve's own `ray_serve_*`: Prometheus text on
each node's metrics export port (Ray's Prometheus integration, which prefixes `ray_`), every
series tagged with the served model's name (and by Serve with application, deployment, replica).

    ray_pixfleet_requests_total{model,status}   requests answered, by HTTP status      (ingress)
    ray_pixfleet_request_seconds{model}         latency histogram of those requests    (ingress)
    ray_pixfleet_requests_in_flight{model}      admitted and not yet answered: running
                                                or queued for a replica                (ingress)
    ray_pixfleet_replica_start_seconds{model}   histogram of replica starts: engine
                                                process and model load; its _count is
                                                the cold starts                        (replica)
    ray_pixfleet_engine_restarts_total{model}   engine processes replaced after a call
                                                stuck past its deadline                (replica)

Requests FastAPI refuses before a model is known (a malformed body) are not counted here.

The replica count is Serve's: `ray_serve_deployment_replica_healthy`, one series per replica.
Created on first use, in the process that records them.
"""

from __future__ import annotations

from functools import cache

from ray.serve import metrics

SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


@cache
def requests() -> metrics.Counter:
    return metrics.Counter(
        "pixfleet_requests", description="Requests answered, by model and HTTP status.", tag_keys=("model", "status")
    )


@cache
def request_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "pixfleet_request_seconds",
        description="Seconds from admission to answer, by model.",
        boundaries=SECONDS_BOUNDARIES,
        tag_keys=("model",),
    )


@cache
def requests_in_flight() -> metrics.Gauge:
    return metrics.Gauge(
        "pixfleet_requests_in_flight",
        description="Requests admitted by this ingress replica and not yet answered, by model.",
        tag_keys=("model",),
    )


@cache
def replica_start_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "pixfleet_replica_start_seconds",
        description="Seconds a model replica took to start its engine and load the model (cold starts).",
        boundaries=SECONDS_BOUNDARIES,
        tag_keys=("model",),
    )


@cache
def engine_restarts() -> metrics.Counter:
    return metrics.Counter(
        "pixfleet_engine_restarts",
        description="Engine processes replaced after a call stuck past its deadline, by model.",
        tag_keys=("model",),
    )
