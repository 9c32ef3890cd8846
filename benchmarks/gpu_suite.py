"""One-shot GPU suite: full-size random-weight models, pixfleet against plain diffusers, one run.

    python benchmarks/gpu_suite.py --out DIR            # one GPU, no hub: about 8 minutes
    python benchmarks/gpu_suite.py --out DIR --tiny     # the same code on tiny models on CPU

It builds the models it needs (`make-random`, or `make-tiny` with --tiny) under DIR/models
(or --models), then measures each part under its own time budget and rewrites DIR/results.json and
DIR/results.md after every measurement, so a run cut short keeps what it measured:

  generate   SD 1.5 + ControlNet, 512 px, 20 steps UniPC, CFG 7.5, fp16: a plain diffusers loop
             against pixfleet's engine (the runner the Ray Data actors and serving replicas
             call), both eager at batch 8, then the fast path (channels_last, fused q/k/v,
             torch.compile) at batch 8 and 16; and `pixfleet generate` itself when Ray is there.
  pix2pix    InstructPix2Pix SD, 512 px, 20 steps: the same comparisons.
  sdxl       SDXL + ControlNet, 1024 px, 30 steps, batch 4: eager against the fast path.
  train      the ControlNet training step (train_controlnet.py's, pixfleet's `Components.loss`),
             512 px, bf16, batch 8, with and without gradient checkpointing: samples/s and peak
             memory (Ray Train with DDP/ZeRO-2 is `benchmarks/train_throughput.py`).
  serve      a serving replica's engine process against a direct call at one client: the
             latency overhead, p50 and p99.

The engine layer needs torch, diffusers, transformers and pydantic only; Ray, DeepSpeed and
MLflow are used where they import. Images/s is steady state: images after the first call
(loading, compilation and warm-up) over the time they took; time to first image includes
loading. The FLOP share uses 47.5 TFLOP per SD 1.5 + ControlNet image at 512 px, 20 steps,
CFG and the device's dense bf16 peak where known.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixfleet.config import GenerationParams, ModelSpec, OptimizationConfig
from pixfleet.engine import columns as C
from pixfleet.engine.params import resolve_params
from pixfleet.engine.runner import PipelineRunner
from pixfleet.models.tasks import task_info

TFLOP_PER_SD15_CONTROLNET_IMAGE = 47.5  # 512 px, 20 steps, classifier-free guidance
# Datasheet dense BF16 peaks (SXM parts), the figure FLOP shares divide by.
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class GenerationCase:
    part: str
    arch: str  # make-random architecture
    task: str
    size: int
    steps: int
    batches: tuple[int, ...]  # the first is the eager/plain batch; all are run on the fast path
    flops_per_image: float | None = None


FULL_CASES = [
    GenerationCase("generate", "sd15-controlnet", "controlnet", 512, 20, (8, 16), TFLOP_PER_SD15_CONTROLNET_IMAGE),
    GenerationCase("pix2pix", "sd15-pix2pix", "pix2pix", 512, 20, (8, 16)),
    GenerationCase("sdxl", "sdxl-controlnet", "sdxl_controlnet", 1024, 30, (4,)),
]
TINY_CASES = [
    GenerationCase("generate", "sd15-controlnet", "controlnet", 64, 2, (2, 4)),
    GenerationCase("pix2pix", "sd15-pix2pix", "pix2pix", 64, 2, (2, 4)),
    GenerationCase("sdxl", "sdxl-controlnet", "sdxl_controlnet", 64, 2, (2,)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for models and results")
    parser.add_argument("--models", type=Path, help="folder for the built models (default: OUT/models)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on this machine's device (CPU)")
    parser.add_argument("--parts", default="generate,pix2pix,sdxl,train,serve", help="comma-separated parts")
    parser.add_argument("--budget-s", type=float, help="seconds per measurement (default 25, tiny 3)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="torch.compile on the fast path (default: not tiny)"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip `pixfleet generate` even where Ray imports")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (3.0 if args.tiny else 25.0)
    args.models = args.models or args.out / "models"
    args.compile = (not args.tiny) if args.compile is None else args.compile
    return args


class Results:
    """Measurements so far, rewritten to results.json and results.md after each one."""

    def __init__(self, out: Path, environment: dict[str, Any]):
        self.out, self.environment, self.rows = out, environment, []

    def add(self, part: str, variant: str, **values: Any) -> None:
        self.rows.append({"part": part, "variant": variant, **values})
        print(f"{part:9s} {variant:34s} " + "  ".join(f"{k} {_fmt(v)}" for k, v in values.items()), flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(
            json.dumps({"environment": self.environment, "rows": self.rows}, indent=2)
        )
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        lines = [
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            *("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in self.rows),
        ]
        header = "\n".join(f"- {k}: {v}" for k, v in self.environment.items())
        (self.out / "results.md").write_text(f"{header}\n\n" + "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def environment(tiny: bool) -> dict[str, Any]:
    import diffusers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mode": "tiny" if tiny else "full",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
        info["driver, memory"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        info["cuda"] = torch.version.cuda
    return info


def build_model(args, case: GenerationCase) -> Path:
    """The case's pipeline folder under --models, built once."""
    folder = args.models / (f"tiny-{case.task}" if args.tiny else case.arch)
    if (folder / "model_index.json").is_file():
        return folder
    start = time.perf_counter()
    if args.tiny:
        from pixfleet.models.tiny import make_tiny_pipeline

        make_tiny_pipeline(case.task, folder)
    else:
        from pixfleet.models.random_weights import make_random_pipeline

        make_random_pipeline(case.arch, folder, dtype=torch.float16, device="cuda")
    print(f"built {folder.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def device_and_dtype(tiny: bool) -> tuple[str, torch.dtype]:
    if tiny or not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", torch.float16


def inputs(case: GenerationCase, n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (case.size, case.size, 3), dtype=np.uint8) for _ in range(n)]
    return {"prompts": [f"a photo of object {i}, detailed" for i in range(n)], "images": images}


