"""A load step against an autoscaled model: idle (no replica) -> K clients -> idle again.

One ControlNet model behind `pixfleet serve`'s app with `min_replicas: 0, max_replicas: N`,
one request per replica at a time. The run measures the cold start (the first request's wait
at zero replicas), then K clients send requests for `--load-s` seconds, then nothing for
`--idle-s`. Every second it records the replicas Serve runs, the requests answered and their
latencies. It prints that table, the cold start, the failed requests (0 expected) and the
ratio of requests/s with N replicas against 1 replica (the same run's seconds at each count),
and draws the table as a PNG (replicas and requests/s over time).

Serve's handles and replicas report load every 10 s by default; the run sets both to 0.5 s
(RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S), so the delays below are what it measures.

    python benchmarks/serve_autoscale.py [--replicas 2] [--clients 4] [--load-s 60] [--idle-s 30]
        [--steps 12] [--size 64] [--png serve_autoscale.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve_latency import control_b64

from pixfleet.config.serving import ServingConfig
from pixfleet.models.tiny import make_tiny_pipeline

MODEL, DEPLOYMENT = "bench", "model-bench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="max_replicas (N)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients during the load (K)")
    parser.add_argument("--load-s", type=float, default=60.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--upscale-delay-s", type=float, default=5.0)
    parser.add_argument("--downscale-delay-s", type=float, default=5.0)
    parser.add_argument("--downscale-to-zero-delay-s", type=float, default=10.0)
    parser.add_argument("--model", help="a ControlNet pipeline folder; default: a tiny one")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--png", type=Path, default=Path("serve_autoscale.png"))
    return parser.parse_args()


def serving_config(args, model: Path) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "name": "autoscale",
            "route_prefix": "/",
            "http": {"port": args.port},
            "ingress": {"num_cpus": 0.1},
            "models": [
                {
                    "name": MODEL,
                    "model": {
                        "task": "controlnet",
                        "base_model": str(model),
                        "controlnets": [str(model / "controlnet")],
                    },
                    "defaults": {"num_inference_steps": args.steps},
                    "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
                    "autoscaling": {
                        "min_replicas": 0,
                        "max_replicas": args.replicas,
                        "target_ongoing_requests": 1,
                        "upscale_delay_s": args.upscale_delay_s,
                        "downscale_delay_s": args.downscale_delay_s,
                        "downscale_to_zero_delay_s": args.downscale_to_zero_delay_s,
                        "look_back_period_s": 2,
                    },
                    "num_cpus": 0.1,
                    "num_gpus": args.num_gpus,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 4 * args.clients,
                    "spare_engine": False,
                }
            ],
        }
    )


@dataclass
class Second:
    replicas: int = 0
    answered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)


def running_replicas() -> int:
    from ray import serve

    application = serve.status().applications.get("autoscale")
    deployment = application.deployments.get(DEPLOYMENT) if application else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def load_step(args, url: str, body: dict) -> tuple[list[Second], float]:
    """The per-second table of the whole step, and the cold start's seconds."""
    seconds: list[Second] = []
    start = time.perf_counter()
    stop_load, stop_watch = threading.Event(), threading.Event()

    def second() -> Second:
        index = int(time.perf_counter() - start)
        while len(seconds) <= index:
            seconds.append(Second())
        return seconds[index]

    def watch() -> None:
        while not stop_watch.is_set():
            second().replicas = max(second().replicas, running_replicas())
            time.sleep(0.5)

    def client(seed: int) -> None:
        with httpx.Client(timeout=300) as session:
            while not stop_load.is_set():
                sent = time.perf_counter()
                ok = session.post(f"{url}/v1/generate", json={**body, "seed": seed}).status_code == 200
                row = second()
                row.answered += ok
                row.failed += not ok
                row.latencies.append(time.perf_counter() - sent)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = time.perf_counter()
    cold = httpx.post(f"{url}/v1/generate", json={**body, "seed": 0}, timeout=300)
    cold_start_s = time.perf_counter() - sent
    assert cold.status_code == 200, cold.text
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    for thread in clients:
        thread.start()
    time.sleep(args.load_s)
    stop_load.set()
    for thread in clients:
        thread.join()
    time.sleep(args.idle_s)
    stop_watch.set()
    watcher.join()
    return seconds, cold_start_s


