"""Start-up: seconds from a command's start to its first useful result, pixfleet against a plain
single-process program doing the same, each a fresh process, in one run.

    python benchmarks/startup.py [--repeats 2] [--parts generate,train,serve]
        [--script PATH/TO/diffusers/examples/controlnet/train_controlnet.py]

  generate  `pixfleet generate` of the quickstart (tiny ControlNet, 32 fill50k rows, 4 steps)
            to its exit, against a plain diffusers loop over the same rows, model load
            included (goal: within 2x)
  train     `pixfleet train` of the tiny config to its first step line, against diffusers'
            train_controlnet.py to its first step (with --script: the script unchanged, run as
            benchmarks/peer_check.py runs it, with the real torchvision)
            and against a plain loop that does what the script does before its first step:
            tokenizer, text encoder, VAE, UNet, a ControlNet from the UNet, AdamW, the rows read
            and transformed, one step (goal: within 2x of the script)
  serve     `pixfleet serve` of one tiny model to its first answered request, against FastAPI +
            uvicorn + diffusers in one process answering the same request (goal: within 3x)

Both sides of a pair run alternately with the same environment; the figures are wall seconds
from the process's start. pixfleet's own phases are printed from its log lines where they say.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", default="generate,train,serve")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--script", type=Path, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--baseline", help=argparse.SUPPRESS)  # run one baseline in this process
    parser.add_argument("--args", help=argparse.SUPPRESS)
    return parser.parse_args()


# The baselines: what a user writes with the libraries alone.


def plain_generate(model: str, data: str, out: str) -> None:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(f"{model}/controlnet")
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows = [json.loads(line) for line in Path(data, "metadata.jsonl").read_text().splitlines()]
    Path(out).mkdir(parents=True)
    for i in range(0, len(rows), 4):
        batch = rows[i : i + 4]
        controls = [Image.open(Path(data, r["conditioning_image_file_name"])).convert("RGB") for r in batch]
        images = pipe(
            [r["text"] for r in batch],
            image=controls,
            num_inference_steps=4,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(i + k) for k in range(len(batch))],
            height=64,
            width=64,
        ).images
        for k, image in enumerate(images):
            image.save(Path(out, f"{i + k:06d}.png"))


def plain_train_first_step(model: str, data: str) -> None:
    """train_controlnet.py up to its first step: the same models, optimizer and transforms."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for frozen in (vae, unet, text_encoder):
        frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    rows = [json.loads(line) for line in Path(data, "metadata.jsonl").read_text().splitlines()]

    def tensor(path: str) -> torch.Tensor:
        array = np.asarray(Image.open(Path(data, path)).convert("RGB").resize((64, 64)), dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1)

    batch = rows[:4]
    pixels = torch.stack([tensor(r["file_name"]) for r in batch]) * 2 - 1
    controls = torch.stack([tensor(r["conditioning_image_file_name"]) for r in batch])
    ids = tokenizer([r["text"] for r in batch], padding="max_length", truncation=True, return_tensors="pt").input_ids
    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (4,))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(ids)[0]
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=controls, return_dict=False)
    prediction = unet(
        noisy, timesteps, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    loss = F.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    print(f"step 1 | loss {loss.item():.4f}", flush=True)


def plain_serve(model: str, port: str) -> None:
    import torch
    import uvicorn
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from fastapi import Body, FastAPI
    from PIL import Image

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(f"{model}/controlnet")
    )
    pipe.set_progress_bar_config(disable=True)
    app = FastAPI()

    @app.post("/v1/generate")
    def generate(request: dict = Body()) -> dict:  # noqa: B008 - FastAPI's idiom
        control = Image.open(io.BytesIO(base64.b64decode(request["control_images"][0]))).convert("RGB")
        image = pipe(
            request["prompt"],
            image=control,
            num_inference_steps=4,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}

    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


# Measurements.


def run_until(command: list[str], done, env: dict, timeout_s: float = 600) -> float:
    """Seconds from the process's start until `done(line)` is true of a line it printed (or,
    with `done` None, until it exits 0)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if done and done(line):
                return time.perf_counter() - start
        if process.wait(timeout=timeout_s) != 0 or done:
            raise RuntimeError(f"{command} failed:\n{''.join(lines[-40:])}")
        return time.perf_counter() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


def until_answered(command: list[str], url: str, body: dict, env: dict, log: Path, timeout_s: float = 300) -> float:
    """Seconds from the process's start until a POST of `body` to `url` answers 200 (the
    process's output in `log`)."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while time.perf_counter() - start < timeout_s:
            assert process.poll() is None, f"{command} exited with {process.returncode}: see {log}"
            try:
                if httpx.post(url, json=body, timeout=120).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{command}: no 200 from {url} in {timeout_s} s; see {log}")
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline(name: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--baseline", name, "--args", json.dumps(args)]


def pixfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "pixfleet.cli", *args]


