"""The published architectures (`architectures`) with random weights, saved as pipelines.

Full-size stand-ins for real checkpoints where no model hub is reachable: the published
configs (block widths, attention heads, cross-attention and text-encoder sizes, VAE,
schedulers) saved with `save_pretrained`, so the folder loads through the same
`from_pretrained` path as a downloaded model. They cost what the real models cost and draw
noise, which is all a speed or memory measurement needs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pixfleet.models.architectures import Family, architecture
from pixfleet.models.tasks import task_info
from pixfleet.models.tokenizer import CLIP_VOCAB_SIZE, MODEL_MAX_LENGTH, write_byte_level_tokenizer

BOS_ID, EOS_ID = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1


def _unet(family: Family, in_channels: int, sample_size: int | None) -> UNet2DConditionModel:
    if family == "sd15":
        # diffusers' defaults are SD 1.x's UNet but for the CLIP-L cross-attention width.
        return UNet2DConditionModel(in_channels=in_channels, cross_attention_dim=768, sample_size=sample_size or 64)
    return UNet2DConditionModel(
        in_channels=in_channels,
        sample_size=sample_size or 128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,  # CLIP-L (768) + OpenCLIP bigG (1280) hidden states
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # 6 micro-conditioning ids x 256 + the pooled bigG embedding (1280).
        projection_class_embeddings_input_dim=2816,
    )


def _vae(family: Family) -> AutoencoderKL:
    shared = {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
    }
    if family == "sd15":
        return AutoencoderKL(**shared, sample_size=512)
    return AutoencoderKL(**shared, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def _clip_text_config(width: int, layers: int, heads: int, activation: str) -> CLIPTextConfig:
    """A CLIP text transformer of CLIP's vocabulary and 77-token context."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=activation,
        projection_dim=width,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


CLIP_L = {"width": 768, "layers": 12, "heads": 12, "activation": "quick_gelu"}  # OpenAI CLIP ViT-L/14
OPEN_CLIP_BIG_G = {"width": 1280, "layers": 32, "heads": 20, "activation": "gelu"}  # OpenCLIP ViT-bigG/14


def _scheduler(family: Family):
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if family == "sd15":
        return PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False)
    return EulerDiscreteScheduler(**betas, timestep_spacing="leading")


def build_models(arch: str, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.nn.Module]:
    """The models of `arch` in float32 with random weights, created on `device` (`"meta"`
    allocates nothing: enough to count parameters)."""
    spec = architecture(arch)
    info = task_info(spec.task)
    models: dict[str, torch.nn.Module] = {}
    with torch.device(device):
        torch.manual_seed(seed)
        models["unet"] = _unet(spec.family, spec.unet_in_channels, spec.unet_sample_size)
        torch.manual_seed(seed)
        models["vae"] = _vae(spec.family)
        torch.manual_seed(seed)
        models["text_encoder"] = CLIPTextModel(_clip_text_config(**CLIP_L))
        if spec.family == "sdxl":
            # SDXL joins OpenCLIP bigG's hidden states to CLIP-L's; bigG's pooled output
            # conditions the UNet too.
            torch.manual_seed(seed)
            models["text_encoder_2"] = CLIPTextModelWithProjection(_clip_text_config(**OPEN_CLIP_BIG_G))
        if info.uses_controlnet:
            torch.manual_seed(seed)
            models["controlnet"] = ControlNetModel.from_unet(models["unet"])
    return models


def make_random_pipeline(
    arch: str,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Build `arch` with random weights on `device`, cast to `dtype`, save it to `out_dir` with
    `save_pretrained` (safetensors) and return the folder."""
    spec = architecture(arch)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = write_byte_level_tokenizer(tokenizer_dir, vocab_size=CLIP_VOCAB_SIZE)
    components: dict = {name: model.to(dtype) for name, model in build_models(arch, device, seed).items()}
    components["tokenizer"] = tokenizer
    if spec.family == "sdxl":
        components["tokenizer_2"] = tokenizer
    components["scheduler"] = _scheduler(spec.family)
    task_info(spec.task).assemble(components).save_pretrained(out, safe_serialization=True)
    return out