def steady_rate(call, batch: int, budget_s: float, start: float) -> dict[str, float]:
    """Call once (time to first image, counted from `start`), then repeat for `budget_s`."""
    call()
    first = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - first < budget_s:
        call()
        calls += 1
    seconds = time.perf_counter() - first
    return {"images_per_s": calls * batch / seconds, "first_image_s": first - start, "calls": calls}


def plain_rate(args, case: GenerationCase, folder: Path, batch: int) -> dict[str, float]:
    """What a user writes with diffusers alone (the docs' recipe: fp16, SDPA, UniPC)."""
    from diffusers import UniPCMultistepScheduler
    from PIL import Image

    device, dtype = device_and_dtype(args.tiny)
    start = time.perf_counter()
    pipe = task_info(case.task).pipeline_class.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    data = inputs(case, batch)
    images = [Image.fromarray(a) for a in data["images"]]

    def call():
        kwargs = {"image": images, "num_inference_steps": case.steps, "output_type": "np"}
        if task_info(case.task).uses_controlnet:
            kwargs.update(height=case.size, width=case.size, guidance_scale=7.5)
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        return pipe(data["prompts"], generator=generators, **kwargs).images

    return steady_rate(call, batch, args.budget_s, start)


def pixfleet_spec(args, case: GenerationCase, folder: Path, fast: bool) -> ModelSpec:
    optimizations = OptimizationConfig(
        channels_last=fast, fuse_qkv_projections=fast, torch_compile=fast and args.compile
    )
    device, dtype = device_and_dtype(args.tiny)
    return ModelSpec(
        task=case.task,
        base_model=str(folder),
        controlnets=[str(folder / "controlnet")] if task_info(case.task).uses_controlnet else [],
        scheduler="unipc",
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        optimizations=optimizations,
    )


def engine_rows(case: GenerationCase, spec: ModelSpec, batch: int) -> list[dict[str, Any]]:
    """Rows as the generate stage and the serving replica hand them to the runner."""
    overrides = {"num_inference_steps": case.steps}
    if task_info(case.task).uses_controlnet:
        overrides["guidance_scale"] = 7.5
    params = json.dumps(resolve_params(GenerationParams(), overrides, case.task, spec.num_controlnets))
    data = inputs(case, batch)
    info = task_info(case.task)
    column = C.SOURCE_IMAGE if info.needs_source_image else C.control_column(0)
    return [
        {C.PROMPT: prompt, C.SEED: i, C.PARAMS: params, column: image}
        for i, (prompt, image) in enumerate(zip(data["prompts"], data["images"], strict=True))
    ]


