"""Throughput of a pixfleet annotate job against a plain loop over the same detector, in one run.

Both sides do the same work on the same photos: read each photo, resize it to the training
resolution, run the same detector (same batch size and torch threads), and write the photo and
its map as PNGs. The detector is a DPT depth model run through its image processor (`--detector
depth`, the default), or one of ControlNet 1.1's annotators (`--detector lineart`, ...), which
the plain loop calls as controlnet_aux's README does, one photo at a time. Steady state is measured alike:
maps written after the first quarter, over the time from then to the last file. The driver's
share of a core (its CPU seconds over the job's wall seconds) is reported beside each run: the
work the rows cost the process that only counts them.

    python benchmarks/annotate_throughput.py [--rows 256] [--batch-size 8] [--size 256] [--threads 2]
        [--detector depth|lineart|lineart_anime|softedge_hed|softedge_pidinet|scribble_hed|mlsd|openpose|normal_bae]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
from generate_throughput import steady_images_per_second
from PIL import Image

from pixfleet.annotation.job import run_annotation
from pixfleet.cluster import ensure_ray
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.generation import ANNOTATOR_DETECTORS
from pixfleet.data.fill50k import fill50k_row
from pixfleet.models.annotators import make_random_annotator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="photo side; also the training resolution")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--detector", default="depth", choices=("depth", *ANNOTATOR_DETECTORS))
    parser.add_argument(
        "--model",
        help="a depth-estimation model folder, or an annotators folder laid out as lllyasviel/Annotators; "
        "default: a small random DPT, or the annotator's checkpoints with random weights",
    )
    parser.add_argument("--repeats", type=int, default=3, help="plain/pixfleet pairs, alternated")
    parser.add_argument("--num-gpus-per-detector", type=float, default=0.0)
    return parser.parse_args()


def make_depth_model(folder: Path, size: int) -> Path:
    """A DPT with ViT-Small widths (6 layers) at the photo size: random weights, real work per image."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=size,
        patch_size=16,
        backbone_out_indices=[1, 3, 4, 5],
        neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64,
        head_hidden_size=32,
    )
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def plain_loop(args, model: Path, photos: list[Path], out: Path) -> float:
    """What a user writes without pixfleet: load once, loop over batches, save the pairs."""
    if args.detector != "depth":
        return plain_annotator_loop(args, model, photos, out)
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    start = time.perf_counter()
    device = "cuda" if args.num_gpus_per_detector else "cpu"
    processor = AutoImageProcessor.from_pretrained(model)
    depth = AutoModelForDepthEstimation.from_pretrained(model).to(device).eval()
    (out / "images").mkdir(parents=True)
    (out / "conditioning_images").mkdir()
    for i in range(0, len(photos), args.batch_size):
        batch = [Image.open(p).convert("RGB").resize((args.size, args.size)) for p in photos[i : i + args.batch_size]]
        with torch.inference_mode():
            outputs = depth(**processor(images=batch, return_tensors="pt").to(device))
        results = processor.post_process_depth_estimation(outputs, [(args.size, args.size)] * len(batch))
        for k, (image, result) in enumerate(zip(batch, results, strict=True)):
            predicted = result["predicted_depth"].cpu().numpy()
            gray = ((predicted - predicted.min()) / (predicted.max() - predicted.min()) * 255).astype(np.uint8)
            image.save(out / "images" / f"{i + k:06d}.png")
            Image.fromarray(gray).convert("RGB").save(out / "conditioning_images" / f"{i + k:06d}.png")
    return time.perf_counter() - start


# controlnet_aux's class of each annotator and the arguments of its call for the map pixfleet makes
ANNOTATOR_CALLS = {
    "lineart": ("LineartDetector", {}),
    "lineart_anime": ("LineartAnimeDetector", {}),
    "softedge_hed": ("HEDdetector", {}),
    "scribble_hed": ("HEDdetector", {"scribble": True}),
    "softedge_pidinet": ("PidiNetDetector", {}),
    "mlsd": ("MLSDdetector", {}),
    "openpose": ("OpenposeDetector", {}),
    "normal_bae": ("NormalBaeDetector", {}),
}


