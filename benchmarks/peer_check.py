"""Peer check: pixfleet's ControlNet step against diffusers' own train_controlnet.py (SD) or
train_controlnet_sdxl.py (SDXL), whichever script it is given.

The same tiny pipeline (SD or SDXL, after the script's name), ControlNet and rows go through
both. The script runs unchanged from the diffusers source it is given (read at run time, never
copied here) for one step, in a subprocess that records, without altering anything: the inputs
its first step gives the ControlNet (pixel values, text embeddings, SDXL's pooled embeddings
and time ids, control images), the global RNG state as the step starts drawing (the VAE
sample, the noise, the timesteps) and the loss it logs. pixfleet then preprocesses the same
rows (`TrainPreprocess`) and computes its loss (`Components.loss`) with a generator in that
RNG state. It prints the largest difference of each input and the two losses, and fails past
the tolerance.

    python benchmarks/peer_check.py --script PATH/TO/diffusers/examples/controlnet/train_controlnet_sdxl.py
    python benchmarks/peer_check.py --script PATH/TO/diffusers/examples/controlnet/train_controlnet.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pixfleet.config.training import ControlNetTrainingArgs
from pixfleet.data.fill50k import make_fill50k
from pixfleet.models.tiny import make_tiny_pipeline
from pixfleet.training.components import load_components
from pixfleet.training.data import TrainPreprocess

# Runs the script as `python train_controlnet_sdxl.py ...` would, recording what its first step
# sees through wrappers that call the originals.
RECORDER = textwrap.dedent(
    """
    import runpy, sys, torch, accelerate, diffusers, transformers
    script, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    record = {}

    def wrap(cls, name, before):
        original = getattr(cls, name)
        def wrapper(self, *args, **kwargs):
            before(*args, **kwargs)
            return original(self, *args, **kwargs)
        setattr(cls, name, wrapper)

    def on_encode(pixel_values, *args, **kwargs):
        if "rng" not in record:
            record["rng"], record["pixel_values"] = torch.get_rng_state(), pixel_values.detach().clone()

    def on_controlnet(*args, **kwargs):
        if "encoder_hidden_states" not in record:
            record["encoder_hidden_states"] = kwargs["encoder_hidden_states"].detach().clone()
            record["conditioning_pixel_values"] = kwargs["controlnet_cond"].detach().clone()
            for name, value in (kwargs.get("added_cond_kwargs") or {}).items():
                record[name] = value.detach().clone()

    def on_log(values, step=None, **kwargs):
        if "loss" in values:
            record.setdefault("losses", {})[step] = values["loss"]

    wrap(diffusers.AutoencoderKL, "encode", on_encode)
    wrap(diffusers.ControlNetModel, "forward", on_controlnet)
    wrap(accelerate.Accelerator, "log", on_log)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    torch.save(record, out)
    """
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--script", required=True, type=Path, help="diffusers' train_controlnet.py or train_controlnet_sdxl.py"
    )
    parser.add_argument("--rows", type=int, default=4, help="rows, all in the one batch")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-5)
    return parser.parse_args()


def script_command(script: Path, work: Path, record_path: Path) -> list[str]:
    """The command that runs `script` (its arguments to follow), recording its first step into
    `record_path`."""
    (work / "recorder.py").write_text(RECORDER)
    return [sys.executable, str(work / "recorder.py"), str(script), str(record_path)]


def run_script(args, work: Path, base: Path, data: Path) -> dict:
    record_path = work / "script_step1.pt"
    argv = [
        f"--pretrained_model_name_or_path={base}",
        f"--controlnet_model_name_or_path={base / 'controlnet'}",
        f"--train_data_dir={data}",
        f"--output_dir={work / 'script_out'}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.rows}",
        "--max_train_steps=1",
        f"--seed={args.seed}",
        "--learning_rate=1e-4",
        "--checkpointing_steps=1000",
    ]
    subprocess.run([*script_command(args.script, work, record_path), *argv], check=True)
    return torch.load(record_path, weights_only=False)


def pixfleet_batch(train_args: ControlNetTrainingArgs, data: Path, order_like: torch.Tensor) -> dict:
    """The rows preprocessed by pixfleet, in the order the script's batch holds them."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").open()]
    table = pd.DataFrame(
        {
            "image": [str(data / r["file_name"]) for r in rows],
            "conditioning_image": [str(data / r["conditioning_image_file_name"]) for r in rows],
            "text": [r["text"] for r in rows],
            "source_ref": [f"row {i}" for i in range(len(rows))],
        }
    )
    examples = TrainPreprocess(train_args)(table)
    batch = {c: torch.from_numpy(np.stack(examples[c].to_list())) for c in examples.columns}
    # The script shuffles; each control image is distinct, so it names its row.
    distances = torch.cdist(order_like.flatten(1), batch["conditioning_pixel_values"].flatten(1))
    order = distances.argmin(dim=1)
    assert sorted(order.tolist()) == list(range(len(rows))), "rows of the script's batch not found"
    return {c: v[order] for c, v in batch.items()}


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="pixfleet-peer-"))
    sdxl = "sdxl" in args.script.name
    base = work / "tiny-base"
    make_tiny_pipeline("sdxl_controlnet" if sdxl else "controlnet", base)
    data = make_fill50k(work / "fill50k", n=args.rows, size=args.resolution, seed=args.seed)

    script = run_script(args, work, base, data)

    train_args = ControlNetTrainingArgs(
        pretrained_model_name_or_path=str(base),
        controlnet_model_name_or_path=str(base / "controlnet"),
        train_data_dir=str(data),
        resolution=args.resolution,
        train_batch_size=args.rows,
        seed=args.seed,
    )  # each row's own size and crop: (resolution, resolution, 0, 0), the script's constants here
    batch = pixfleet_batch(train_args, data, script["conditioning_pixel_values"])
    parts = load_components(train_args, torch.device("cpu"))
    generator = torch.Generator().set_state(script["rng"])
    with torch.no_grad():
        loss = float(parts.loss(parts.controlnet, batch, generator))
        encoder_hidden_states, added = parts.conditions(batch)
    inputs = {
        "pixel_values": batch["pixel_values"],
        "conditioning_pixel_values": batch["conditioning_pixel_values"],
        "encoder_hidden_states": encoder_hidden_states,
        **(added or {}),
    }

    print(f"diffusers script: {args.script}")
    print(f"{'SDXL' if sdxl else 'SD'} base, {args.rows} rows, {args.resolution}px, seed {args.seed}")
    print("largest absolute differences of the step's inputs:")
    worst = 0.0
    for name, value in inputs.items():
        difference = float((script[name].float() - value.float()).abs().max())
        worst = max(worst, difference)
        print(f"  {name:26s} {difference:.3e}")
    reference = script["losses"][1]
    relative = abs(loss - reference) / abs(reference)
    print(f"step-1 loss: script {reference:.8f}  pixfleet {loss:.8f}  relative difference {relative:.2e}")
    if relative > args.rtol or worst > 1e-5:
        sys.exit(f"peer check failed: beyond rtol {args.rtol}")
    print("peer check passed")


if __name__ == "__main__":
    main()
