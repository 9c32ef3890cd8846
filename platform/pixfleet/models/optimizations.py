"""Apply the memory and speed switches of an OptimizationConfig to a loaded pipeline."""

from __future__ import annotations

import importlib.util

import diffusers
import torch

from pixfleet.config.model import OptimizationConfig


def apply_optimizations(
    pipe: diffusers.DiffusionPipeline, options: OptimizationConfig, device: torch.device, has_loras: bool = False
) -> None:
    """Move `pipe` to `device` (or set up CPU offload) and turn on the requested switches;
    the ones left unset (None) are on for CUDA."""
    on_cuda = device.type == "cuda"
    if options.model_cpu_offload:
        if not on_cuda:
            raise ValueError(f"optimizations.model_cpu_offload needs an accelerator, device is {device.type}")
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

    if uses_xformers(options, device):
        if options.fuse_qkv_projections:
            raise ValueError("optimizations.fuse_qkv_projections runs on SDPA; set attention_backend: sdpa")
        pipe.enable_xformers_memory_efficient_attention()

    fuse_by_default = fuses_by_default(options, device, has_loras)
    # The VAE runs once per call, not once per step: compiling it would not repay its cost.
    speed_up(pipe.vae, options, on_cuda, fuse_by_default, compile_model=False)
    pipe.unet = speed_up(pipe.unet, options, on_cuda, fuse_by_default)
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, diffusers.MultiControlNetModel):
        for i, net in enumerate(controlnet.nets):
            controlnet.nets[i] = speed_up(net, options, on_cuda, fuse_by_default)
    elif controlnet is not None:
        pipe.controlnet = speed_up(controlnet, options, on_cuda, fuse_by_default)


def uses_xformers(options: OptimizationConfig, device: torch.device) -> bool:
    """xformers kernels are CUDA-only; otherwise diffusers runs PyTorch SDPA."""
    usable = importlib.util.find_spec("xformers") is not None and device.type == "cuda"
    if options.attention_backend == "xformers" and not usable:
        raise ValueError("optimizations.attention_backend 'xformers' needs xformers and CUDA")
    return options.attention_backend != "sdpa" and usable


def fuses_by_default(options: OptimizationConfig, device: torch.device, has_loras: bool) -> bool:
    """Fused q/k/v projections are safe on CUDA with SDPA, unsliced attention (fusing swaps the
    attention processors) and no LoRA layers to bypass."""
    unfused_processors = options.attention_slicing or uses_xformers(options, device)
    return device.type == "cuda" and not has_loras and not unfused_processors


def speed_up(
    model: torch.nn.Module,
    options: OptimizationConfig,
    on_cuda: bool,
    fuse_by_default: bool,
    compile_model: bool = True,
) -> torch.nn.Module:
    """One model (UNet, VAE, ControlNet) with the fast-path switches: channels_last and fused
    q/k/v in place, and the model compiled when asked (diffusers unwraps compiled modules)."""
    if _switch(options.channels_last, on_cuda):
        model.to(memory_format=torch.channels_last)
    if _switch(options.fuse_qkv_projections, fuse_by_default):
        model.fuse_qkv_projections()
    if options.torch_compile and compile_model:
        inductor = options.compile_backend == "inductor"
        return torch.compile(model, backend=options.compile_backend, mode=options.compile_mode if inductor else None)
    return model


def _switch(setting: bool | None, default: bool) -> bool:
    return default if setting is None else setting
