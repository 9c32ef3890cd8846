"""The models of a ControlNet fine-tuning step, for an SD or an SDXL base.

`Components` holds the frozen VAE and UNet, the trained ControlNet and the noise schedule, and
computes train_controlnet.py's loss. The text side differs by base, as the two scripts do it:
SD encodes the batch's token ids in the step (`SDComponents`); SDXL's two text encoders run
before training, in the preprocessing actors (`SDXLPromptEncoder`), and the step reads the
prompt embeddings, the pooled embedding and the micro-conditioning ids from the batch
(`SDXLComponents`), so the encoders need not sit in every worker's memory.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from pixfleet.config.training import ControlNetTrainingArgs

SD_INTERPOLATION = "bilinear"  # train_controlnet.py: transforms.Resize's default
SDXL_INTERPOLATION = "lanczos"  # train_controlnet_sdxl.py: --image_interpolation_mode's default


@cache
def _is_sdxl(base: str, revision: str | None, cache_dir: str | None) -> bool:
    index = os.path.join(base, "model_index.json")
    if os.path.isfile(index):  # a folder: read as is, without importing diffusers' pipelines (seconds)
        with open(index) as f:
            return "text_encoder_2" in json.load(f)
    from diffusers import DiffusionPipeline

    return "text_encoder_2" in DiffusionPipeline.load_config(base, revision=revision, cache_dir=cache_dir)


def base_is_sdxl(args: ControlNetTrainingArgs) -> bool:
    """SDXL bases have a second text encoder (model_index.json, read from a folder or the hub)."""
    return _is_sdxl(args.pretrained_model_name_or_path, args.revision, args.cache_dir)


def interpolation(args: ControlNetTrainingArgs) -> str:
    """The resize filter: the flag, else the default of the script this base follows."""
    return args.image_interpolation_mode or (SDXL_INTERPOLATION if base_is_sdxl(args) else SD_INTERPOLATION)


def load_tokenizer(args: ControlNetTrainingArgs, subfolder: str = "tokenizer"):
    """`tokenizer_name` when set (for the first tokenizer), else the base model's, as the scripts load it."""
    from transformers import AutoTokenizer

    if args.tokenizer_name and subfolder == "tokenizer":
        return AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision, cache_dir=args.cache_dir)
    return AutoTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir
    )


def _text_encoder(args: ControlNetTrainingArgs, subfolder: str, dtype: torch.dtype):
    """The class named in the folder's config (CLIPTextModel, CLIPTextModelWithProjection)."""
    import transformers
    from transformers import AutoConfig

    base = args.pretrained_model_name_or_path
    config = AutoConfig.from_pretrained(base, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(
        base, subfolder=subfolder, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, dtype=dtype
    )


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


class SDXLPromptEncoder:
    """SDXL's prompt embeddings for a batch of captions, as train_controlnet_sdxl.py's
    `compute_embeddings`: both encoders' penultimate hidden states side by side, and the second
    encoder's pooled output."""

    def __init__(self, args: ControlNetTrainingArgs, device: torch.device | str = "cpu", dtype=torch.float32):
        self.tokenizers = [load_tokenizer(args, "tokenizer"), load_tokenizer(args, "tokenizer_2")]
        self.text_encoders = [_text_encoder(args, name, dtype) for name in ("text_encoder", "text_encoder_2")]
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, 77, D1 + D2), pooled (B, D2))."""
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = output[0]  # the last encoder's is kept
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled.reshape(len(captions), -1)


def sdxl_time_ids(
    args: ControlNetTrainingArgs, original_size: tuple[int, int], crop_top_left: tuple[int, int]
) -> np.ndarray:
    """SDXL's micro-conditioning (original h, w, crop top, left, target h, w) for one row: the row's
    own size and crop, or the crop coordinates given for every row as the script takes them."""
    if args.crops_coords_top_left_h is not None:
        crop_top_left = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)
    return np.asarray([*original_size, *crop_top_left, args.resolution, args.resolution], dtype=np.float32)


class Components:
    """The frozen VAE and UNet, the trained ControlNet and the noise schedule of one worker."""

    def __init__(self, args: ControlNetTrainingArgs, device: torch.device):
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

        base, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        self.args, self.device = args, device
        self.dtype = weight_dtype(args.mixed_precision)
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        # Loaded in the dtype they run in: casting afterwards would hold a float32 copy first.
        vae_source = {"pretrained_model_name_or_path": args.pretrained_vae_model_name_or_path}
        if not args.pretrained_vae_model_name_or_path:
            vae_source = {"pretrained_model_name_or_path": base, "subfolder": "vae"}
        self.vae = AutoencoderKL.from_pretrained(
            **vae_source, revision=revision, variant=variant, torch_dtype=self.vae_dtype()
        )
        self.unet = UNet2DConditionModel.from_pretrained(
            base, subfolder="unet", revision=revision, variant=variant, torch_dtype=self.dtype
        )
        if args.controlnet_model_name_or_path:
            self.controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
        else:
            # Same widths as the UNet; the conditioning embedding must downsample as far as the VAE.
            downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
            channels = (16, 32, 96, 256)[: int(math.log2(downsample)) + 1]
            self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=channels)
        self.vae.requires_grad_(False).to(device)
        self.unet.requires_grad_(False).to(device)
        self.controlnet.train()
        self.controlnet.to(device)
        if args.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
            self.controlnet.enable_xformers_memory_efficient_attention()

    def vae_dtype(self) -> torch.dtype:
        return self.dtype

    def conditions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(encoder_hidden_states, added_cond_kwargs) of the batch."""
        raise NotImplementedError

    def loss(self, controlnet, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The scripts' step: noise the image latents, predict with ControlNet residuals, MSE."""
        latents = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist.sample(generator)
        latents = (latents * self.vae.config.scaling_factor).to(self.dtype)
        # As the scripts' randn_like: drawn in the latents' memory order (the VAE's is not contiguous),
        # on the generator's device (the CPU), so the noise does not depend on the accelerator.
        noise = torch.empty_like(latents, device=generator.device).normal_(generator=generator).to(latents.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        noisy_latents = self.noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(self.dtype)
        encoder_hidden_states, added_conditions = self.conditions(batch)
        down_samples, mid_sample = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_conditions,
            controlnet_cond=batch["conditioning_pixel_values"].to(self.dtype),
            return_dict=False,
        )
        model_pred = self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_conditions,
            down_block_additional_residuals=[s.to(self.dtype) for s in down_samples],
            mid_block_additional_residual=mid_sample.to(self.dtype),
            return_dict=False,
        )[0]
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r} in the base model's scheduler")
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    def validation_pipeline(self, controlnet):
        """A diffusers pipeline around the models being trained, for validation images."""
        raise NotImplementedError


