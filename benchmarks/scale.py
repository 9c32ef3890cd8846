"""Dataset scale: what the driver pays per row, against plain pyarrow / Ray Data in the same run.

    python benchmarks/scale.py [--rows 10000,100000,1000000] [--dry-run-rows 10000,100000]

For each size N, a parquet manifest of N rows (64 px control images and prompts; the rows
point at a pool of 1,000 distinct image files, so N can reach millions without writing
millions of files) and these measurements, each beside its baseline:

  first row     seconds from nothing to the first canonical rows out of the source (planning
                included), against the first batch of `ray.data.read_parquet` + reading the
                images, and pyarrow's first batch
  dry run       `pixfleet generate --dry-run` rows/s, its own driver process from start to exit
                (decode, fit, ids and seeds, parameters, tokens, the manifest written), against
                Ray Data reading and decoding the same rows; and that driver's peak RSS
  resume scan   `Manifest.finished()` over a finished output (its manifest.parquet), against
                pyarrow reading its row_id column; and over N rows still in parts of 256
  merge         `Manifest.merge()` of those parts, against pyarrow reading them and writing one file
  dedupe        `HashIndex.keep_new` over N 64-bit hashes (a tenth of them near-copies), in
                blocks of 256, against comparing each row with every kept hash (the old
                way, quadratic: run up to 50,000 only)

10M is estimated from the slope between the two largest sizes. Results go to stdout as a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from pixfleet.annotation.dedupe import HashIndex
from pixfleet.cluster import ensure_ray, quiet_ray_data
from pixfleet.config import GenerationJobConfig
from pixfleet.data.fill50k import fill50k_row
from pixfleet.engine import columns as C
from pixfleet.generation.sink import MANIFEST_SCHEMA, PARTS_DIR, Manifest
from pixfleet.generation.sources import open_source
from pixfleet.models.tiny import make_tiny_pipeline

POOL = 1000  # distinct image files the rows point at


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000", help="sizes for every measurement but the dry run")
    parser.add_argument("--dry-run-rows", default="10000,100000", help="sizes for the dry run (minutes per 100k)")
    parser.add_argument("--brute-force-max", type=int, default=50_000, help="largest N for the quadratic baseline")
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temp folder)")
    return parser.parse_args()


class PeakRss:
    """This process's peak resident memory while the block runs, above what it held before."""

    def __enter__(self) -> PeakRss:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def grew_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def make_pool(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    (folder / "conditioning_images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(POOL):
        _, outline, _ = fill50k_row(rng, 64)
        name = f"conditioning_images/{i:04d}.png"
        outline.save(folder / name)
        names.append(name)
    return names


def make_manifest(folder: Path, pool: list[str], rows: int) -> Path:
    """N rows over the pool's files, each with its own prompt (so its own row id)."""
    path = folder / f"rows-{rows}.parquet"
    if path.exists():
        return path
    schema = pa.schema([("conditioning_image_file_name", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            index = np.arange(start, min(rows, start + 100_000))
            writer.write_table(
                pa.table(
                    {
                        "conditioning_image_file_name": [pool[i % POOL] for i in index],
                        "text": [f"a circle, number {i}" for i in index],
                    },
                    schema=schema,
                )
            )
    return path


def job_config(manifest: Path, model: Path, out: Path) -> GenerationJobConfig:
    return GenerationJobConfig.model_validate(
        {
            "name": "scale",
            "model": {"task": "controlnet", "base_model": str(model), "controlnets": [str(model / "controlnet")]},
            "source": {"path": str(manifest)},
            "preprocess": {"width": 64, "height": 64, "resize_mode": "none"},
            "sink": {"output_dir": str(out)},
            "resources": {"batch_size": 64, "batches_per_block": 4},
            "tracking": {"enabled": False},
        }
    )


def _load_and_decode(batch):
    """The baseline's per-row work: read the file, decode the PNG to an array."""
    from PIL import Image

    folder = batch["folder"][0]
    batch["image"] = [np.asarray(Image.open(f"{folder}/{name}").convert("RGB")) for name in batch["name"]]
    return batch


def baseline_dataset(manifest: Path):
    dataset = ray.data.read_parquet(str(manifest), ray_remote_args={"num_cpus": 0.1})
    dataset = dataset.map_batches(
        lambda b: {"name": b["conditioning_image_file_name"], "folder": np.full(len(b["text"]), str(manifest.parent))},
        batch_format="numpy",
        num_cpus=0.1,
    )
    return dataset.map_batches(_load_and_decode, batch_format="numpy", batch_size=256, num_cpus=0.1)


def first_row(manifest: Path, model: Path, out: Path) -> dict[str, float]:
    job = job_config(manifest, model, out)
    with PeakRss() as rss:
        start = time.perf_counter()
        source = open_source(job.source, "controlnet", 1, job.resources.rows_per_block)
        next(iter(source.dataset.iter_batches(batch_size=None)))
        pixfleet = time.perf_counter() - start
    start = time.perf_counter()
    next(iter(baseline_dataset(manifest).iter_batches(batch_size=None)))
    ray_data = time.perf_counter() - start
    start = time.perf_counter()
    next(pq.ParquetFile(manifest).iter_batches(batch_size=job.resources.rows_per_block))
    plain = time.perf_counter() - start
    return {"pixfleet_s": pixfleet, "ray_data_s": ray_data, "pyarrow_s": plain, "driver_grew_mib": rss.grew_mib}


def dry_run(manifest: Path, model: Path, out: Path, rows: int) -> dict[str, float]:
    """`pixfleet generate --dry-run` as a user runs it (its own driver process, on this
    benchmark's Ray), its driver's resident memory sampled; the baseline in this process."""
    start = time.perf_counter()  # the baseline first: a job's actors take a while to go
    count = sum(len(b["name"]) for b in baseline_dataset(manifest).iter_batches(batch_size=None))
    baseline = time.perf_counter() - start
    assert count == rows
    config = out.parent / f"dry-run-{rows}.yaml"
    config.write_text(yaml.safe_dump(job_config(manifest, model, out).model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    start = time.perf_counter()
    driver = subprocess.Popen(
        [sys.executable, "-m", "pixfleet.cli", "generate", str(config), "--dry-run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak, process = 0, psutil.Process(driver.pid)
    while driver.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, process.memory_info().rss)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = driver.stdout.read()
    assert driver.returncode == 0 and f"rows planned       {rows} " in output, output[-3000:]
    return {
        "pixfleet_rows_per_s": rows / seconds,
        "baseline_rows_per_s": rows / baseline,
        "ratio": baseline / seconds,
        "driver_peak_mib": peak / 2**20,
    }


def synthetic_output(out: Path, rows: int, part_rows: int = 256) -> None:
    """A job's manifest parts for N ok rows, as the write stage leaves them."""
    rng = np.random.default_rng(rows)
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    ids = [f"{v:024x}" for v in rng.integers(0, 2**63, rows)]
    model = json.dumps({"base_model": "tiny"})
    for start in range(0, rows, part_rows):
        chunk = ids[start : start + part_rows]
        columns = {
            C.ROW_ID: chunk,
            C.IMAGE_INDEX: [0] * len(chunk),
            C.STATUS: [C.OK] * len(chunk),
            C.OUTPUT_PATH: [f"{out}/images/{i}.png" for i in chunk],
            C.SOURCE_REF: [f"rows.parquet:{start + k + 1}" for k in range(len(chunk))],
            C.PROMPT: ["a circle"] * len(chunk),
            C.SEED: rng.integers(0, 2**62, len(chunk)),
            "num_images_per_prompt": [1] * len(chunk),
            "model": [model] * len(chunk),
        }
        columns |= {name: [None] * len(chunk) for name in MANIFEST_SCHEMA.names if name not in columns}
        pq.write_table(pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA), parts / f"part-{start:09d}.parquet")


def resume_and_merge(out: Path, rows: int) -> dict[str, float]:
    synthetic_output(out, rows)
    manifest = Manifest(str(out))
    parts = sorted((out / PARTS_DIR).glob("*.parquet"))
    start = time.perf_counter()
    assert len(manifest.finished()) == rows
    scan_parts = time.perf_counter() - start
    start = time.perf_counter()
    pq.write_table(pq.read_table([str(p) for p in parts]), out / "baseline.parquet")
    merge_baseline = time.perf_counter() - start
    start = time.perf_counter()
    merged = manifest.merge()
    merge = time.perf_counter() - start
    assert merged.rows == rows and not list((out / PARTS_DIR).glob("*.parquet"))
    start = time.perf_counter()
    assert len(manifest.finished()) == rows
    scan = time.perf_counter() - start
    start = time.perf_counter()
    pq.read_table(out / "manifest.parquet", columns=[C.ROW_ID])
    scan_baseline = time.perf_counter() - start
    return {
        "scan_s": scan,
        "scan_baseline_s": scan_baseline,
        "scan_parts_s": scan_parts,
        "parts": len(parts),
        "merge_s": merge,
        "merge_baseline_s": merge_baseline,
    }


def hashes(rows: int) -> np.ndarray:
    """N hashes, a tenth of them a few bits from an earlier one."""
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**63, rows, dtype=np.uint64) | (
        rng.integers(0, 2, rows, dtype=np.uint64) << np.uint64(63)
    )
    copies = rng.choice(rows, rows // 10, replace=False)
    for i in copies[copies > 0]:
        source = values[rng.integers(0, i)]
        values[i] = source ^ np.uint64(1 << int(rng.integers(0, 64))) ^ np.uint64(1 << int(rng.integers(0, 64)))
    return values


def dedupe(rows: int, brute_force_max: int, distance: int = 6) -> dict[str, float]:
    values = hashes(rows)
    index = HashIndex(distance)
    start = time.perf_counter()
    for block in range(0, rows, 256):
        index.keep_new(values[block : block + 256])
    result = {"index_s": time.perf_counter() - start, "kept": len(index)}
    if rows <= brute_force_max:
        start = time.perf_counter()
        kept = np.zeros(0, dtype=np.uint64)
        for value in values:  # the old way: every kept hash, a copy per append
            if not len(kept) or np.bitwise_count(kept ^ value).min() > distance:
                kept = np.append(kept, value)
        result["brute_force_s"] = time.perf_counter() - start
        assert len(kept) == len(index)
    return result


def slope_to(points: dict[int, float], target: int) -> float:
    """Linear extrapolation from the two largest sizes measured."""
    (n1, t1), (n2, t2) = sorted(points.items())[-2:]
    return t2 + (t2 - t1) * (target - n2) / (n2 - n1)


def main() -> None:
    args = parse_args()
    sizes = [int(n) for n in args.rows.split(",") if n]
    dry_sizes = [int(n) for n in args.dry_run_rows.split(",") if n]
    work = args.work or Path(tempfile.mkdtemp(prefix="pixfleet-scale-"))
    data = work / "data"
    pool = make_pool(data)
    model = work / "tiny"
    make_tiny_pipeline("controlnet", model)
    ensure_ray()
    quiet_ray_data(False)
    print(
        f"work folder {work}; {psutil.cpu_count()} CPUs; driver RSS after Ray start "
        f"{psutil.Process().memory_info().rss / 2**20:.0f} MiB",
        flush=True,
    )
    # Once on a small manifest, untimed: Ray's worker processes and their imports are then
    # warm for both sides, as they are for every job after a cluster's first.
    first_row(make_manifest(data, pool, 1000), model, work / "out-warm-up")
    table: dict[int, dict] = {}
    # The dry runs last: a job's actors take a while to go, and would slow what follows.
    for rows in sizes:
        manifest = make_manifest(data, pool, rows)
        entry = table.setdefault(rows, {})
        entry["first_row"] = first_row(manifest, model, work / f"out-first-{rows}")
        print(rows, "first row", entry["first_row"], flush=True)
        entry["resume"] = resume_and_merge(work / f"out-resume-{rows}", rows)
        print(rows, "resume/merge", entry["resume"], flush=True)
        entry["dedupe"] = dedupe(rows, args.brute_force_max)
        print(rows, "dedupe", entry["dedupe"], flush=True)
        gc.collect()
    for rows in dry_sizes:
        entry = table.setdefault(rows, {})
        entry["dry_run"] = dry_run(make_manifest(data, pool, rows), model, work / f"out-dry-{rows}", rows)
        print(rows, "dry run", entry["dry_run"], flush=True)
    report(table)


def report(table: dict[int, dict]) -> None:
    print("\n| rows | measurement | pixfleet | baseline | note |\n|---|---|---|---|---|")
    for rows, entry in sorted(table.items()):
        if "first_row" in entry:
            f = entry["first_row"]
            print(
                f"| {rows:,} | first row out of the source | {f['pixfleet_s']:.1f} s | "
                f"Ray Data {f['ray_data_s']:.1f} s, pyarrow {f['pyarrow_s']:.2f} s | "
                f"driver +{f['driver_grew_mib']:.0f} MiB |"
            )
        if "dry_run" in entry:
            d = entry["dry_run"]
            print(
                f"| {rows:,} | dry run (`pixfleet generate --dry-run`, end to end) | "
                f"{d['pixfleet_rows_per_s']:.0f} rows/s | {d['baseline_rows_per_s']:.0f} rows/s (Ray Data read + "
                f"decode) | ratio {d['ratio']:.2f}; driver peak RSS {d['driver_peak_mib']:.0f} MiB |"
            )
        if "resume" in entry:
            r = entry["resume"]
            print(
                f"| {rows:,} | resume scan, finished output | {r['scan_s']:.2f} s | pyarrow row_id column "
                f"{r['scan_baseline_s']:.2f} s | in {r['parts']} parts: {r['scan_parts_s']:.1f} s |"
            )
            print(
                f"| {rows:,} | merge of {r['parts']} parts | {r['merge_s']:.1f} s | pyarrow read + write "
                f"{r['merge_baseline_s']:.1f} s | |"
            )
        if "dedupe" in entry:
            x = entry["dedupe"]
            brute = f"{x['brute_force_s']:.1f} s" if "brute_force_s" in x else "(quadratic: not run)"
            print(
                f"| {rows:,} | near-duplicate search | {x['index_s']:.1f} s | every kept hash {brute} | "
                f"{x['kept']:,} kept |"
            )
    for key, label in (("first_row", "first row"), ("resume", "resume scan")):
        points = {n: e[key]["pixfleet_s" if key == "first_row" else "scan_s"] for n, e in table.items() if key in e}
        if len(points) >= 2:
            print(f"10M {label}, from the slope: {slope_to(points, 10_000_000):.0f} s")
    points = {n: e["dedupe"]["index_s"] for n, e in table.items() if "dedupe" in e}
    if len(points) >= 2:
        print(f"10M near-duplicate search, from the slope: {slope_to(points, 10_000_000):.0f} s")


if __name__ == "__main__":
    main()