def draw(seconds: list[Second], path: Path) -> None:
    """Replicas (top) and requests answered per second (bottom) over time, with PIL alone."""
    from PIL import Image, ImageDraw

    width, panel, margin = 800, 160, 30
    image = Image.new("RGB", (width, 2 * panel + 3 * margin), "white")
    pen = ImageDraw.Draw(image)
    series = [("replicas", [s.replicas for s in seconds]), ("requests/s", [s.answered for s in seconds])]
    for k, (name, values) in enumerate(series):
        top = margin + k * (panel + margin)
        top_value = max(max(values, default=1), 1)
        pen.rectangle([margin, top, width - margin, top + panel], outline="black")
        pen.text((margin + 4, top + 2), f"{name} (max {top_value})", fill="black")
        step = (width - 2 * margin) / max(len(values) - 1, 1)
        points = [(margin + i * step, top + panel - v / top_value * (panel - 14)) for i, v in enumerate(values)]
        if len(points) > 1:
            pen.line(points, fill="blue", width=2)
    pen.text((margin, 2 * panel + 2 * margin + 6), f"seconds 0..{len(seconds) - 1}", fill="black")
    image.save(path)


def main() -> None:
    args = parse_args()
    for reporter in ("HANDLE", "REPLICA"):
        os.environ[f"RAY_SERVE_{reporter}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    from ray import serve

    from pixfleet.cluster import ensure_ray
    from pixfleet.serving.app import build_app, http_options

    work = Path(tempfile.mkdtemp(prefix="pixfleet-bench-autoscale-"))
    model = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        make_tiny_pipeline("controlnet", model)
    config = serving_config(args, model)
    ensure_ray()
    serve.start(http_options=http_options(config))
    serve.run(build_app(config), name="autoscale", route_prefix="/")
    body = {"model": MODEL, "prompt": "a circle", "control_images": [control_b64(args.size)]}
    seconds, cold_start_s = load_step(args, f"http://127.0.0.1:{args.port}", body)
    serve.shutdown()

    load = f"{args.clients} clients for {args.load_s:.0f} s, then {args.idle_s:.0f} s idle"
    print(f"max_replicas {args.replicas}, {load}")
    print(" second  replicas  answered  failed  p50 s   p99 s")
    for i, s in enumerate(seconds):
        p50 = statistics.median(s.latencies) if s.latencies else float("nan")
        p99 = sorted(s.latencies)[min(len(s.latencies) - 1, int(0.99 * len(s.latencies)))] if s.latencies else p50
        print(f"{i:7d}  {s.replicas:8d}  {s.answered:8d}  {s.failed:6d}  {p50:5.2f}  {p99:6.2f}")
    busy = [s for s in seconds if s.answered or s.failed]
    rate = {n: statistics.mean([s.answered for s in busy if s.replicas == n] or [0.0]) for n in (1, args.replicas)}
    print(f"cold start {cold_start_s:.1f} s; failed requests {sum(s.failed for s in seconds)}")
    first_full = next((i for i, s in enumerate(seconds) if s.replicas == args.replicas), None)
    back_to_zero = next((i for i in range(len(seconds) - 1, -1, -1) if seconds[i].replicas > 0), None)
    print(f"{args.replicas} replicas from second {first_full}; the last replica gone after second {back_to_zero}")
    if rate[1]:
        print(f"requests/s with {args.replicas} replicas / with 1: {rate[args.replicas] / rate[1]:.2f}")
    draw(seconds, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