def engine_rate(args, case: GenerationCase, folder: Path, batch: int, fast: bool) -> dict[str, float]:
    spec = pixfleet_spec(args, case, folder, fast)
    start = time.perf_counter()
    runner = PipelineRunner.load(spec)
    rows = engine_rows(case, spec, batch)
    return steady_rate(lambda: runner.generate(rows), batch, args.budget_s, start)


def ray_job_rate(args, case: GenerationCase, folder: Path, batch: int) -> dict[str, float]:
    """`pixfleet generate` on the embedded Ray: one actor, Ray Data streaming the rows."""
    import ray

    from pixfleet.cluster import ensure_ray
    from pixfleet.config import GenerationJobConfig
    from pixfleet.data.fill50k import make_fill50k
    from pixfleet.generation.job import run_generation

    work = Path(tempfile.mkdtemp(prefix="gpu-suite-", dir=args.out))
    # Enough rows for a steady state past the first batch, within the budget.
    per_image = 1 / max(0.1, args.last_engine_rate)
    rows = batch * max(3, int(args.budget_s / per_image / batch) + 1)
    data = make_fill50k(work / "data", n=rows, size=case.size, seed=0)
    spec = pixfleet_spec(args, case, folder, fast=False)
    job = GenerationJobConfig.model_validate(
        {
            "name": "gpu-suite",
            "model": spec.model_dump(),
            "source": {"path": str(data)},
            "preprocess": {"width": case.size, "height": case.size, "resize_mode": "resize"},
            "params": {"num_inference_steps": case.steps},
            "sink": {"output_dir": str(work / "out")},
            "resources": {"batch_size": batch, "num_gpus_per_actor": 1 if spec.device == "cuda" else 0},
            "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "gpu-suite"},
            "max_failed_fraction": 0.0,
        }
    )
    own_ray = not ray.is_initialized()  # a caller's Ray (the test suite's) stays up
    ensure_ray()
    start = time.time()
    summary = run_generation(job)
    if own_ray:
        ray.shutdown()
    written = sorted(p.stat().st_mtime for p in (work / "out" / "images").glob("*.png"))
    result = {
        "end_to_end_images_per_s": summary.images_ok / summary.seconds,
        "first_image_s": written[0] - start,
        "rows": summary.images_ok,
        # The actor's share of the job's wall time spent inside pipeline calls.
        "gpu_busy": summary.generate_seconds / summary.seconds,
    }
    # Steady state from the block write times, once the first block is out; Ray Data writes a
    # block at a time, so a job of a few blocks has none to speak of.
    blocks = sorted(set(round(t, 1) for t in written))
    if len(blocks) >= 3:
        after_first = [t for t in written if t > blocks[0] + 0.05]
        result["images_per_s"] = len(after_first) / (written[-1] - blocks[0])
    return result


def generation_part(args, case: GenerationCase, results: Results) -> None:
    folder = build_model(args, case)
    eager_batch = case.batches[0]
    # Each measurement loads its own pipeline; _free() between them gives its memory back.
    plain = plain_rate(args, case, folder, eager_batch)
    _free()
    results.add(case.part, f"plain diffusers, batch {eager_batch}", **plain)
    eager = engine_rate(args, case, folder, eager_batch, fast=False)
    _free()
    args.last_engine_rate = eager["images_per_s"]
    results.add(case.part, f"pixfleet engine, batch {eager_batch}", **eager, ratio=_ratio(eager, plain))
    if case.part == "generate" and importlib.util.find_spec("ray") and not args.no_ray:
        job = ray_job_rate(args, case, folder, eager_batch)
        ratio = {"ratio": _ratio(job, plain)} if "images_per_s" in job else {}
        results.add(case.part, f"pixfleet generate (Ray), batch {eager_batch}", **job, **ratio)
    for batch in case.batches:
        fast = engine_rate(args, case, folder, batch, fast=True)
        _free()
        extra = {"ratio_to_eager": _ratio(fast, eager)}
        if case.flops_per_image and (peak := _peak_tflops()):
            extra["flop_share"] = fast["images_per_s"] * case.flops_per_image / peak
        label = "compile, " if args.compile else ""
        results.add(case.part, f"pixfleet fast path ({label}batch {batch})", **fast, **extra)


def _ratio(a: dict, b: dict) -> float:
    return a["images_per_s"] / b["images_per_s"]


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)


