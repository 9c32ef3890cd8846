"""The training step's random draws come from the CPU generator the loop seeds, on any device."""

from __future__ import annotations

import pytest
import torch

from pixfleet.config.training import ControlNetTrainingArgs
from pixfleet.training.components import load_components


def step_loss(tiny_dir, device: str, seed: int) -> float:
    args = ControlNetTrainingArgs(
        pretrained_model_name_or_path=str(tiny_dir / "controlnet"), train_data_dir=str(tiny_dir), resolution=32
    )
    parts = load_components(args, torch.device(device))
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "conditioning_pixel_values": torch.rand(2, 3, 32, 32),
        "input_ids": parts.tokenizer(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids,
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.no_grad():
        return float(parts.loss(parts.controlnet, batch, torch.Generator().manual_seed(seed)))


def test_the_step_is_a_function_of_the_generator_seed(tiny_dir):
    assert step_loss(tiny_dir, "cpu", seed=1) == step_loss(tiny_dir, "cpu", seed=1)
    assert step_loss(tiny_dir, "cpu", seed=1) != step_loss(tiny_dir, "cpu", seed=2)


@pytest.mark.gpu
def test_a_gpu_step_draws_the_noise_a_cpu_step_draws(tiny_dir):
    # The loop's generator lives on the CPU; a CUDA tensor's normal_ refuses it (seen on an H200).
    assert step_loss(tiny_dir, "cuda", seed=1) == pytest.approx(step_loss(tiny_dir, "cpu", seed=1), rel=1e-3)
