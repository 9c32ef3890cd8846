"""Training samples/s: `pixfleet train` (1 and 2 workers) against a plain PyTorch loop, one run.

The plain loop does the same step (the script's for the base, `Components.loss`) on the same tiny
model, data and batch size in one process with torch's AdamW, no Ray. Steady state is the
median samples/s over the steps after the first quarter; peak memory is the process's RSS
(or peak CUDA memory on GPU) as rank 0 reports it.

    python benchmarks/train_throughput.py [--base sd|sdxl] [--steps 40] [--batch-size 4] [--resolution 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from pixfleet.cluster import ensure_ray
from pixfleet.config.training import TrainingJobConfig
from pixfleet.data.fill50k import make_fill50k
from pixfleet.models.tiny import make_tiny_pipeline
from pixfleet.training.components import load_components
from pixfleet.training.data import TrainPreprocess
from pixfleet.training.trainer import run_training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--strategy", default="deepspeed", choices=["deepspeed", "ddp"])
    parser.add_argument("--base", default="sd", choices=["sd", "sdxl"], help="the tiny base built when no --model")
    parser.add_argument("--model", help="an existing SD or SDXL pipeline folder; default: a tiny one")
    return parser.parse_args()


def steady(values: list[float]) -> float:
    return statistics.median(values[len(values) // 4 :])


def train_job(args, model: Path, data: Path, work: Path, workers: int) -> TrainingJobConfig:
    return TrainingJobConfig.model_validate(
        {
            "name": f"bench-{workers}",
            "train": {
                "pretrained_model_name_or_path": str(model),
                "train_data_dir": str(data),
                "output_dir": str(work / f"controlnet-{workers}"),
                "resolution": args.resolution,
                "train_batch_size": args.batch_size,
                "max_train_steps": args.steps,
                "checkpointing_steps": args.steps,
                "learning_rate": 1e-4,
                "lr_warmup_steps": 0,
                "seed": 0,
            },
            "distributed": {
                "strategy": args.strategy,
                "num_workers": workers,
                "cpus_per_worker": 2 / workers * 0.75,
                "storage_path": str(work / "ray_train"),
            },
            "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"},
        }
    )


def plain_loop(args, job: TrainingJobConfig) -> tuple[list[float], float]:
    """samples/s per step and peak RSS (MiB) of the same step in one process."""
    table = pd.DataFrame([json.loads(line) for line in (Path(job.train.train_data_dir) / "metadata.jsonl").open()])
    base = Path(job.train.train_data_dir)
    table = pd.DataFrame(
        {
            "image": [str(base / f) for f in table["file_name"]],
            "conditioning_image": [str(base / f) for f in table["conditioning_image_file_name"]],
            "text": table["text"],
            "source_ref": [f"row {i}" for i in range(len(table))],
        }
    )
    examples = TrainPreprocess(job.train)(table)
    parts = load_components(job.train, torch.device("cpu"))
    optimizer = torch.optim.AdamW(parts.controlnet.parameters(), lr=job.train.learning_rate)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for step in range(args.steps):
        start = time.perf_counter()
        rows = [(step * args.batch_size + k) % len(examples) for k in range(args.batch_size)]
        batch = {c: torch.from_numpy(np.stack(examples[c].iloc[rows].to_list())) for c in examples.columns}
        loss = parts.loss(parts.controlnet, batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.controlnet.parameters(), job.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        rates.append(args.batch_size / (time.perf_counter() - start))
    return rates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pixfleet_rates(job: TrainingJobConfig, work: Path) -> tuple[list[float], float]:
    import mlflow

    summary = run_training(job)
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    history = client.get_metric_history(summary.mlflow_run_id, "samples_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    memory = client.get_run(summary.mlflow_run_id).data.metrics.get("peak_memory_mb", float("nan"))
    return rates, memory


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="pixfleet-train-bench-"))
    model = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        make_tiny_pipeline("sdxl_controlnet" if args.base == "sdxl" else "controlnet", model)
    data = make_fill50k(work / "fill50k", n=args.rows, size=args.resolution, seed=0)

    plain, plain_memory = plain_loop(args, train_job(args, model, data, work, 1))
    ensure_ray()
    results = {workers: pixfleet_rates(train_job(args, model, data, work, workers), work) for workers in (1, 2)}
    ray.shutdown()

    base = steady(plain)
    print(
        f"{args.model or 'tiny ' + args.base}: {args.steps} steps, batch {args.batch_size} per worker, "
        f"{args.resolution}px, strategy {args.strategy}"
    )
    print(f"plain PyTorch loop      {base:7.2f} samples/s   peak RSS {plain_memory:7.0f} MiB")
    for workers, (rates, memory) in results.items():
        rate = steady(rates)
        print(
            f"pixfleet train x{workers}      {rate:7.2f} samples/s   peak RSS {memory:7.0f} MiB (rank 0)"
            f"   ratio {rate / base:.3f}"
        )


if __name__ == "__main__":
    main()
