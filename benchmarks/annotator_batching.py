"""Annotators one image at a time against their forwards batched (`engine/lockstep.py`), in one run.

Both sides are pixfleet's detector on the same photos, the same weights and torch threads, in
this process (no Ray): `batch_forwards=False` makes controlnet_aux's calls one after another,
`batch_forwards=True` makes a batch's calls side by side with one forward per network and
shape. Printed per detector: rows/s each way (after one warm-up batch), their ratio, and how far
the maps are apart (grey levels, share of values that differ), which batching may move by float
rounding. Pixfleet batches on a GPU and not on a CPU; this is the measurement that choice rests on.

    python benchmarks/annotator_batching.py [--rows 64] [--batch-size 16] [--size 128]
        [--device cpu|cuda] [--threads N] [--detector NAME ...] [--annotators FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from pixfleet.config import ControlPreprocessConfig
from pixfleet.config.generation import ANNOTATOR_DETECTORS
from pixfleet.data.fill50k import fill50k_row
from pixfleet.engine.detectors import AnnotatorDetector
from pixfleet.models.annotators import make_random_annotator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="photo side and detect resolution")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--detector", nargs="+", default=list(ANNOTATOR_DETECTORS), choices=ANNOTATOR_DETECTORS)
    parser.add_argument("--annotators", help="a folder laid out as lllyasviel/Annotators; default: random weights")
    return parser.parse_args()


def rows_per_second(detector: AnnotatorDetector, photos: list[np.ndarray], batch: int) -> tuple[float, list]:
    detector(photos[:batch])  # warm-up: first-call allocations and kernel choices
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    maps = [found for i in range(0, len(photos), batch) for found in detector(photos[i : i + batch])]
    return len(photos) / (time.perf_counter() - start), maps


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = args.annotators or tempfile.mkdtemp(prefix="pixfleet-annotators-")
    rng = np.random.default_rng(0)
    photos = [np.asarray(fill50k_row(rng, args.size)[0]) for _ in range(args.rows)]
    print(f"{args.rows} photos of {args.size} px, batch {args.batch_size}, {device}, {args.threads} torch threads")
    for name in args.detector:
        if not args.annotators:
            make_random_annotator(name, folder)
        control = ControlPreprocessConfig(detector=name, model=folder, detect_resolution=args.size)
        one_by_one, single_maps = rows_per_second(AnnotatorDetector(control, device, False), photos, args.batch_size)
        batched, batched_maps = rows_per_second(AnnotatorDetector(control, device, True), photos, args.batch_size)
        apart = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(single_maps, batched_maps, strict=True)]
        differing = sum(int((d > 0).sum()) for d in apart) / sum(d.size for d in apart)
        print(
            f"{name:17s} one by one {one_by_one:7.2f} rows/s, batched {batched:7.2f} rows/s, "
            f"ratio {batched / one_by_one:5.2f}; maps apart at most {max(int(d.max()) for d in apart)} "
            f"grey level(s), {differing:.1e} of values",
            flush=True,
        )


if __name__ == "__main__":
    main()
