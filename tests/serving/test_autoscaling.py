"""Autoscaled serving on the session's Serve: a model at zero replicas is healthy without being
woken by the health check, and answers its first request after a cold start; load raises its
replicas to the maximum (each replica holds one request: four clients keep both busy), the
replica removed when the load falls answers the request it holds, idleness takes them back to
zero, and no request fails on the way; replicas take their engine processes with them, and
Ray's metrics endpoint counts it all. A model whose cold start outlasts its limit answers 503
with Retry-After, and a client that honours it (the playground page, too) is answered."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.helpers import CHROMIUM, rendered_dom
from tests.serving.conftest import serving_config
from tests.serving.test_serving import controlnet_request

pytestmark = pytest.mark.timeout(300)
APP = "auto"
DEPLOYMENT = "model-tiny-controlnet"
AUTOSCALING = {
    "min_replicas": 0,
    "max_replicas": 2,
    # Each replica runs one request at a time (max_ongoing_requests 1); a target of 2 counts the
    # queued ones too: four clients call for two replicas, a single request for one.
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 3,
    "downscale_to_zero_delay_s": 2,
    "look_back_period_s": 1,
}


def running_replicas(deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


def replica_ids() -> set[str]:
    """The ids of the model's live replicas (their actors are named ...#<deployment>#<id>)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    return {
        a.name.rsplit("#", 1)[1] for a in actors if a.name and a.name.startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#")
    }


def engine_processes() -> int:
    return sum(
        1 for p in psutil.process_iter(["cmdline"]) if "pixfleet.engine.process" in " ".join(p.info["cmdline"] or [])
    )


