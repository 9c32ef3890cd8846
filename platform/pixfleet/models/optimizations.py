"""Apply the memory and speed switches of an OptimizationConfig to a loaded pipeline."""

from __future__ import annotations

import importlib.util

import diffusers
import torch

from pixfleet.config.model import OptimizationConfig


def apply_optimizations(pipe: diffusers.DiffusionPipeline, options: OptimizationConfig, device: torch.device) -> None:
    """Move `pipe` to `device` (or set up CPU offload) and turn on the requested switches."""
    if options.model_cpu_offload:
        if device.type == "cpu":
            raise ValueError("optimizations.model_cpu_offload needs an accelerator, device is cpu")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)

    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.freeu is not None:
        f = options.freeu
        pipe.enable_freeu(s1=f.s1, s2=f.s2, b1=f.b1, b2=f.b2)

    # xformers kernels are CUDA-only; otherwise diffusers already runs PyTorch SDPA.
    xformers_usable = importlib.util.find_spec("xformers") is not None and device.type == "cuda"
    if options.attention_backend == "xformers" and not xformers_usable:
        raise ValueError("optimizations.attention_backend 'xformers' needs xformers and CUDA")
    if options.attention_backend != "sdpa" and xformers_usable:
        pipe.enable_xformers_memory_efficient_attention()

    if options.compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode=options.compile_mode)
