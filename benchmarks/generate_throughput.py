"""Throughput of a pixfleet generation job against a plain diffusers loop, in one run.

Both sides do the same work on the same rows: read each control image, resize it, run the
same ControlNet pipeline (same batch size, steps, torch threads) and write one PNG per row.
Steady state is measured the same way for both: images written after the first quarter, over
the time from then to the last file. Ray startup and the time to the first
image are reported separately.

    python benchmarks/generate_throughput.py [--rows 256] [--batch-size 4] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from PIL import Image

from pixfleet.cluster import ensure_ray
from pixfleet.config import GenerationJobConfig
from pixfleet.data.fill50k import make_fill50k
from pixfleet.generation.job import run_generation
from pixfleet.models.tiny import make_tiny_pipeline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches-per-block", type=int, default=4, help="pixfleet's Ray Data block size")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--model", help="an existing ControlNet pipeline folder; default: a tiny one")
    parser.add_argument("--controlnet", help="its ControlNet folder (default: MODEL/controlnet)")
    parser.add_argument("--repeats", type=int, default=3, help="plain/pixfleet pairs, alternated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    return parser.parse_args()


def steady_images_per_second(folder: Path) -> tuple[float, int]:
    """Images written after the first quarter / seconds from then to the last write.

    Skipping a quarter leaves out model loading and warm-up on both sides; pixfleet writes a
    block at a time, so the figure is exact to within one block.
    """
    times = sorted(p.stat().st_mtime for p in folder.glob("*.png"))
    start = len(times) // 4
    return (len(times) - 1 - start) / (times[-1] - times[start]), len(times)


def plain_loop(args, model: Path, controlnet: Path, rows: list[dict], data: Path, out: Path) -> float:
    """What a user writes without pixfleet: load once, loop over batches, save PNGs."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype), torch_dtype=dtype
    ).to(args.device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i : i + args.batch_size]
        controls = [
            Image.open(data / r["conditioning_image_file_name"]).convert("RGB").resize((args.size, args.size))
            for r in batch
        ]
        images = pipe(
            [r["text"] for r in batch],
            image=controls,
            num_inference_steps=args.steps,
            generator=[torch.Generator().manual_seed(i + k) for k in range(len(batch))],
            width=args.size,
            height=args.size,
        ).images
        for k, image in enumerate(images):
            image.save(out / f"{i + k:06d}.png")
    return time.perf_counter() - start


def pixfleet_job(args, model: Path, controlnet: Path, data: Path, out: Path) -> GenerationJobConfig:
    return GenerationJobConfig.model_validate(
        {
            "name": "bench-generate",
            "model": {
                "task": "controlnet",
                "base_model": str(model),
                "controlnets": [str(controlnet)],
                "scheduler": "unipc",
                "device": args.device,
                "dtype": args.dtype,
            },
            "source": {"path": str(data)},
            "preprocess": {"width": args.size, "height": args.size, "resize_mode": "resize"},
            "params": {"num_inference_steps": args.steps},
            "sink": {"output_dir": str(out)},
            "resources": {
                "batch_size": args.batch_size,
                "batches_per_block": args.batches_per_block,
                "torch_threads": args.threads,
                "num_gpus_per_actor": args.num_gpus_per_actor,
            },
            "tracking": {"tracking_uri": f"sqlite:///{out.parent}/mlflow.db", "experiment": "bench"},
            "max_failed_fraction": 0.0,
        }
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pixfleet-bench-"))
    model = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        make_tiny_pipeline("controlnet", model)
    controlnet = Path(args.controlnet) if args.controlnet else model / "controlnet"
    data = make_fill50k(work / "fill50k", n=args.rows, size=args.size, seed=0)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]

    # Alternate the two sides so that drift in the machine's speed hits both alike; the plain
    # loop runs with no Ray up, as it would without pixfleet.
    lines, ratios, ray_seconds = [], [], []
    for repeat in range(args.repeats):
        plain_seconds = plain_loop(args, model, controlnet, rows, data, work / f"plain-{repeat}")
        plain_rate, plain_count = steady_images_per_second(work / f"plain-{repeat}")
        start = time.perf_counter()
        ensure_ray()
        ray_seconds.append(time.perf_counter() - start)
        out = work / f"pixfleet-{repeat}"
        summary = run_generation(pixfleet_job(args, model, controlnet, data, out))
        ray.shutdown()
        pixfleet_rate, pixfleet_count = steady_images_per_second(out / "images")
        assert plain_count == pixfleet_count == args.rows, (plain_count, pixfleet_count)
        ratios.append(pixfleet_rate / plain_rate)
        lines.append(
            f"repeat {repeat}: plain {plain_rate:6.2f} images/s ({plain_seconds:5.1f} s end to end), "
            f"pixfleet {pixfleet_rate:6.2f} images/s ({summary.seconds:5.1f} s end to end), "
            f"ratio {ratios[-1]:.3f}"
        )

    print(
        f"rows {args.rows}, batch {args.batch_size} ({args.batches_per_block} per block), "
        f"{args.size}px, {args.steps} steps, {args.threads} threads, device {args.device}"
    )
    print("\n".join(lines))
    print(
        f"Ray startup {statistics.median(ray_seconds):.1f} s (median, in neither figure); "
        "pixfleet end to end includes actor startup and model loading"
    )
    print(f"ratio pixfleet/plain, steady state: median {statistics.median(ratios):.3f} of {len(ratios)}")


if __name__ == "__main__":
    main()