def main() -> None:
    args = parse_args()
    if args.baseline:
        {"generate": plain_generate, "train": plain_train_first_step, "serve": plain_serve}[args.baseline](
            *json.loads(args.args)
        )
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="pixfleet-startup-"))
    model, data = work / "tiny", work / "fill50k"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work}/m.db"}
    subprocess.run(pixfleet("models", "make-tiny", "--task", "controlnet", "--out", str(model)), check=True, env=env)
    subprocess.run(pixfleet("data", "fill50k", "--n", "64", "--size", "64", "--out", str(data)), check=True, env=env)
    results: dict[str, list[tuple[float, float]]] = {}
    parts = args.parts.split(",")
    for repeat in range(args.repeats):
        if "generate" in parts:
            out = work / f"gen-{repeat}"
            plain = run_until(baseline("generate", str(model), str(data), str(out / "plain")), None, env)
            config = generate_config(work, model, data, out / "pixfleet")
            ours = run_until(pixfleet("generate", str(config)), None, env)
            results.setdefault("generate", []).append((ours, plain))
        if "train" in parts:
            plain = run_until(baseline("train", str(model), str(data)), lambda line: line.startswith("step 1 "), env)
            config = train_config(work, model, data, repeat)
            ours = run_until(pixfleet("train", str(config)), lambda line: "step 1/" in line, env)
            results.setdefault("train (plain loop)", []).append((ours, plain))
            if args.script:
                command = script_first_step(args.script, work / f"script-{repeat}", model, data)
                script = run_until(command, SCRIPT_STEP_1, env)
                results.setdefault("train", []).append((ours, script))
        if "serve" in parts:
            body = {"model": "tiny-controlnet", "prompt": "a red circle", "control_images": [control_b64(data)]}
            port = free_port()
            plain = until_answered(
                baseline("serve", str(model), str(port)),
                f"http://127.0.0.1:{port}/v1/generate",
                body,
                env,
                work / f"plain-serve-{repeat}.log",
            )
            port = free_port()
            ours = until_answered(
                pixfleet("serve", str(serve_config(work, model, port))),
                f"http://127.0.0.1:{port}/v1/generate",
                body,
                env,
                work / f"serve-{repeat}.log",
            )
            results.setdefault("serve", []).append((ours, plain))
        print(
            f"repeat {repeat}: " + ", ".join(f"{k} {v[-1][0]:.1f} s vs {v[-1][1]:.1f} s" for k, v in results.items()),
            flush=True,
        )
    goals = {"generate": 2.0, "train": 2.0, "train (plain loop)": 2.0, "serve": 3.0}
    print("\n| command | pixfleet | plain | ratio (median) | goal |\n|---|---|---|---|---|")
    for name, pairs in results.items():
        ratio = statistics.median(ours / plain for ours, plain in pairs)
        ours = ", ".join(f"{o:.1f}" for o, _ in pairs)
        plain = ", ".join(f"{p:.1f}" for _, p in pairs)
        print(f"| {name} | {ours} s | {plain} s | {ratio:.2f} | within {goals[name]:g}x |")


# tqdm's bar, which the script updates after each step (universal newlines split it at "\r").
SCRIPT_STEP_1 = re.compile(r"Steps:.*\| 1/\d+ ").search


def script_first_step(script: Path, work: Path, model: Path, data: Path) -> list[str]:
    """diffusers' train_controlnet.py on the tiny model and rows, 64 px, batch 4, two steps; its
    ControlNet is the tiny pipeline's (the script's `from_unet` has the full-size conditioning
    embedding, which downsamples 64 px past the tiny latents)."""
    from peer_check import script_command

    work.mkdir(parents=True)
    return [
        *script_command(script, work, work / "step1.pt"),
        f"--pretrained_model_name_or_path={model}",
        f"--controlnet_model_name_or_path={model / 'controlnet'}",
        f"--train_data_dir={data}",
        f"--output_dir={work / 'out'}",
        "--resolution=64",
        "--train_batch_size=4",
        "--max_train_steps=2",
        "--learning_rate=1e-3",
        "--checkpointing_steps=1000",
        "--seed=0",
    ]


def control_b64(data: Path) -> str:
    return base64.b64encode((data / "conditioning_images" / "000000.png").read_bytes()).decode()


def generate_config(work: Path, model: Path, data: Path, out: Path) -> Path:
    config = yaml.safe_load((ROOT / "pipelines_cfg" / "quickstart.yaml").read_text())
    config["model"]["base_model"], config["model"]["controlnets"] = str(model), [str(model / "controlnet")]
    config["source"] = {"path": str(data), "control_columns": ["conditioning_image"], "limit": 32}
    config["sink"] = {"output_dir": str(out)}
    path = out.parent / "generate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_config(work: Path, model: Path, data: Path, repeat: int) -> Path:
    config = yaml.safe_load((ROOT / "pipelines_cfg" / "train_tiny.yaml").read_text())
    config["name"] = f"startup-{repeat}"
    config["train"].update(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        output_dir=str(work / f"cn-{repeat}"),
        validation_prompt=[],
        validation_image=[],
        max_train_steps=2,
    )
    config["distributed"].update(storage_path=str(work / "ray_train"), num_workers=1, cpus_per_worker=1.5)
    config.pop("registry", None)
    path = work / f"train-{repeat}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve_config(work: Path, model: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "pipelines_cfg" / "serve_tiny.yaml").read_text())
    config["http"]["port"] = port
    served = config["models"][0]
    served["model"]["base_model"], served["model"]["controlnets"] = str(model), [str(model / "controlnet")]
    served.pop("control", None)
    config["models"] = [served]
    path = work / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


if __name__ == "__main__":
    main()