def plain_annotator_loop(args, folder: Path, photos: list[Path], out: Path) -> float:
    """controlnet_aux as its README uses it: from_pretrained once, one call per photo."""
    import controlnet_aux

    start = time.perf_counter()
    name, arguments = ANNOTATOR_CALLS[args.detector]
    device = "cuda" if args.num_gpus_per_detector else "cpu"
    annotator = getattr(controlnet_aux, name).from_pretrained(str(folder)).to(device)
    (out / "images").mkdir(parents=True)
    (out / "conditioning_images").mkdir()
    for i, path in enumerate(photos):
        image = Image.open(path).convert("RGB").resize((args.size, args.size))
        found = annotator(image, detect_resolution=args.size, image_resolution=args.size, **arguments)
        image.save(out / "images" / f"{i:06d}.png")
        found.save(out / "conditioning_images" / f"{i:06d}.png")
    return time.perf_counter() - start


def annotate_job(args, model: Path, photos: Path, out: Path) -> AnnotateJobConfig:
    detector = {"detector": args.detector, "model": str(model)}
    if args.detector != "depth":
        detector["detect_resolution"] = args.size
    return AnnotateJobConfig.model_validate(
        {
            "name": "bench-annotate",
            "source": {"path": str(photos)},
            "detector": detector,
            "resolution": args.size,
            "caption": {"template": "a photo"},
            "output_dir": str(out),
            "resources": {
                "batch_size": args.batch_size,
                "num_cpus_per_detector": 1,
                "num_gpus_per_detector": args.num_gpus_per_detector,
            },
            "tracking": {"tracking_uri": f"sqlite:///{out.parent}/mlflow.db", "experiment": "bench"},
            "max_failed_fraction": 0.0,
        }
    )


def main() -> None:
    args = parse_args()
    # Both sides get the same threads: Ray's workers read OMP_NUM_THREADS from the environment.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pixfleet-bench-annotate-"))
    if args.model:
        model = Path(args.model)
    elif args.detector == "depth":
        model = make_depth_model(work / "dpt", args.size)
    else:
        model = make_random_annotator(args.detector, work / "Annotators")
    rng = np.random.default_rng(0)
    photos = []
    for i in range(args.rows):
        photos.append(work / "photos" / f"{i:06d}.jpg")
        photos[-1].parent.mkdir(exist_ok=True)
        fill50k_row(rng, args.size)[0].save(photos[-1], quality=95)

    lines, ratios, ray_seconds = [], [], []
    for repeat in range(args.repeats):
        plain_seconds = plain_loop(args, model, photos, work / f"plain-{repeat}")
        plain_rate, plain_count = steady_images_per_second(work / f"plain-{repeat}" / "conditioning_images")
        start = time.perf_counter()
        ensure_ray()
        ray_seconds.append(time.perf_counter() - start)
        out = work / f"pixfleet-{repeat}"
        driver = psutil.Process()
        cpu_before, wall_before = sum(driver.cpu_times()[:2]), time.perf_counter()
        summary = run_annotation(annotate_job(args, model, work / "photos", out))
        driver_share = (sum(driver.cpu_times()[:2]) - cpu_before) / (time.perf_counter() - wall_before)
        ray.shutdown()
        pixfleet_rate, pixfleet_count = steady_images_per_second(out / "conditioning_images")
        assert plain_count == pixfleet_count == args.rows, (plain_count, pixfleet_count)
        ratios.append(pixfleet_rate / plain_rate)
        lines.append(
            f"repeat {repeat}: plain {plain_rate:6.2f} rows/s ({plain_seconds:5.1f} s end to end), "
            f"pixfleet {pixfleet_rate:6.2f} rows/s ({summary.seconds:5.1f} s end to end, driver "
            f"{driver_share:.2f} of a core), ratio {ratios[-1]:.3f}"
        )

    print(f"rows {args.rows}, batch {args.batch_size}, {args.size}px, {args.threads} threads, {args.detector} {model}")
    print("\n".join(lines))
    print(f"Ray startup {statistics.median(ray_seconds):.1f} s (median, in neither figure)")
    print(f"ratio pixfleet/plain, steady state: median {statistics.median(ratios):.3f} of {len(ratios)}")


if __name__ == "__main__":
    main()