def scraped(metric: str, **labels: str) -> float:
    """The sum of `metric`'s series for this app's model on Ray's Prometheus endpoint."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray.nodes()[0]
    with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics") as page:
        text = page.read().decode()
    wanted = {"application": APP, "model": "tiny-controlnet", **labels}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and wanted.items() <= sample.labels.items()
    )


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.25)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def autoscaled(server, tiny_dir):
    """The tiny ControlNet, one request per replica at a time, scaled 0..2; beside it the same
    model twice more, scaled 0..1 with a cold-start limit far below a replica's start (one for
    an HTTP client, one for the playground page)."""
    from ray import serve

    from pixfleet.serving.app import build_app

    # Long enough for the seconds-long requests that hold a replica while Serve removes it.
    config = serving_config(tiny_dir, server.tracking_uri, 8000, APP, limits={"request_timeout_s": 60})
    model = config.models[0].model_dump(exclude={"multiplex", "max_pixel_steps", "detectors"})
    model |= {
        "autoscaling": AUTOSCALING,
        "defaults": {"num_inference_steps": 4},
        "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
        "max_ongoing_requests": 1,
        "spare_engine": False,
    }
    cold = {
        "autoscaling": AUTOSCALING | {"max_replicas": 1, "downscale_to_zero_delay_s": 30},
        "cold_start_timeout_s": 0.2,
    }
    models = [model] + [model | cold | {"name": name} for name in ("tiny-cold", "tiny-cold-page")]
    models = [type(config.models[0]).model_validate(m) for m in models]
    config = config.model_copy(update={"models": models})
    before = engine_processes()
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{server.url}/{APP}", before
    serve.delete(APP)


def test_replicas_follow_the_load_up_and_down_to_zero_answering_every_request(autoscaled):
    url, engines_before = autoscaled
    assert running_replicas() == 0 and engine_processes() == engines_before  # no replica, no GPU held
    # A health check finds the idle model healthy without calling it: a call would start a replica.
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["models"]["tiny-controlnet"]["replicas"] == 0, health.text
    time.sleep(2)  # what Serve (upscale_delay_s 0) would take to start one for a queued call
    assert running_replicas() == 0

    first = httpx.post(f"{url}/v1/generate", json=controlnet_request(0, seed=1), timeout=120)
    assert first.status_code == 200, first.text  # queued through the cold start, not turned away
    assert running_replicas() == 1 and replica_ids() == {first.headers["x-pixfleet-replica"]}

    statuses: list[int] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        with httpx.Client(timeout=120) as session:
            while not stop.is_set():
                statuses.append(session.post(f"{url}/v1/generate", json=controlnet_request(seed)).status_code)

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: running_replicas() == 2, 120, "a second replica under load")
    finally:
        stop.set()  # each client's request in flight finishes
        for thread in clients:
            thread.join()
    assert statuses and set(statuses) == {200}, statuses

    # Down by one while the replica Serve removes (the newest) holds a request: two long requests
    # take one replica each; two requests call for one replica, so Serve stops the newest while
    # it runs its request.
    (newest,) = replica_ids() - {first.headers["x-pixfleet-replica"]}

    def post(seed: int) -> tuple[httpx.Response, float]:
        # Seconds long, well past the downscale delay (3 s) and the load reports that lead to it,
        # so Serve stops the replica in the middle of the request rather than near its end.
        body = controlnet_request(seed, num_inference_steps=300)
        return httpx.post(f"{url}/v1/generate", json=body, timeout=120), time.monotonic()

    def first_below_two_replicas() -> float:
        wait_for(lambda: running_replicas() < 2, 90, "a replica stopping")
        return time.monotonic()

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post, seed) for seed in (1, 2)]
        stopping = pool.submit(first_below_two_replicas)
        answers = [future.result() for future in held]
    statuses += [response.status_code for response, _ in answers]
    assert set(statuses) == {200}, [response.text for response, _ in answers]
    oldest = first.headers["x-pixfleet-replica"]
    assert sorted(response.headers["x-pixfleet-replica"] for response, _ in answers) == sorted([oldest, newest])
    (answered_at,) = [at for response, at in answers if response.headers["x-pixfleet-replica"] == newest]
    assert stopping.result() < answered_at  # removed while it held the request, which it answered
    wait_for(lambda: newest not in replica_ids(), 30, "the drained replica gone")

    wait_for(lambda: running_replicas() == 0, 60, "back to zero replicas when idle")
    wait_for(lambda: engine_processes() == engines_before, 10, "the removed replicas' engine processes gone")

    # What a Prometheus scrape of Ray's metrics endpoint sees of it (reported every few seconds).
    answered = 1 + len(statuses)
    wait_for(lambda: scraped("ray_pixfleet_requests_total", status="200") == answered, 30, "the answers counted")
    assert scraped("ray_pixfleet_requests_total") == answered  # no other status
    assert scraped("ray_pixfleet_request_seconds_count") == answered
    assert scraped("ray_pixfleet_requests_in_flight") == 0
    assert scraped("ray_pixfleet_replica_start_seconds_count") >= 2  # the cold start, then the second replica


def test_a_cold_start_past_its_limit_answers_503_with_retry_after_and_a_retry_is_answered(autoscaled):
    url, _ = autoscaled
    assert running_replicas("model-tiny-cold") == 0
    body = controlnet_request(0, model="tiny-cold")
    with httpx.Client(timeout=60) as client:
        refused = client.post(f"{url}/v1/generate", json=body)
        assert refused.status_code == 503, refused.text
        assert "no replica running" in refused.json()["error"]["message"]
        # What a client does with the answer: retry after the seconds it names, until the replica
        # the refused request called for has started.
        answers = [refused]
        while answers[-1].status_code == 503 and len(answers) < 60:
            time.sleep(int(answers[-1].headers["retry-after"]))
            answers.append(client.post(f"{url}/v1/generate", json=body))
    assert answers[-1].status_code == 200, answers[-1].text
    assert all(a.status_code == 503 and a.headers["retry-after"] == "1" for a in answers[:-1])


def test_admission_follows_the_running_replicas(tiny_dir):
    from pixfleet.serving.ingress import _capacity

    config = serving_config(tiny_dir, "sqlite:///mlflow.db", 8000, APP)
    model = config.models[0].model_copy(update={"max_ongoing_requests": 8, "max_queued_requests": 16})
    model.autoscaling.max_replicas = 4
    assert _capacity(model, 0) == 16  # at zero, the queue: requests wait through the cold start
    assert _capacity(model, 2) == 2 * 8 + 16  # scaled up: not turned away at one replica's capacity
    assert _capacity(model, None) == 4 * 8 + 16  # Serve's controller not heard from: all it may scale to


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium (the Debian package) is not installed")
def test_the_playground_waits_through_a_cold_start_past_its_limit(autoscaled):
    import re

    url, _ = autoscaled
    assert running_replicas("model-tiny-cold-page") == 0
    # Its first request is refused after 0.2 s, long before a replica can start: the page asks again.
    dom = rendered_dom(f"{url}/?model=tiny-cold-page&prompt=a%20circle&num_inference_steps=2&run=1", 700)
    section = re.search(r'<section data-model="tiny-cold-page".*?</section>', dom, re.S).group(0)
    result = re.search(r'<div class="result" data-status="(\d+)" data-waited="(\d+)">(.*?)</div>', section, re.S)
    assert result and result.group(1) == "200", section[:3000]
    assert int(result.group(2)) >= 1 and '<img src="data:image/png;base64,' in result.group(3)