class SDComponents(Components):
    """train_controlnet.py: the text encoder runs in the step on the batch's token ids."""

    def __init__(self, args: ControlNetTrainingArgs, device: torch.device):
        from transformers import CLIPTextModel

        super().__init__(args, device)
        self.tokenizer = load_tokenizer(args)
        self.text_encoder = CLIPTextModel.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="text_encoder",
            revision=args.revision,
            variant=args.variant,
            torch_dtype=self.dtype,
        )
        self.text_encoder.requires_grad_(False).to(device)

    def conditions(self, batch):
        return self.text_encoder(batch["input_ids"], return_dict=False)[0], None

    def validation_pipeline(self, controlnet):
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        return StableDiffusionControlNetPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            controlnet=controlnet,
            scheduler=UniPCMultistepScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class SDXLComponents(Components):
    """train_controlnet_sdxl.py: the text side comes precomputed in the batch."""

    def __init__(self, args: ControlNetTrainingArgs, device: torch.device):
        super().__init__(args, device)
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._prompt_encoder: SDXLPromptEncoder | None = None

    def vae_dtype(self) -> torch.dtype:
        # The base's SDXL VAE overflows in fp16: the script keeps it in float32 unless given another.
        return self.dtype if self.args.pretrained_vae_model_name_or_path else torch.float32

    def conditions(self, batch):
        added = {"text_embeds": batch["text_embeds"].to(self.dtype), "time_ids": batch["time_ids"].to(self.dtype)}
        return batch["prompt_embeds"].to(self.dtype), added

    def validation_pipeline(self, controlnet):
        from diffusers import StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

        if self._prompt_encoder is None:  # loaded on the first validation only: the step needs no encoders
            self._prompt_encoder = SDXLPromptEncoder(self.args, self.device, self.dtype)
        encoder = self._prompt_encoder
        return StableDiffusionXLControlNetPipeline(
            vae=self.vae,
            text_encoder=encoder.text_encoders[0],
            text_encoder_2=encoder.text_encoders[1],
            tokenizer=encoder.tokenizers[0],
            tokenizer_2=encoder.tokenizers[1],
            unet=self.unet,
            controlnet=controlnet,
            scheduler=UniPCMultistepScheduler.from_config(self.noise_scheduler.config),
        )


def load_components(args: ControlNetTrainingArgs, device: torch.device) -> Components:
    return SDXLComponents(args, device) if base_is_sdxl(args) else SDComponents(args, device)