def train_part(args, results: Results) -> None:
    """The training step in one process, bf16 autocast, AdamW, as train_controlnet.py runs it."""
    case = TINY_CASES[0] if args.tiny else FULL_CASES[0]
    folder = build_model(args, case)
    device = torch.device(device_and_dtype(args.tiny)[0])
    batch = 2 if args.tiny else 8
    for checkpointing in (False, True):
        rate, memory = _train_rate(args, case, folder, device, batch, checkpointing)
        _free()
        setting = "gradient checkpointing" if checkpointing else "no checkpointing"
        results.add("train", f"step, batch {batch}, {setting}", samples_per_s=rate, peak_gib=memory)


def _train_rate(args, case, folder: Path, device: torch.device, batch: int, checkpointing: bool):
    from pixfleet.config.training import ControlNetTrainingArgs
    from pixfleet.training.components import load_components

    train_args = ControlNetTrainingArgs(
        pretrained_model_name_or_path=str(folder),
        train_data_dir=str(folder),  # unread: the batches are made here
        resolution=case.size,
        train_batch_size=batch,
        mixed_precision="no" if args.tiny else "bf16",
        gradient_checkpointing=checkpointing,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    parts = load_components(train_args, device)
    optimizer = torch.optim.AdamW(parts.controlnet.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    tokens = parts.tokenizer(["a photo"] * batch, padding="max_length", return_tensors="pt").input_ids
    example = {
        "pixel_values": torch.rand(batch, 3, case.size, case.size) * 2 - 1,
        "conditioning_pixel_values": torch.rand(batch, 3, case.size, case.size),
        "input_ids": tokens,
    }
    example = {k: v.to(device) for k, v in example.items()}

    def step():
        with torch.autocast(device.type, dtype=parts.dtype, enabled=train_args.mixed_precision != "no"):
            loss = parts.loss(parts.controlnet, example, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    rate = steady_rate(step, batch, args.budget_s, time.perf_counter())["images_per_s"]
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, memory


def serve_part(args, results: Results) -> None:
    """A replica's engine process (a child with the pipeline, deadlines enforced) against a direct call."""
    from pixfleet.engine.process import EngineProcess

    case = TINY_CASES[0] if args.tiny else FULL_CASES[0]
    folder = build_model(args, case)
    spec = pixfleet_spec(args, case, folder, fast=False)
    rows = engine_rows(case, spec, 1)
    direct = _direct_latencies(spec, rows, args.budget_s)
    _free()
    engine = EngineProcess(spec, spare=False)
    engine.start()
    try:
        served = _latencies(lambda: engine.generate(rows, deadline=time.time() + 600, grace_s=5), args.budget_s)
    finally:
        engine.close()
    for name, values in (("direct call", direct), ("engine process", served)):
        results.add("serve", f"{name}, 1 client", p50_s=_pct(values, 50), p99_s=_pct(values, 99), n=len(values))
    overhead = {f"p{q}_s": _pct(served, q) - _pct(direct, q) for q in (50, 99)}
    results.add("serve", "overhead", **overhead)


def _direct_latencies(spec: ModelSpec, rows: list[dict], budget_s: float) -> list[float]:
    runner = PipelineRunner.load(spec)
    return _latencies(lambda: runner.generate(rows), budget_s)


def _latencies(call, budget_s: float) -> list[float]:
    call()  # warm-up
    values, start = [], time.perf_counter()
    while len(values) < 5 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        call()
        values.append(time.perf_counter() - t)
    return values


def _pct(values: list[float], q: int) -> float:
    return float(np.percentile(values, q)) if len(values) > 1 else statistics.fmean(values)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.last_engine_rate = 1.0
    results = Results(args.out, environment(args.tiny))
    results.write()
    cases = {case.part: case for case in (TINY_CASES if args.tiny else FULL_CASES)}
    for part in args.parts.split(","):
        start = time.perf_counter()
        try:
            if part in cases:
                generation_part(args, cases[part], results)
            elif part == "train":
                train_part(args, results)
            elif part == "serve":
                serve_part(args, results)
            else:
                sys.exit(f"unknown part {part!r}")
        except Exception as error:  # one part failing (say, out of memory) leaves the others
            results.add(part, "failed", error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        print(f"{part} took {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
