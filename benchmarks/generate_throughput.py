"""Throughput of a pixfleet generation job against a plain diffusers loop, in one run.

Both sides do the same work on the same rows: read each control image, resize it, run the
same ControlNet pipeline (same batch size, steps, torch threads) and write one PNG per row.
Steady state is measured the same way for both: rows written after the first batch, over the
time from the first batch's files to the last file. Ray startup and the time to the first
image are reported separately.

    python benchmarks/generate_throughput.py [--rows 256] [--batch-size 4] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--model", help="an existing ControlNet pipeline folder; default: a tiny one")
    parser.add_argument("--controlnet", help="its ControlNet folder (default: MODEL/controlnet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    return parser.parse_args()


def steady_images_per_second(folder: Path, batch_size: int) -> tuple[float, int]:
    """Rows after the first batch / seconds from the first batch's writes to the last write."""
    times = sorted(p.stat().st_mtime for p in folder.glob("*.png"))
    first_batch_done, last = times[batch_size - 1], times[-1]
    return (len(times) - batch_size) / (last - first_batch_done), len(times)


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

    plain_seconds = plain_loop(args, model, controlnet, rows, data, work / "plain")
    plain_rate, plain_count = steady_images_per_second(work / "plain", args.batch_size)

    ray_start = time.perf_counter()
    ensure_ray()
    ray_seconds = time.perf_counter() - ray_start
    summary = run_generation(pixfleet_job(args, model, controlnet, data, work / "pixfleet"))
    pixfleet_rate, pixfleet_count = steady_images_per_second(work / "pixfleet" / "images", args.batch_size)
    assert plain_count == pixfleet_count == args.rows, (plain_count, pixfleet_count)

    print(f"rows {args.rows}, batch {args.batch_size}, {args.size}px, {args.steps} steps, {args.threads} threads")
    print(f"plain diffusers loop  {plain_rate:7.2f} images/s steady   ({plain_seconds:.1f} s end to end)")
    print(f"pixfleet Ray job      {pixfleet_rate:7.2f} images/s steady   ({summary.seconds:.1f} s end to end)")
    print(f"Ray startup           {ray_seconds:.1f} s (not in either figure)")
    print(f"ratio pixfleet/plain  {pixfleet_rate / plain_rate:.3f} (steady state)")
    print(f"ratio end to end      {plain_seconds / summary.seconds:.3f} (pixfleet includes actor startup)")


if __name__ == "__main__":
    main()
