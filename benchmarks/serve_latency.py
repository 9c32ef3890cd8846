"""Latency and requests/s of the pixfleet HTTP API against calling the same pipeline directly
in one process, in one run; with batching off and on.

Both sides do the same work per request: decode a base64 PNG control image, run the same
ControlNet pipeline (same steps, size, torch threads), encode the image as base64 PNG.

    direct      one process, no Ray: requests one after another (what a user's script does)
    http        `pixfleet serve`'s app on 127.0.0.1, real HTTP; max_batch_size 1, then N

Each side is measured twice: one client sending requests one after another (latency:
p50/p99, the HTTP overhead is the difference), and `--clients` clients at once
(requests/s; the direct side stays sequential, it has no server to share).

    python benchmarks/serve_latency.py [--requests 48] [--clients 8] [--batch-size 4] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from pixfleet.config.serving import ServingConfig
from pixfleet.models.tiny import make_tiny_pipeline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for requests/s")
    parser.add_argument("--batch-size", type=int, default=4, help="max_batch_size when batching is on")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a 1-CPU replica gets 1)")
    parser.add_argument("--model", help="an existing ControlNet pipeline folder; default: a tiny one")
    parser.add_argument("--controlnet", help="its ControlNet folder (default: MODEL/controlnet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    parser.add_argument("--port", type=int, default=8765)
    return parser.parse_args()


def control_b64(size: int) -> str:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def direct_latencies(args, model: Path, controlnet: Path, control: str) -> list[float]:
    """A user's script: load once, then per request decode, generate, encode."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    dtype = getattr(torch, args.dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(controlnet, dtype=dtype), dtype=dtype
    ).to(args.device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def one(seed: int) -> float:
        start = time.perf_counter()
        image = Image.open(io.BytesIO(base64.b64decode(control))).convert("RGB")
        out = pipe(
            "a circle",
            image=image,
            num_inference_steps=args.steps,
            generator=torch.Generator(args.device).manual_seed(seed),
            width=args.size,
            height=args.size,
        ).images[0]
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        base64.b64encode(buffer.getvalue())
        return time.perf_counter() - start

    one(0)  # warm-up, as the server's first request below
    return [one(seed) for seed in range(args.requests)]


def serving_config(args, model: Path, controlnet: Path, name: str, batch_size: int) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "name": name,
            "route_prefix": f"/{name}",
            "http": {"port": args.port},
            "ingress": {"num_cpus": 0.1},
            "models": [
                {
                    "name": "bench",
                    "model": {
                        "task": "controlnet",
                        "base_model": str(model),
                        "controlnets": [str(controlnet)],
                        "scheduler": "unipc",
                        "device": args.device,
                        "dtype": args.dtype,
                    },
                    "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": 0.02},
                    "num_cpus": 0.5,
                    "num_gpus": args.num_gpus,
                    "max_ongoing_requests": max(args.clients, batch_size),
                    "max_queued_requests": 4 * args.requests,
                }
            ],
        }
    )


def http_measure(args, url: str, control: str, clients: int) -> tuple[list[float], float]:
    """Per-request latencies and requests/s of `args.requests` requests from `clients` clients."""
    body = {"model": "bench", "prompt": "a circle", "control_images": [control], "width": args.size}
    body.update(height=args.size, num_inference_steps=args.steps)
    batch_sizes = []
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        def one(seed: int) -> float:
            start = time.perf_counter()
            response = client.post("/v1/generate", json={**body, "seed": seed})
            response.raise_for_status()
            batch_sizes.append(response.json()["batch_size"])
            return time.perf_counter() - start

        one(0)  # warm-up: first request sets up the handle's routing
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - start
    return latencies, args.requests / seconds, statistics.mean(batch_sizes[1:])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pixfleet-serve-bench-"))
    model = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        make_tiny_pipeline("controlnet", model)
    controlnet = Path(args.controlnet) if args.controlnet else model / "controlnet"
    control = control_b64(args.size)

    direct = direct_latencies(args, model, controlnet, control)  # before Ray: nothing competes
    direct_p50, direct_p99 = percentiles(direct)
    direct_rps = len(direct) / sum(direct)

    import ray
    from ray import serve

    from pixfleet.cluster import ensure_ray
    from pixfleet.serving.app import build_app, http_options

    ensure_ray()
    rows = []
    for name, batch_size in (("unbatched", 1), ("batched", args.batch_size)):
        config = serving_config(args, model, controlnet, name, batch_size)
        serve.start(http_options=http_options(config))
        serve.run(build_app(config), name=name, route_prefix=config.route_prefix)
        url = f"http://127.0.0.1:{args.port}/{name}"
        replica = httpx.get(f"{url}/healthz", timeout=30).json()["models"]["bench"]
        sequential, _, _ = http_measure(args, url, control, clients=1)
        concurrent, rps, mean_batch = http_measure(args, url, control, clients=args.clients)
        serve.delete(name)
        rows.append((name, batch_size, percentiles(sequential), percentiles(concurrent), rps, mean_batch))
    print(f"model replica: {replica}")
    serve.shutdown()
    ray.shutdown()

    print(
        f"{args.requests} requests, {args.size}px, {args.steps} steps, {args.threads} torch threads, "
        f"device {args.device}, {args.clients} concurrent clients"
    )
    print(
        f"direct call           p50 {direct_p50 * 1000:7.1f} ms  p99 {direct_p99 * 1000:7.1f} ms  "
        f"{direct_rps:6.2f} req/s"
    )
    for name, batch_size, (p50, p99), (cp50, cp99), rps, mean_batch in rows:
        print(
            f"http {name:9} (max batch {batch_size}): 1 client p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms "
            f"(overhead p50 {(p50 - direct_p50) * 1000:+6.1f} ms); {args.clients} clients p50 {cp50 * 1000:7.1f} ms "
            f"p99 {cp99 * 1000:7.1f} ms  {rps:6.2f} req/s, mean batch {mean_batch:.2f}, "
            f"ratio req/s http/direct {rps / direct_rps:.3f}"
        )
    print(f"batching gain, req/s batched/unbatched at {args.clients} clients: {rows[1][4] / rows[0][4]:.3f}")


if __name__ == "__main__":
    main()
